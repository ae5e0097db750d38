"""The transformer models the paper fine-tunes, written out by hand, and how to load them.

LLaMA 1/2/3 (Touvron et al. 2023; Meta 2024): RMSNorm, rotary position embeddings (RoPE),
grouped-query attention, SwiGLU feed-forward. Loaded from raw checkpoints in three layouts:
  - Hugging Face: config.json + model.safetensors / pytorch_model.bin, single or sharded;
  - Meta: params.json + consolidated.NN.pth (model-parallel shards are concatenated);
  - llama2.c: one .bin file (legacy v0 or v1 header).
Also: tokenizers (sentencepiece for LLaMA 1/2, tiktoken for LLaMA 3) and generation (greedy and
beam search with a KV cache, batched with left padding).

This file knows nothing of PEFT, training or benchmarks. The PEFT methods attach to it through:
  - every projection is a plain nn.Linear with a stable name (q_proj, k_proj, v_proj, o_proj,
    gate_proj, up_proj, down_proj, the names of the Hugging Face checkpoints), so a method can swap
    it for a wrapper that owns the same `weight`;
  - `attend(...)`, the one attention function, with `extra_kv` (prefix keys/values) and `attn_map`
    (a post-/pre-softmax attention-map term, implemented by lmam.py);
  - `MLP.adapter`, one place where an FFN-level adapter adds its term.
Positions are token positions (0 at each sequence's first real token, independent of padding),
computed once per forward and passed down.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import struct
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Configuration

@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32          # < n_heads: grouped-query attention (LLaMA-2 70B, LLaMA-3)
    hidden_dim: int = 11008       # SwiGLU inner width
    vocab_size: int = 32000
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False  # lm_head shares the embedding matrix (llama2.c models)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        if name not in LLAMA_PRESETS:
            raise ValueError(f"unknown model {name!r}; valid names: {', '.join(LLAMA_PRESETS)}")
        return cls(**LLAMA_PRESETS[name])


# The shapes of the released checkpoints (their params.json / config.json).
LLAMA_PRESETS = {
    "llama-7b":   dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008),
    "llama-13b":  dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
    "llama2-7b":  dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                       norm_eps=1e-5, max_seq_len=4096),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824,
                       norm_eps=1e-5, max_seq_len=4096),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672,
                       norm_eps=1e-5, max_seq_len=4096),
    "llama3-8b":  dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                       vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192),
    # tiny shapes for tests and the CPU demo
    "llama-tiny":     dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=176,
                           vocab_size=512, max_seq_len=256),
    "llama-tiny-gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176,
                           vocab_size=512, max_seq_len=256, rope_theta=500000.0, norm_eps=1e-5),
}


def preset_name(cfg: LlamaConfig) -> str | None:
    """The preset a config has the shapes of (a loaded checkpoint's name, for per-model presets)."""
    for name, p in LLAMA_PRESETS.items():
        if all(getattr(cfg, k) == v for k, v in p.items() if k != "max_seq_len") and \
                all(getattr(cfg, f.name) == f.default for f in fields(LlamaConfig)
                    if f.name not in p and f.name not in ("max_seq_len", "tie_embeddings")):
            return name
    return None


def build(name_or_path: str, dtype=torch.float32, device="cpu"):
    """A preset name -> a model of that shape on the meta device (no memory; for parameter
    counts); a path -> load(path)."""
    if name_or_path in LLAMA_PRESETS:
        with torch.device("meta"):
            return Llama(LlamaConfig.from_name(name_or_path))
    if not os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path!r} is neither a model name ({', '.join(LLAMA_PRESETS)}) nor a path")
    return load(name_or_path, dtype, device)


