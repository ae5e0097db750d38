"""GGUF (llama.cpp) files: a real quantised SmolLM2 against transformers' GGUF loading and its golden
greedy ids, tiny files written with gguf.GGUFWriter (every supported type, llama.cpp's Q/K
permutation undone, tied embeddings, RoPE scaling), errors that name what is wrong, nothing written."""
import os
import sys
import time

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import model
from checkpoint import CheckpointError, load
from conftest import shared
from generate import generate

gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed (requirements-gguf.txt)")

SMOLLM = ("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = [504, 3575, 282, 4649, 314]                                 # "The capital of France is" (SOURCE.md)
GOLDEN = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33]   # " Paris.\n\nThe answer is: 201"


def listing(folder):
    """Every file of a folder with its size and modification time: to see that loading wrote nothing."""
    return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)}


@pytest.fixture(scope="module")
def smollm():
    file = shared(*SMOLLM)
    before = listing(os.path.dirname(file))
    start = time.perf_counter()
    ours = load(file)
    seconds = time.perf_counter() - start
    print(f"\nloaded {os.path.basename(file)} in fp32 in {seconds:.1f} s")
    return ours, before, listing(os.path.dirname(file))


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("transformers", reason="transformers (the test-only reference) is not installed")
    from transformers import AutoModelForCausalLM
    file = shared(*SMOLLM)
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(file), gguf_file=os.path.basename(file),
                                                dtype=torch.float32).eval()


