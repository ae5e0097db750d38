"""Reading Meta's and llama2.c's LLaMA checkpoints: `checkpoint.load(path)` calls `load_meta` for a
directory with params.json and `load_llama2c` for a llama2.c .bin file (or a directory holding one).

  - Meta (facebookresearch/llama): params.json + consolidated.NN.pth, one file per model-parallel
    rank; each matrix is split along the dimension its parallel layer splits (META_KEYS) and is
    concatenated back here. The .pth files are read with torch.load(weights_only=True): tensors
    only, no Python objects unpickled.
  - llama2.c (karpathy/llama2.c export.py): one .bin file, a header of ints then every float32
    weight, stacked per kind (version 0, or version 1 with its "ak42" magic).

Both store RoPE's rotated pairs interleaved, (2i, 2i+1) of each head; Hugging Face's layout, which
model.py follows, rotates (i, i + hd/2). meta_to_hf_rows permutes the rows of wq and wk from one to
the other (checkpoint_gguf.py uses it too: llama.cpp stores Meta's layout).
"""
from __future__ import annotations

import glob
import math
import os
import re
import struct

import torch

from checkpoint import CheckpointError, assign_weights, read_json, read_torch
from model import Llama, LlamaConfig


def meta_to_hf_rows(w, n_heads: int):
    """Meta's RoPE rotates interleaved pairs (2i, 2i+1) of each head, Hugging Face's rotates
    (i, i + hd/2). Permute the output rows of wq / wk so both give the same attention scores
    (the permutation of transformers' convert_llama_weights_to_hf.py)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


# Meta key -> (our key, the dimension model-parallel shards are split along; None = replicated).
META_KEYS = {
    "tok_embeddings.weight": ("embed_tokens.weight", 1),
    "norm.weight": ("norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "layers.{}.attention.wq.weight": ("layers.{}.self_attn.q_proj.weight", 0),
    "layers.{}.attention.wk.weight": ("layers.{}.self_attn.k_proj.weight", 0),
    "layers.{}.attention.wv.weight": ("layers.{}.self_attn.v_proj.weight", 0),
    "layers.{}.attention.wo.weight": ("layers.{}.self_attn.o_proj.weight", 1),
    "layers.{}.feed_forward.w1.weight": ("layers.{}.mlp.gate_proj.weight", 0),
    "layers.{}.feed_forward.w2.weight": ("layers.{}.mlp.down_proj.weight", 1),
    "layers.{}.feed_forward.w3.weight": ("layers.{}.mlp.up_proj.weight", 0),
    "layers.{}.attention_norm.weight": ("layers.{}.input_layernorm.weight", None),
    "layers.{}.ffn_norm.weight": ("layers.{}.post_attention_layernorm.weight", None),
}


def map_meta_key(key: str, file: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    pattern = f"layers.{{}}.{m.group(2)}" if m else key
    if pattern not in META_KEYS:
        raise CheckpointError(f"{file}: unexpected tensor {key!r} in a Meta checkpoint")
    ours, split = META_KEYS[pattern]
    return (ours.format(m.group(1)) if m else ours), split


def llama_config_from_meta(params: dict, vocab_size: int) -> LlamaConfig:
    """params.json -> config. The FFN width follows Meta's model.py: 2/3 of 4·dim, times
    ffn_dim_multiplier, rounded up to a multiple of multiple_of."""
    dim = params["dim"]
    hidden = int(2 * (4 * dim) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    m = params.get("multiple_of", 256)
    hidden = m * ((hidden + m - 1) // m)
    if params.get("use_scaled_rope"):
        # Llama 3.1+'s params.json names the scaling but not its factor (8 for 3.1, 32 for 3.2 in
        # Meta's code): refuse rather than guess; the Hugging Face config carries the numbers.
        raise CheckpointError("params.json: use_scaled_rope=true (Llama 3.1+) is not supported for Meta's layout; "
                              "use the Hugging Face checkpoint of the same model (config.json has its rope_scaling)")
    return LlamaConfig(dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
                       n_kv_heads=params.get("n_kv_heads") or params["n_heads"], hidden_dim=hidden,
                       vocab_size=vocab_size, norm_eps=params.get("norm_eps", 1e-6),
                       rope_theta=float(params.get("rope_theta", 10000.0)))


def load_meta(path, dtype=torch.float32, device="cpu"):
    params_file = os.path.join(path, "params.json")
    params = read_json(params_file)
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(f"{params_file}: missing key {key!r}")
    shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not shards:
        raise CheckpointError(f"{path}: has params.json but no consolidated.*.pth")
    parts = [read_torch(s) for s in shards]
    # Gather each tensor from every shard and concatenate along its model-parallel split dimension.
    tensors, origin = {}, {}
    for key in parts[0]:
        if key == "rope.freqs":          # cached RoPE table in LLaMA-1 checkpoints; recomputed here
            continue
        ours, split = map_meta_key(key, shards[0])
        for s, p in zip(shards, parts):
            if key not in p:
                raise CheckpointError(f"{s}: missing tensor {key!r} (present in {shards[0]})")
        pieces = [p[key] for p in parts]
        tensors[ours] = pieces[0] if split is None or len(pieces) == 1 else torch.cat(pieces, dim=split)
        origin[ours] = shards[0] if len(shards) == 1 else f"{path}/consolidated.*.pth"
    if "embed_tokens.weight" not in tensors:
        raise CheckpointError(f"{shards[0]}: missing tensor 'tok_embeddings.weight'")
    vocab = params.get("vocab_size", -1)
    vocab = vocab if vocab > 0 else tensors["embed_tokens.weight"].shape[0]   # LLaMA-1 says -1
    cfg = llama_config_from_meta(params, vocab)
    for i in range(cfg.n_layers):
        for proj, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.n_kv_heads)):
            key = f"layers.{i}.self_attn.{proj}.weight"
            if key in tensors and tensors[key].shape[0] % heads == 0:
                tensors[key] = meta_to_hf_rows(tensors[key], heads)
    with torch.device("meta"):
        model = Llama(cfg)
    return assign_weights(model, tensors, origin, dtype, device)


def read_llama2c_header(file: str) -> tuple[LlamaConfig, int, int]:
    """llama2.c's export format (karpathy/llama2.c export.py): version 0 (7 int32 header, weights
    stacked per kind, RoPE tables after the final norm) or version 1 (256-byte header with magic
    "ak42", norms first, no RoPE tables). Returns (config, version, offset of the first weight)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(256)
    if len(head) < 28:
        raise CheckpointError(f"{file}: truncated llama2.c header ({size} bytes)")
    magic = struct.unpack("<I", head[:4])[0]
    if magic == 0x616B3432:                                           # "ak42": version >= 1
        version = struct.unpack("<i", head[4:8])[0]
        if version != 1:
            raise CheckpointError(f"{file}: llama2.c version {version} is not supported (0 and 1 are)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", head[8:36])
        shared = bool(head[36])
        offset = 256
    else:
        version = 0
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", head[:28])
        shared, vocab = vocab > 0, abs(vocab)
        offset = 28
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
        raise CheckpointError(f"{file}: not a llama2.c checkpoint (header {dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len})")
    cfg = LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=hidden,
                      vocab_size=vocab, norm_eps=1e-5, max_seq_len=seq_len, tie_embeddings=shared)
    return cfg, version, offset