# -----------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight, computed in fp32 as the reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """cos/sin tables for RoPE at the given token positions (B, T) -> each (B, 1, T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq          # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)               # (B, T, hd): the "rotate_half" layout
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + hd/2) of each head (Hugging Face's layout; Meta's interleaved pairs
    (2i, 2i+1) are converted at load time by permuting the rows of wq and wk)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attend(q, k, v, mask=None, *, is_causal=False, extra_kv=None, attn_map=None, positions=None,
           need_weights=False):
    """softmax(q kᵀ / √d + mask) v, the one attention function of this file.

    q (B, H, T, hd); k, v (B, Hkv, S, hd) with H a multiple of Hkv (grouped-query attention:
    query head i reads key/value head i // (H / Hkv)). `mask` is boolean (B, 1, T, S), True = attend.
    `extra_kv` = (k', v') of shape (B, Hkv, P, hd) prepended to every query's keys (prefix tuning).
    `attn_map` is an object adding a learned attention map (LMAM, lmam.py); `positions` = (query
    token positions (B, T), key token positions (B, S), key is a real token (B, S)). With
    `need_weights` the T×S attention probabilities are materialised and returned as well (for
    pictures and tests); otherwise the work stays in scaled_dot_product_attention.
    """
    if extra_kv is not None:
        pk, pv = extra_kv
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, Hkv, P + S, hd)
        if mask is None and is_causal:
            T, S = q.shape[2], k.shape[2] - pk.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
            is_causal = False
        if mask is not None:
            prefix_ok = torch.ones(*mask.shape[:-1], pk.shape[2], dtype=torch.bool, device=q.device)
            mask = torch.cat([prefix_ok.expand(mask.shape[0], -1, -1, -1), mask], dim=-1)
    if attn_map is not None:
        return attn_map.attend(q, k, v, mask, is_causal=is_causal, positions=positions,
                               need_weights=need_weights)
    if need_weights:
        return attention_naive(q, k, v, mask, is_causal=is_causal)
    return sdpa(q, k, v, mask, is_causal), None


def sdpa(q, k, v, mask=None, is_causal=False):
    """scaled_dot_product_attention, with grouped-query attention when k, v have fewer heads."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention_naive(q, k, v, mask=None, *, is_causal=False, bias=None):
    """The same attention with the (B, H, T, S) probability matrix materialised; returns (y, probs).
    `bias` (broadcastable to (B, H, T, S)) is added to the scores before the softmax."""
    H, Hkv = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, hd)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])        # (B, H, T, S)
    if bias is not None:
        scores = scores + bias
    if is_causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return probs @ v, probs


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.prefix = None    # prefix tuning sets a module returning (k', v') for a batch size
        self.attn_map = None  # LMAM sets its map here

    def forward(self, x, cos, sin, mask, is_causal, positions, cache=None, need_weights=False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)                                                   # (B, Hkv, S, hd)
        extra_kv = self.prefix(B, x.dtype) if self.prefix is not None else None
        y, probs = attend(q, k, v, mask, is_causal=is_causal, extra_kv=extra_kv, attn_map=self.attn_map,
                          positions=positions, need_weights=need_weights)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)              # (B, T, H * hd)
        return self.o_proj(y), probs


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); an FFN-level adapter adds adapter(x, y) to the output."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)
        self.adapter = None

    def forward(self, x):
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.adapter is not None:
            y = self.adapter(x, y)
        return y


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, is_causal, positions, cache=None, need_weights=False):
        a, probs = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, positions,
                                  cache, need_weights)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, probs


class KVCache:
    """Keys and values of every layer for decoding, preallocated to `max_len` slots.

    Slot s of row b holds the token at column s of that row's (left-padded) sequence; `key_mask`
    (B, max_len) marks which slots are real tokens. `reorder(idx)` follows beam search.
    """

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.length = 0      # slots filled so far
        self.layer = 0       # which layer the next update() is for

    def update(self, k, v):
        T, i = k.shape[2], self.layer
        self.k[i][:, :, self.length:self.length + T] = k
        self.v[i][:, :, self.length:self.length + T] = v
        self.layer += 1
        return self.k[i][:, :, :self.length + T], self.v[i][:, :, :self.length + T]

    def advance(self, T: int):
        self.length += T
        self.layer = 0

    def reorder(self, idx):
        self.k = [k.index_select(0, idx) for k in self.k]
        self.v = [v.index_select(0, idx) for v in self.v]


def token_positions(attention_mask):
    """Position of each token counted from its sequence's first real token; 0 on padding.
    attention_mask (B, S) of 0/1 -> (B, S) long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, need_weights=False,
                return_hidden=False, positions=None):
        """input_ids (B, T) -> logits (B, T, vocab).

        attention_mask (B, S) with 1 for real tokens and 0 for padding (left or right), where S is T,
        or, when decoding with `cache`, the cached length plus T. With need_weights=True returns
        (logits, [attention probabilities per layer]).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        if positions is None:
            positions = token_positions(attention_mask)[:, past:]                   # (B, T)

        # Mask: key slot s is visible to query slot t if s <= t and s is a real token. A padded
        # query also sees itself, so that its (unused) softmax row is never empty.
        if past == 0 and bool(attention_mask.all()):
            mask, is_causal = None, True          # the plain causal case: SDPA's fastest kernels
        else:
            q_slot = torch.arange(past, past + T, device=device)[:, None]
            k_slot = torch.arange(past + T, device=device)[None, :]
            mask = (k_slot <= q_slot) & attention_mask.bool()[:, None, :]           # (B, T, S)
            mask = (mask | (k_slot == q_slot))[:, None]                             # (B, 1, T, S)
            is_causal = False

        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        # token positions of the queries and of every key slot, for an attention map (LMAM)
        map_positions = (positions, token_positions(attention_mask), attention_mask.bool())
        all_probs = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, probs = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, mask, is_causal, map_positions, cache, need_weights, use_reentrant=False)
            else:
                x, probs = layer(x, cos, sin, mask, is_causal, map_positions, cache, need_weights)
            all_probs.append(probs)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if return_hidden:
            return x
        logits = self.lm_head(x)
        return (logits, all_probs) if need_weights else logits


# -----------------------------------------------------------------------------
# Reading tensors from disk

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file, the key and what was expected."""


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Read a .safetensors file through a memory map: 8-byte little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets: [begin, end]}}, then the raw bytes. The tensors
    share the mapped pages (copy-on-write); nothing is read until a tensor is used."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors header (says {n} bytes, file has {size - 8})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)                 # the whole file as bytes
    out = {}
    for key, info in header.items():
        if info.get("dtype") not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
        dtype, shape = _ST_DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        numel = math.prod(shape)
        if end > data_len or end - begin != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} {info['dtype']}{shape} needs bytes "
                                  f"[{begin}, {end}) but the data section has {data_len} bytes (truncated?)")
        chunk = raw[8 + n + begin: 8 + n + end]
        if (8 + n + begin) % dtype.itemsize:                              # unaligned: copy
            chunk = chunk.clone()
        out[key] = chunk.view(dtype).view(shape)
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None):
    """Write tensors in the safetensors layout (used for adapter files); atomic (temp file + rename)."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for key, t in tensors.items():
        b = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def read_torch(path: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def read_hf_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a Hugging Face checkpoint directory -> ({key: tensor}, {key: file it came from})."""
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", read_torch)):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            tensors, origin = {}, {}
            for shard in sorted(set(weight_map.values())):
                file = os.path.join(path, shard)
                if not os.path.exists(file):
                    raise CheckpointError(f"{index}: lists shard {shard!r}, which is not in {path}")
                for k, t in reader(file).items():
                    tensors[k], origin[k] = t, file
            return tensors, origin
    for name, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", read_torch)):
        file = os.path.join(path, name)
        if os.path.exists(file):
            tensors = reader(file)
            return tensors, {k: file for k in tensors}
    raise CheckpointError(f"{path}: has config.json but no model.safetensors, pytorch_model.bin "
                          f"or a *.index.json for sharded weights")