def hf_positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def test_smollm_logits_equal_transformers_gguf_loading(smollm, reference):
    ours = smollm[0]
    assert (ours.cfg.dim, ours.cfg.n_layers, ours.cfg.n_heads, ours.cfg.n_kv_heads, ours.cfg.hidden_dim,
            ours.cfg.vocab_size, ours.cfg.norm_eps, ours.cfg.rope_theta, ours.cfg.max_seq_len,
            ours.cfg.tie_embeddings) == (576, 30, 9, 3, 1536, 49152, 1e-5, 100000.0, 8192, True)
    # norm_eps is the float32 1e-5 read as 1e-5, so the config is model.py's preset when it has one
    assert ours.cfg.name == ("smollm2-135m" if "smollm2-135m" in model.LLAMA_PRESETS else None)
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert sum(p.numel() for p in ours.parameters()) == 134_515_008
    other = [1, 9690, 198, 2683, 359, 253, 5356, 11, 1116]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    batch[0], mask[0] = torch.tensor(other), 1
    batch[1, 4:], mask[1, 4:] = torch.tensor(PROMPT), 1                  # left-padded
    with torch.no_grad():
        for ids in (torch.tensor([PROMPT]), torch.tensor([other])):
            assert_close(ours(ids), reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        out = ours(batch, attention_mask=mask)
        ref = reference(input_ids=batch, attention_mask=mask, position_ids=hf_positions(mask)).logits
    assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_smollm_golden_greedy_ids(smollm):
    out = generate(smollm[0], torch.tensor([PROMPT]), max_new_tokens=12)
    assert out[0, len(PROMPT):].tolist() == GOLDEN


def test_loading_writes_nothing_beside_the_file(smollm):
    before, after = smollm[1], smollm[2]
    assert after == before


# -----------------------------------------------------------------------------
# Tiny files written with gguf.GGUFWriter

DIM, LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB = 64, 2, 4, 2, 256, 96
LLAMA_META = {"llama.embedding_length": DIM, "llama.block_count": LAYERS, "llama.attention.head_count": HEADS,
              "llama.attention.head_count_kv": KV_HEADS, "llama.feed_forward_length": HIDDEN,
              "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 500000.0,
              "llama.context_length": 128, "llama.rope.dimension_count": DIM // HEADS}
# Hugging Face's names -> llama.cpp's (written out here, not taken from checkpoint_gguf.py)
HF_TO_GGUF = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(key):
    """'model.layers.1.self_attn.q_proj.weight' -> 'blk.1.attn_q.weight'."""
    key = key.removeprefix("model.").removesuffix(".weight")
    if key.startswith("layers."):
        _, i, rest = key.split(".", 2)
        return f"blk.{i}.{HF_TO_GGUF[rest]}.weight"
    return f"{HF_TO_GGUF[key]}.weight"


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: Hugging Face's rotate_half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, tensors, arch="llama", meta=LLAMA_META):
    """tensors: {GGUF name: (float32 array of torch's shape, ggml type name)}; Q6_K gets random bytes."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        (w.add_string if isinstance(value, str) else w.add_float32 if isinstance(value, float) else w.add_uint32)(
            key, value)
    for name, (array, kind) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        if kind in ("F32", "F16"):
            w.add_tensor(name, array.astype(np.float32 if kind == "F32" else np.float16))
        elif kind == "Q6_K":                                            # not supported: its bytes do not matter
            rows, cols = array.shape
            w.add_tensor(name, np.zeros((rows, cols // 256 * 210), np.uint8), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def random_llama(tied=False, seed=0):
    """{our key: (float32 weight in Hugging Face's layout, ggml type)}, the types cycling over the six."""
    rng = np.random.default_rng(seed)
    hd = DIM // HEADS
    shapes = {"embed_tokens": (VOCAB, DIM), "norm": (DIM,), **({} if tied else {"lm_head": (VOCAB, DIM)})}
    for i in range(LAYERS):
        shapes.update({f"layers.{i}.input_layernorm": (DIM,), f"layers.{i}.post_attention_layernorm": (DIM,),
                       f"layers.{i}.self_attn.q_proj": (DIM, DIM), f"layers.{i}.self_attn.k_proj": (KV_HEADS * hd, DIM),
                       f"layers.{i}.self_attn.v_proj": (KV_HEADS * hd, DIM), f"layers.{i}.self_attn.o_proj": (DIM, DIM),
                       f"layers.{i}.mlp.gate_proj": (HIDDEN, DIM), f"layers.{i}.mlp.up_proj": (HIDDEN, DIM),
                       f"layers.{i}.mlp.down_proj": (DIM, HIDDEN)})
    out = {}
    for n, (key, shape) in enumerate(shapes.items()):
        kind = "F32" if len(shape) == 1 else TYPES[n % len(TYPES)]
        out[f"{key}.weight"] = (rng.standard_normal(shape).astype(np.float32) * 0.1 + (len(shape) == 1), kind)
    return out


def as_gguf(weights):
    """Our keys and Hugging Face's layout -> GGUF names, Q/K rows permuted as llama.cpp's converter does."""
    out = {}
    for key, (w, kind) in weights.items():
        heads = HEADS if "q_proj" in key else KV_HEADS if "k_proj" in key else None
        out[gguf_name(key)] = (llama_cpp_permute(w, heads) if heads else w, kind)
    return out


def stored(w, kind):
    """What a reader gets back from a tensor of this type: the quantisation error included."""
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind]),
                                                   gguf.GGMLQuantizationType[kind]).reshape(w.shape).copy())


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_round_trip(tmp_path, tied):
    weights = random_llama(tied)
    assert {kind for _, kind in weights.values()} == set(TYPES)
    file = write_gguf(tmp_path / "tiny.gguf", as_gguf(weights))
    before = listing(tmp_path)
    ours = load(file)
    assert listing(tmp_path) == before
    assert (ours.cfg.dim, ours.cfg.n_layers, ours.cfg.n_heads, ours.cfg.n_kv_heads, ours.cfg.hidden_dim,
            ours.cfg.vocab_size, ours.cfg.norm_eps, ours.cfg.rope_theta, ours.cfg.max_seq_len, ours.cfg.rope_scaling) \
        == (DIM, LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB, 1e-5, 500000.0, 128, None)
    assert ours.cfg.tie_embeddings == tied and (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    state = ours.state_dict()
    for key, (w, kind) in weights.items():
        assert_close(state[key], stored(w, kind), atol=0, rtol=0, msg=f"{key} ({kind})")
        if kind == "F32":                                           # and exactly what was written
            assert torch.equal(state[key], torch.from_numpy(w))
    # a directory holding the one .gguf file, in bf16; dtype=None / device=None: float32 on the CPU
    half = load(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    assert torch.equal(half.layers[1].self_attn.k_proj.weight, ours.layers[1].self_attn.k_proj.weight.bfloat16())
    assert next(load(file, None, None).parameters()).dtype == torch.float32
    assert listing(tmp_path) == before


def test_tiny_gguf_logits_equal_transformers(tmp_path):
    """A random transformers LLaMA (GQA) written as llama.cpp's converter would (F32): the same logits,
    with left and right padding, so the Q/K permutation is undone the way transformers' model needs."""
    pytest.importorskip("transformers", reason="transformers (the test-only reference) is not installed")
    from hf_llama import tiny_hf_llama
    hf = tiny_hf_llama("gqa")
    c = hf.config
    meta = {**LLAMA_META, "llama.attention.head_count": c.num_attention_heads,
            "llama.attention.head_count_kv": c.num_key_value_heads, "llama.feed_forward_length": c.intermediate_size,
            "llama.rope.freq_base": float(c.rope_parameters["rope_theta"]), "llama.context_length": 256}
    tensors = {}
    for key, w in hf.state_dict().items():
        w = w.numpy()
        if "q_proj" in key or "k_proj" in key:
            w = llama_cpp_permute(w, c.num_attention_heads if "q_proj" in key else c.num_key_value_heads)
        tensors[gguf_name(key)] = (w, "F32")
    ours = load(write_gguf(tmp_path / "hf.gguf", tensors, meta=meta))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, c.vocab_size, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        out = ours(ids, attention_mask=mask)
    assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


def test_other_architecture_is_named(tmp_path):
    file = write_gguf(tmp_path / "qwen.gguf", {"token_embd.weight": (np.ones((8, 4), np.float32), "F32")},
                      arch="qwen2", meta={"qwen2.embedding_length": 4})
    with pytest.raises(CheckpointError, match=r"qwen\.gguf: architecture 'qwen2' is not supported \(only 'llama'\)"):
        load(file)


def test_unsupported_quantisation_type_is_named(tmp_path):
    tensors = as_gguf(random_llama())
    tensors["blk.0.ffn_down.weight"] = (tensors["blk.0.ffn_down.weight"][0], "Q6_K")
    file = write_gguf(tmp_path / "k.gguf", tensors)
    with pytest.raises(CheckpointError, match=r"k\.gguf: tensor 'blk\.0\.ffn_down\.weight' has quantisation type "
                                              r"Q6_K, which is not supported \(supported: F32, F16, BF16, Q8_0, "
                                              r"Q4_0, Q4_1\)"):
        load(file)


def test_bad_tensors_and_metadata_are_named(tmp_path):
    good = as_gguf(random_llama())
    cases = [
        ({**good, "blk.0.attn_q.bias": (np.zeros(DIM, np.float32), "F32")}, LLAMA_META,
         r"unexpected tensor 'blk\.0\.attn_q\.bias'"),
        ({**good, "blk.2.attn_norm.weight": (np.ones(DIM, np.float32), "F32")}, LLAMA_META,
         r"unexpected tensor 'blk\.2\.attn_norm\.weight' \('layers\.2\.input_layernorm\.weight'\)"),
        ({**good, "blk.1.attn_k.weight": (np.zeros((DIM, DIM), np.float32), "F32")}, LLAMA_META,
         r"tensor 'blk\.1\.attn_k\.weight' \('layers\.1\.self_attn\.k_proj\.weight'\) has shape \(64, 64\).*"
         r"expects \(32, 64\)"),
        ({k: v for k, v in good.items() if k != "blk.1.ffn_up.weight"}, LLAMA_META,
         r"missing tensor 'layers\.1\.mlp\.up_proj\.weight'"),
        ({**good, "rope_freqs.weight": (np.full(8, 2.0, np.float32), "F32")}, LLAMA_META,
         r"'rope_freqs\.weight' holds per-frequency RoPE factors"),
        (good, {**LLAMA_META, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
         r"RoPE scaling 'yarn'.* is not supported \(supported: none, linear\)"),
        (good, {**LLAMA_META, "llama.rope.dimension_count": 8}, r"llama\.rope\.dimension_count=8 is not supported"),
        (good, {k: v for k, v in LLAMA_META.items() if k != "llama.block_count"},
         r"missing metadata key 'llama\.block_count'"),
    ]
    for n, (tensors, meta, message) in enumerate(cases):
        file = write_gguf(tmp_path / f"bad{n}.gguf", tensors, meta=meta)
        with pytest.raises(CheckpointError, match=rf"bad{n}\.gguf: .*{message}"):
            load(file)


def test_rope_scaling_linear_and_rope_freqs_of_ones(tmp_path):
    tensors = {**as_gguf(random_llama()), "rope_freqs.weight": (np.ones(8, np.float32), "F32")}
    meta = {**LLAMA_META, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    ours = load(write_gguf(tmp_path / "linear.gguf", tensors, meta=meta))
    assert ours.cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    meta["llama.rope.scaling.type"] = "none"
    assert load(write_gguf(tmp_path / "none.gguf", tensors, meta={**meta, "llama.rope.scaling.factor": 1.0})
                ).cfg.rope_scaling is None


def test_directories_and_a_missing_gguf_package(tmp_path, monkeypatch):
    tensors = as_gguf(random_llama())
    os.makedirs(tmp_path / "two")
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tmp_path / "two" / name, tensors)
    with pytest.raises(CheckpointError, match=r"two: holds 2 \.gguf files \(a\.gguf, b\.gguf\); pass the one"):
        load(str(tmp_path / "two"))
    (tmp_path / "two" / "config.json").write_text("{}")                # config.json: the Hugging Face layout
    with pytest.raises(CheckpointError, match=r"two/config\.json: missing key 'hidden_size'"):
        load(str(tmp_path / "two"))
    monkeypatch.setitem(sys.modules, "gguf", None)                     # import gguf raises ImportError
    with pytest.raises(CheckpointError, match=r"a\.gguf: reading GGUF files needs the gguf package: "
                                              r"pip install -r requirements-gguf\.txt"):
        load(str(tmp_path / "two" / "a.gguf"))