# llama2.c's per-layer weights (stacked: one tensor of L layers each) -> our module names
LLAMA2C_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
                 "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}


def load_llama2c(file, dtype=torch.float32, device="cpu"):
    """A llama2.c .bin file (read_llama2c_header): every weight float32, matrices nn.Linear's (out, in)."""
    cfg, version, offset = read_llama2c_header(file)
    size = os.path.getsize(file)
    if size % 4:
        raise CheckpointError(f"{file}: size {size} is not a whole number of float32 values")
    data = torch.from_file(file, shared=False, size=size // 4, dtype=torch.float32)[offset // 4:]

    def take(name, *shape):
        nonlocal data
        n = math.prod(shape)
        if data.numel() < n:
            raise CheckpointError(f"{file}: truncated: tensor {name!r} {shape} needs {n} floats, "
                                  f"{data.numel()} left")
        t, data = data[:n].view(shape), data[n:]
        return t

    L, dim, hidden, kv_dim = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"emb": (cfg.vocab_size, dim), "attn_norm": (L, dim), "ffn_norm": (L, dim), "norm": (dim,),
              "wq": (L, dim, dim), "wk": (L, kv_dim, dim), "wv": (L, kv_dim, dim), "wo": (L, dim, dim),
              "w1": (L, hidden, dim), "w2": (L, dim, hidden), "w3": (L, hidden, dim),
              "rope": (2, cfg.max_seq_len, cfg.head_dim // 2), "output": (cfg.vocab_size, dim)}
    if version == 0:
        order = ["emb", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm", "rope"]
    else:
        order = ["attn_norm", "ffn_norm", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    w = {name: take(name, *shapes[name]) for name in order + ([] if cfg.tie_embeddings else ["output"])}
    if data.numel():
        raise CheckpointError(f"{file}: {data.numel()} float32 values left after the last tensor "
                              f"(header does not match the file)")

    tensors = {"embed_tokens.weight": w["emb"], "norm.weight": w["norm"]}
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = w["output"]
    for i in range(L):
        for src, dst in LLAMA2C_LAYER.items():
            t = w[src][i]
            if src in ("wq", "wk"):
                t = meta_to_hf_rows(t, cfg.n_heads if src == "wq" else cfg.n_kv_heads)
            tensors[f"layers.{i}.{dst}.weight"] = t
    with torch.device("meta"):
        model = Llama(cfg)
    return assign_weights(model, tensors, {k: file for k in tensors}, dtype, device)