def assign_weights(model: nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, str],
                   dtype, device, ignore=()):
    """Put `tensors` into `model` (built on the meta device) by assignment, checking every key.

    A missing, unexpected or mis-shaped tensor is a CheckpointError naming the file and the key.
    Keys matching a regex in `ignore` (e.g. cached RoPE tables) are skipped.
    """
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    tied = model.cfg.tie_embeddings if hasattr(model, "cfg") else False
    if tied:
        expected.pop("lm_head.weight", None)
    state = {}
    for key, t in tensors.items():
        if any(re.fullmatch(p, key) for p in ignore) or (tied and key == "lm_head.weight"):
            continue
        if key not in expected:
            raise CheckpointError(f"{origin.get(key, '?')}: unexpected tensor {key!r} {tuple(t.shape)}")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{origin.get(key, '?')}: tensor {key!r} has shape {tuple(t.shape)}, "
                                  f"the model expects {tuple(expected[key].shape)}")
        state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    missing = [k for k in expected if k not in state]
    if missing:
        files = sorted(set(origin.values()))
        raise CheckpointError(f"{', '.join(files)}: missing tensor {missing[0]!r} (expected shape "
                              f"{tuple(expected[missing[0]].shape)})" +
                              (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def meta_to_hf_rows(w, n_heads: int):
    """Meta's RoPE rotates interleaved pairs (2i, 2i+1) of each head, Hugging Face's rotates
    (i, i + hd/2). Permute the output rows of wq / wk so both give the same attention scores
    (the permutation of transformers' convert_llama_weights_to_hf.py)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


# -----------------------------------------------------------------------------
# Loading the three LLaMA layouts

def load(path: str, dtype=torch.float32, device="cpu"):
    """Read the checkpoint directory (or llama2.c .bin file) at `path` and return the model.

    The layout is detected from the files present; the model is built on the meta device and the
    tensors are assigned into it, so a checkpoint is never held twice in memory.
    """
    if os.path.isfile(path) and path.endswith(".bin") and not path.endswith("pytorch_model.bin"):
        return load_llama2c(path, dtype, device)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory or llama2.c .bin file")
    if os.path.exists(os.path.join(path, "config.json")):
        return load_hf(path, dtype, device)
    if os.path.exists(os.path.join(path, "params.json")):
        return load_meta(path, dtype, device)
    bins = sorted(glob.glob(os.path.join(path, "*.bin")))
    if len(bins) == 1:
        return load_llama2c(bins[0], dtype, device)
    raise CheckpointError(f"{path}: unknown checkpoint layout; expected config.json + model.safetensors / "
                          f"pytorch_model.bin (Hugging Face), params.json + consolidated.*.pth (Meta), "
                          f"or one llama2.c .bin file")


def llama_config_from_hf(hf: dict, file: str) -> LlamaConfig:
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{file}: model_type {hf.get('model_type')!r} is not supported (expected 'llama')")
    if hf.get("rope_scaling") not in (None, {}) or hf.get("rope_parameters", {}).get("rope_type", "default") != "default":
        raise CheckpointError(f"{file}: RoPE scaling {hf.get('rope_scaling') or hf.get('rope_parameters')} "
                              f"is not supported (LLaMA 1/2/3 use none)")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise CheckpointError(f"{file}: {key}={hf[key]!r} is not supported (LLaMA uses {ok!r})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in hf:
            raise CheckpointError(f"{file}: missing key {key!r}")
    if hf["hidden_size"] % hf["num_attention_heads"] or hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]) \
            != hf["hidden_size"] // hf["num_attention_heads"]:
        raise CheckpointError(f"{file}: head_dim must be hidden_size / num_attention_heads")
    theta = hf.get("rope_theta", hf.get("rope_parameters", {}).get("rope_theta", 10000.0))
    return LlamaConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                       hidden_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                       norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                       max_seq_len=hf.get("max_position_embeddings", 2048),
                       tie_embeddings=hf.get("tie_word_embeddings", False))


def load_hf(path, dtype=torch.float32, device="cpu"):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = llama_config_from_hf(json.load(f), file)
    tensors, origin = read_hf_tensors(path)
    # Hugging Face keys are ours with a "model." prefix (lm_head.weight has none).
    renamed = {k.removeprefix("model."): t for k, t in tensors.items()}
    origin = {k.removeprefix("model."): o for k, o in origin.items()}
    with torch.device("meta"):
        model = Llama(cfg)
    return assign_weights(model, renamed, origin, dtype, device, ignore=[r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"])


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
    return LlamaConfig(dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
                       n_kv_heads=params.get("n_kv_heads") or params["n_heads"], hidden_dim=hidden,
                       vocab_size=vocab_size, norm_eps=params.get("norm_eps", 1e-6),
                       rope_theta=float(params.get("rope_theta", 10000.0)))


def load_meta(path, dtype=torch.float32, device="cpu"):
    params_file = os.path.join(path, "params.json")
    with open(params_file) as f:
        params = json.load(f)
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


def load_llama2c(file, dtype=torch.float32, device="cpu"):
    """llama2.c's export format (karpathy/llama2.c export.py): version 0 (7 int32 header, weights
    stacked per kind, RoPE tables after the final norm) or version 1 (256-byte header with magic
    "ak42", norms first, no RoPE tables). Matrices are nn.Linear (out, in), float32."""
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
    L, hd, kv_dim = n_layers, dim // n_heads, n_kv * (dim // n_heads)
    data = torch.from_file(file, shared=False, size=size // 4, dtype=torch.float32) if size % 4 == 0 else None
    if data is None:
        raise CheckpointError(f"{file}: size {size} is not a whole number of float32 values")
    data = data[offset // 4:]

    def take(name, *shape):
        nonlocal data
        n = math.prod(shape)
        if data.numel() < n:
            raise CheckpointError(f"{file}: truncated: tensor {name!r} {shape} needs {n} floats, "
                                  f"{data.numel()} left")
        t, data = data[:n].view(shape), data[n:]
        return t

    w = {}
    if version == 0:
        order = ["emb", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm", "rope"]
    else:
        order = ["attn_norm", "ffn_norm", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    shapes = {"emb": (vocab, dim), "attn_norm": (L, dim), "ffn_norm": (L, dim), "norm": (dim,),
              "wq": (L, dim, dim), "wk": (L, kv_dim, dim), "wv": (L, kv_dim, dim), "wo": (L, dim, dim),
              "w1": (L, hidden, dim), "w2": (L, dim, hidden), "w3": (L, hidden, dim),
              "rope": (2, seq_len, hd // 2)}
    for name in order:
        w[name] = take(name, *shapes[name])
    if not shared:
        w["output"] = take("output", vocab, dim)
    if data.numel():
        raise CheckpointError(f"{file}: {data.numel()} float32 values left after the last tensor "
                              f"(header does not match the file)")

    tensors = {"embed_tokens.weight": w["emb"], "norm.weight": w["norm"]}
    if not shared:
        tensors["lm_head.weight"] = w["output"]
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
    for i in range(L):
        for src, dst in names.items():
            t = w[src][i]
            if src == "wq":
                t = meta_to_hf_rows(t, n_heads)
            elif src == "wk":
                t = meta_to_hf_rows(t, n_kv)
            tensors[f"layers.{i}.{dst}.weight"] = t
    with torch.device("meta"):
        model = Llama(cfg)
    return assign_weights(model, tensors, {k: file for k in tensors}, dtype, device)


# -----------------------------------------------------------------------------
# Tokenizers

class SentencePieceTokenizer:
    """LLaMA 1/2 (and llama2.c) sentencepiece tokenizer.model."""

    def __init__(self, path: str):
        import sentencepiece as spm
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except Exception as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.EncodeAsIds(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


class TiktokenTokenizer:
    """LLaMA 3's tokenizer.model: base64 BPE ranks, Meta's split pattern and 256 special tokens."""

    PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
               + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)])

    def __init__(self, path: str):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        self.path = path
        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as e:
            raise ValueError(f"{path}: not a tiktoken BPE file ({e})") from None
        special = {t: len(ranks) + i for i, t in enumerate(self.SPECIAL)}
        self.enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=self.PATTERN,
                                     mergeable_ranks=ranks, special_tokens=special)
        self.bos_id, self.eos_id = special["<|begin_of_text|>"], special["<|end_of_text|>"]
        self.pad_id = self.eos_id
        self.vocab_size = len(ranks) + len(special)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # Special-token text in the input is encoded as plain text, as Meta's tokenizer does.
        return [self.bos_id] * bos + self.enc.encode(text, disallowed_special=()) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


def load_tokenizer(path: str):
    """A tokenizer from a file or a checkpoint directory: tokenizer.model in sentencepiece format
    (LLaMA 1/2, llama2.c) or tiktoken format (LLaMA 3)."""
    if os.path.isdir(path):
        candidates = [os.path.join(path, n) for n in ("tokenizer.model",) if os.path.exists(os.path.join(path, n))]
        if not candidates:
            raise ValueError(f"{path}: no tokenizer found (expected tokenizer.model)")
        path = candidates[0]
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such tokenizer file")
    with open(path, "rb") as f:
        first = f.readline(4096)
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path)


# -----------------------------------------------------------------------------
# Generation

@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens=32, num_beams=1, eos_id=None, pad_id=0,
             length_penalty=1.0):
    """Continue each prompt with greedy decoding (num_beams=1) or beam search, using the KV cache.

    input_ids (B, T), left-padded when prompts differ in length, with attention_mask (B, T) marking
    real tokens. Returns (B, T + generated) token ids, prompts included, like transformers'
    `generate(do_sample=False, num_beams=...)`: finished greedy rows are filled with `pad_id`, and
    beam search returns the best finished hypothesis per prompt (its score: sum of log-probabilities
    / generated_length ** length_penalty, with transformers' default stopping heuristic).
    """
    model.eval()
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if num_beams == 1:
        return _greedy(model, input_ids, attention_mask, max_new_tokens, eos_id, pad_id)
    return _beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams, eos_id, pad_id, length_penalty)


def _next_logits(model, tokens, attention_mask, cache):
    """fp32 logits of the last position only (the LM head is not run on the prompt's other tokens)."""
    h = model(tokens, attention_mask=attention_mask, cache=cache, return_hidden=True)
    return model.lm_head(h[:, -1]).float()


def _greedy(model, input_ids, attention_mask, max_new_tokens, eos_id, pad_id):
    B, T = input_ids.shape
    p = next(model.parameters())
    cache = KVCache(model.cfg, B, T + max_new_tokens, p.dtype, p.device)
    seqs, mask = input_ids, attention_mask
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens = input_ids
    for _ in range(max_new_tokens):
        logits = _next_logits(model, tokens, mask, cache)
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        if eos_id is not None:
            done = done | (nxt == eos_id)
            if bool(done.all()):
                break
        tokens = nxt[:, None]
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
    return seqs


def _beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams, eos_id, pad_id, length_penalty):
    """Beam search as transformers implements it (generation/utils.py `_beam_search`):

    each step takes the top 2·num_beams continuations over all beams; those ending in EOS among the
    first num_beams become finished hypotheses scored logp / gen_len ** length_penalty; the best
    num_beams not ending in EOS keep running. A prompt stops when its best running beam, scored at
    the current length, cannot beat its worst finished hypothesis; everything stops at max length.
    """
    B, T = input_ids.shape
    K, device = num_beams, input_ids.device
    max_len = T + max_new_tokens
    p = next(model.parameters())
    cache = KVCache(model.cfg, B * K, max_len, p.dtype, p.device)
    fill = pad_id if pad_id else (eos_id if eos_id is not None else -1)

    running = torch.full((B, K, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :T] = input_ids[:, None]
    run_scores = torch.zeros(B, K, device=device)
    run_scores[:, 1:] = -1e9                        # all beams start equal: expand only the first
    finished = running.clone()
    fin_scores = torch.full((B, K), -1e9, device=device)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    improvable = torch.ones(B, dtype=torch.bool, device=device)
    mask = attention_mask.repeat_interleave(K, dim=0)
    tokens = input_ids.repeat_interleave(K, dim=0)
    batch = torch.arange(B, device=device)[:, None]

    for cur in range(T, max_len):
        logp = _next_logits(model, tokens, mask, cache).log_softmax(-1)          # (B·K, V)
        V = logp.shape[-1]
        cand = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=-1)                             # (B, 2K)
        beam, tok = top_idx // V, top_idx % V
        cand_seqs = running[batch, beam]                                           # (B, 2K, max_len)
        cand_seqs[:, :, cur] = tok
        ends = (tok == eos_id) if eos_id is not None else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= max_len:
            ends = torch.ones_like(ends)                                           # max length reached

        # Running beams for the next step: the best K candidates that did not end.
        keep = (top_scores - 1e9 * ends.float()).topk(K, dim=-1).indices
        running = cand_seqs[batch, keep]
        run_scores = (top_scores - 1e9 * ends.float())[batch, keep]
        parent = beam[batch, keep]

        # Finished hypotheses: merge candidates that ended (among the first K) into the finished set.
        new_scores = top_scores / ((cur + 1 - T) ** length_penalty)
        ok = ends & (torch.arange(2 * K, device=device) < K)[None] & improvable[:, None]
        new_scores = new_scores - 1e9 * (~ok).float()
        all_scores = torch.cat([fin_scores, new_scores], dim=1)
        best = all_scores.topk(K, dim=-1).indices
        finished = torch.cat([finished, cand_seqs], dim=1)[batch, best]
        fin_done = torch.cat([fin_done, ok], dim=1)[batch, best]
        fin_len = torch.cat([fin_len, torch.full_like(tok, cur + 1 - T)], dim=1)[batch, best]
        fin_scores = all_scores[batch, best]

        # Can a running beam still beat the worst finished one (scored at the current length)?
        best_possible = run_scores[:, 0] / ((cur + 1 - T) ** length_penalty)
        worst = torch.where(fin_done.all(-1), fin_scores.min(-1).values, torch.full_like(best_possible, -1e9))
        improvable = improvable & (best_possible > worst)
        if not bool(improvable.any()) or bool(ends.all()):
            break
        cache.reorder((parent + batch * K).view(-1))
        tokens = running[:, :, cur].reshape(B * K, 1)
        mask = torch.cat([mask, torch.ones(B * K, 1, dtype=mask.dtype, device=device)], dim=1)

    out_len = T + int(fin_len[:, 0].max())
    return finished[:, 0, :out_len]
