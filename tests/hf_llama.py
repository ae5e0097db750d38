"""Test helpers: tiny random transformers LLaMA models and the checkpoint layouts written from them."""
import json
import os
import struct

import torch
from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

# (num_attention_heads, num_key_value_heads, rope_theta): MHA, GQA, LLaMA-3's theta
VARIANTS = {"mha": (4, 4, 10000.0), "gqa": (4, 2, 10000.0), "theta500k": (4, 2, 500000.0)}


def tiny_hf_llama(variant="mha", seed=0, vocab=512, init=0.1):
    heads, kv, theta = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = HFLlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=heads, num_key_value_heads=kv, rope_theta=theta,
                        max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=init,
                        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():   # random norms too, so that a swapped norm weight would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def hf_positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def state_dict(hf):
    return {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}


def save_bin(hf, path, shards=1):
    """pytorch_model.bin (or pytorch_model-0000i-of-0000n.bin + index) as transformers 4 wrote them."""
    os.makedirs(path, exist_ok=True)
    hf.config.save_pretrained(path)
    sd = state_dict(hf)
    if shards == 1:
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
        return
    keys, weight_map = list(sd), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def hf_to_meta_rows(w, n_heads):
    """Inverse of the Meta -> Hugging Face RoPE row permutation."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def meta_state(hf):
    c, sd = hf.config, state_dict(hf)
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = hf_to_meta_rows(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
        out[f"layers.{i}.attention.wk.weight"] = hf_to_meta_rows(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
        out[f"layers.{i}.attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    return out


# Meta key -> model-parallel split dimension (as in Meta's fairscale layers)
def _split_dim(key):
    if key.endswith(("attention_norm.weight", "ffn_norm.weight")) or key == "norm.weight":
        return None
    if key == "tok_embeddings.weight" or key.endswith(("wo.weight", "w2.weight")):
        return 1
    return 0


def save_meta(hf, path, shards=1):
    """params.json + consolidated.NN.pth, split over `shards` model-parallel ranks like Meta's."""
    os.makedirs(path, exist_ok=True)
    c = hf.config
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "multiple_of": 16, "norm_eps": c.rms_norm_eps,
              "rope_theta": c.rope_parameters["rope_theta"], "vocab_size": -1}
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    sd = meta_state(hf)
    for r in range(shards):
        part = {}
        for k, v in sd.items():
            d = _split_dim(k)
            part[k] = v if d is None else v.chunk(shards, dim=d)[r].clone()
        part["rope.freqs"] = torch.zeros(8)
        torch.save(part, os.path.join(path, f"consolidated.{r:02d}.pth"))


def save_llama2c(hf, file, version=1):
    """llama2.c export.py's legacy (0) or version-1 format."""
    c, m = hf.config, meta_state(hf)
    L = c.num_hidden_layers
    layer = lambda name: [m[f"layers.{i}.{name}.weight"] for i in range(L)]
    dims = (c.hidden_size, c.intermediate_size, L, c.num_attention_heads, c.num_key_value_heads, c.vocab_size, 256)
    with open(file, "wb") as f:
        if version == 0:
            f.write(struct.pack("<7i", *dims[:5], -dims[5], dims[6]))   # negative vocab: unshared classifier
            order = [[m["tok_embeddings.weight"]], layer("attention_norm"), layer("attention.wq"),
                     layer("attention.wk"), layer("attention.wv"), layer("attention.wo"), layer("ffn_norm"),
                     layer("feed_forward.w1"), layer("feed_forward.w2"), layer("feed_forward.w3"),
                     [m["norm.weight"]], [torch.zeros(2, 256, c.hidden_size // c.num_attention_heads // 2)]]
        else:
            head = struct.pack("<Ii7iB", 0x616B3432, 1, *dims, 0)
            f.write(head + b"\0" * (256 - len(head)))
            order = [layer("attention_norm"), layer("ffn_norm"), [m["norm.weight"]], [m["tok_embeddings.weight"]],
                     layer("attention.wq"), layer("attention.wk"), layer("attention.wv"), layer("attention.wo"),
                     layer("feed_forward.w1"), layer("feed_forward.w2"), layer("feed_forward.w3")]
        order.append([m["output.weight"]])
        for group in order:
            for t in group:
                f.write(t.float().contiguous().numpy().tobytes())
