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


def preset_name(cfg) -> str | None:
    """The preset a config has the shapes of (a loaded checkpoint's name, for per-model presets)."""
    if not isinstance(cfg, LlamaConfig):
        shape = lambda c: {k: v for k, v in vars(c).items() if k in SHAPE_FIELDS}
        return next((n for n, p in ENCDEC_PRESETS.items() if type(p) is type(cfg) and shape(p) == shape(cfg)), None)
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
    if name_or_path in ENCDEC_PRESETS:
        cfg = ENCDEC_PRESETS[name_or_path]
        with torch.device("meta"):
            return (Roberta if isinstance(cfg, RobertaConfig) else Bart)(cfg)
    if not os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path!r} is neither a model name ({', '.join([*LLAMA_PRESETS, *ENCDEC_PRESETS])}) "
                         f"nor a path")
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


def linear(x, weight, bias=None):
    """F.linear, except for a few fp32 rows on CPU (decoding), where it is computed by bmm over the
    weight's two row halves: for (out, in) weights the BLAS matrix-vector product behind F.linear
    runs 2-5x slower on this project's CPU than the batched form (bench.py's decode row; decoding
    reads every weight once per token, so this is most of a step). Same result up to rounding.
    Not for bf16, whose own kernel is ~2x faster than the batched form there."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or x.dtype != torch.float32 or rows > 32 or weight.shape[0] % 2:
        return F.linear(x, weight, bias)
    out, d = weight.shape
    y = torch.bmm(weight.view(2, out // 2, d), x.reshape(rows, d).t().expand(2, d, rows))   # (2, out/2, rows)
    y = y.permute(2, 0, 1).reshape(*x.shape[:-1], out)
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear computed by `linear` (fast decoding on CPU); the projections of the models below.
    Still an nn.Linear: PEFT methods find and wrap it like any other."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def attend(q, k, v, mask=None, *, is_causal=False, extra_kv=None, attn_map=None, positions=None,
           need_weights=False, dropout_p=0.0):
    """softmax(q kᵀ / √d + mask) v, the one attention function of this file.

    q (B, H, T, hd); k, v (B, Hkv, S, hd) with H a multiple of Hkv (grouped-query attention:
    query head i reads key/value head i // (H / Hkv)). `mask` is boolean (B, 1, T, S), True = attend.
    `extra_kv` = (k', v') of shape (B, Hkv, P, hd) prepended to every query's keys (prefix tuning).
    `attn_map` is an object adding a learned attention map (LMAM, lmam.py); `positions` = (query
    token positions (B, T), key token positions (B, S), key is a real token (B, S)). With
    `need_weights` the T×S attention probabilities are materialised and returned as well (for
    pictures and tests); otherwise the work stays in scaled_dot_product_attention. `dropout_p`:
    attention dropout on the probabilities (RoBERTa/BART fine-tuning; pass 0.0 in eval mode).
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
                               need_weights=need_weights, dropout_p=dropout_p)
    if need_weights:
        return attention_naive(q, k, v, mask, is_causal=is_causal, dropout_p=dropout_p)
    return sdpa(q, k, v, mask, is_causal, dropout_p), None


def sdpa(q, k, v, mask=None, is_causal=False, dropout_p=0.0):
    """scaled_dot_product_attention, with grouped-query attention when k, v have fewer heads."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                          enable_gqa=q.shape[1] != k.shape[1])


def attention_naive(q, k, v, mask=None, *, is_causal=False, bias=None, dropout_p=0.0):
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
    return F.dropout(probs, dropout_p) @ v, probs


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
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
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)
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

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
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
        self.lm_head = Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, p.dtype, p.device)

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
        padded = attention_mask is not None and not bool(attention_mask.all())   # (no sync without a mask)
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=device)
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        if positions is None:
            positions = token_positions(attention_mask)[:, past:]                   # (B, T)

        # Mask: key slot s is visible to query slot t if s <= t and s is a real token. A padded
        # query also sees itself, so that its (unused) softmax row is never empty.
        if not padded and (past == 0 or T == 1):
            mask, is_causal = None, T > 1         # no padding: SDPA's fastest kernels, no mask to build
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
# RoBERTa and BART / mBART (the paper's GLUE, XSum and WMT16 en-ro models)
#
# Both use the post-LN (BART, RoBERTa) or pre-LN (mBART) transformer layer of Vaswani et al. with
# learned absolute positions, biased projections and a GELU FFN. The module names follow BART's
# checkpoints (self_attn.{q,k,v,out}_proj, fc1, fc2, *_layer_norm); RoBERTa's checkpoint keys are
# mapped onto the same names at load time, so a PEFT method targets `q_proj` in all three models.

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class RobertaConfig:
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072
    vocab_size: int = 50265
    max_positions: int = 514       # learned positions; RoBERTa numbers them from pad_id + 1
    type_vocab_size: int = 1
    pad_id: int = 1
    norm_eps: float = 1e-5
    activation: str = "gelu"
    dropout: float = 0.1           # hidden_dropout_prob
    attention_dropout: float = 0.1
    num_labels: int = 0            # 0: no classification head; 1: regression (STS-B)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class BartConfig:
    dim: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    n_heads: int = 16
    hidden_dim: int = 4096
    vocab_size: int = 50265
    max_positions: int = 1024      # the position table has max_positions + 2 rows (offset 2)
    pad_id: int = 1
    eos_id: int = 2
    pre_norm: bool = False         # mBART: LayerNorm before each sub-block, plus final LayerNorms
    scale_embedding: bool = False  # mBART: token embeddings × √dim
    activation: str = "gelu"
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    generation: dict | None = None  # the checkpoint's generation settings (generation_config.json)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_layers(self) -> int:
        return self.encoder_layers + self.decoder_layers


class MultiHeadAttention(nn.Module):
    """Attention with biased projections, as self-attention (keys from x) or cross-attention
    (keys and values given, computed once from the encoder output by `kv`)."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, dim // n_heads, dropout
        self.q_proj = Linear(dim, dim)
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)
        self.prefix = None    # prefix tuning sets a module returning (k', v') for a batch size
        self.attn_map = None  # LMAM sets its map here

    def heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)                # (B, H, T, hd)

    def kv(self, x):
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def forward(self, x, mask=None, is_causal=False, positions=None, kv=None, cache=None, need_weights=False):
        B, T, D = x.shape
        q = self.heads(self.q_proj(x))
        if kv is None:                                  # self-attention
            k, v = self.kv(x)
            if cache is not None:
                k, v = cache.update(k, v)
        else:                                           # cross-attention
            k, v = kv
        extra_kv = self.prefix(B, x.dtype) if self.prefix is not None else None
        y, probs = attend(q, k, v, mask, is_causal=is_causal, extra_kv=extra_kv, attn_map=self.attn_map,
                          positions=positions, need_weights=need_weights,
                          dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D)), probs                # (B, T, D)


class FFN(nn.Module):
    """fc2(act(fc1(x))) with biases; an FFN-level adapter adds adapter(a, y) to the output, a being
    the block's input x, or in a pre-LN layer (mBART) the residual stream before the LayerNorm
    (He et al.'s placement)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.fc2 = Linear(hidden_dim, dim)
        self.act, self.activation_dropout = ACTIVATIONS[activation], activation_dropout
        self.adapter = None

    def forward(self, x, adapter_input=None):
        y = self.fc2(F.dropout(self.act(self.fc1(x)), self.activation_dropout, self.training))
        if self.adapter is not None:
            y = self.adapter(x if adapter_input is None else adapter_input, y)
        return y


class EncoderLayer(nn.Module):
    """x + sublayer(x), normalised after (post-LN: BART, RoBERTa) or before (pre-LN: mBART)."""

    def __init__(self, dim, n_heads, hidden_dim, activation, dropout, attention_dropout, activation_dropout,
                 norm_eps=1e-5, pre_norm=False):
        super().__init__()
        self.pre_norm, self.dropout = pre_norm, dropout
        self.self_attn = MultiHeadAttention(dim, n_heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = FFN(dim, hidden_dim, activation, activation_dropout)
        self.final_layer_norm = nn.LayerNorm(dim, eps=norm_eps)

    def residual(self, x, norm, f):
        """One sub-block with its residual connection and dropout."""
        if self.pre_norm:
            return x + F.dropout(f(norm(x)), self.dropout, self.training)
        return norm(x + F.dropout(f(x), self.dropout, self.training))

    def forward(self, x, mask, positions):
        x = self.residual(x, self.self_attn_layer_norm, lambda h: self.self_attn(h, mask, positions=positions)[0])
        return self.residual(x, self.final_layer_norm, lambda h: self.ffn(h, x))


class DecoderLayer(EncoderLayer):
    """Causal self-attention, cross-attention to the encoder output, FFN."""

    def __init__(self, dim, n_heads, hidden_dim, activation, dropout, attention_dropout, activation_dropout,
                 norm_eps=1e-5, pre_norm=False):
        super().__init__(dim, n_heads, hidden_dim, activation, dropout, attention_dropout, activation_dropout,
                         norm_eps, pre_norm)
        self.encoder_attn = MultiHeadAttention(dim, n_heads, attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x, self_mask, is_causal, enc_kv, enc_mask, positions, cache=None):
        x = self.residual(x, self.self_attn_layer_norm, lambda h: self.self_attn(
            h, self_mask, is_causal=is_causal, positions=positions, cache=cache)[0])
        x = self.residual(x, self.encoder_attn_layer_norm,
                          lambda h: self.encoder_attn(h, enc_mask, kv=enc_kv)[0])
        return self.residual(x, self.final_layer_norm, lambda h: self.ffn(h, x))


class ClassificationHead(nn.Module):
    """RoBERTa's sentence head on the <s> token: out_proj(tanh(dense(x[:, 0]))), dropout before each."""

    def __init__(self, dim: int, num_labels: int, dropout: float):
        super().__init__()
        self.dense = Linear(dim, dim)
        self.out_proj = Linear(dim, num_labels)
        self.dropout = dropout

    def forward(self, h):
        x = F.dropout(h[:, 0], self.dropout, self.training)
        x = torch.tanh(self.dense(x))
        return self.out_proj(F.dropout(x, self.dropout, self.training))


def padding_mask(attention_mask):
    """(B, S) 0/1 -> boolean key mask (B, 1, 1, S) for SDPA; None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]


class Roberta(nn.Module):
    """RoBERTa (Liu et al. 2019) with the GLUE classification head."""

    def __init__(self, cfg: RobertaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        self.embed_positions = nn.Embedding(cfg.max_positions, cfg.dim, padding_idx=cfg.pad_id)
        self.embed_token_types = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.layernorm_embedding = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.dim, cfg.n_heads, cfg.hidden_dim, cfg.activation, cfg.dropout,
                         cfg.attention_dropout, 0.0, cfg.norm_eps) for _ in range(cfg.n_layers))
        self.head = ClassificationHead(cfg.dim, cfg.num_labels, cfg.dropout) if cfg.num_labels else None
        self.gradient_checkpointing = False

    def encode(self, input_ids, attention_mask=None, need_weights=False):
        """input_ids (B, T) -> last hidden states (B, T, dim). Padding is where input_ids == pad_id
        (RoBERTa's positions skip it) or attention_mask == 0."""
        if attention_mask is None:
            attention_mask = (input_ids != self.cfg.pad_id).long()
        real = (input_ids != self.cfg.pad_id).long()
        pos = real.cumsum(-1) * real + self.cfg.pad_id                  # pads keep position pad_id
        if int(pos.max()) >= self.cfg.max_positions:
            raise ValueError(f"{int(real.sum(-1).max())} tokens, but this model has room for "
                             f"{self.cfg.max_positions - self.cfg.pad_id - 1} (max_position_embeddings "
                             f"{self.cfg.max_positions} minus padding_idx + 1): truncate the inputs")
        x = self.embed_tokens(input_ids) + self.embed_positions(pos) + self.embed_token_types(torch.zeros_like(input_ids))
        x = F.dropout(self.layernorm_embedding(x), self.cfg.dropout, self.training)
        mask = padding_mask(attention_mask)
        tp = token_positions(attention_mask)
        positions = (tp, tp, attention_mask.bool())                     # for an attention map (LMAM)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, positions, use_reentrant=False)
            else:
                x = layer(x, mask, positions)
        return x

    def forward(self, input_ids, attention_mask=None):
        """input_ids (B, T) -> the head's logits (B, num_labels)."""
        if self.head is None:
            raise ValueError("this RoBERTa has no classification head: load(path, num_labels=k) adds one")
        return self.head(self.encode(input_ids, attention_mask))


class Bart(nn.Module):
    """BART (Lewis et al. 2020) and mBART (Liu et al. 2020) for conditional generation."""

    def __init__(self, cfg: BartConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.shared = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_id)   # encoder, decoder, LM head
        self.embed_scale = math.sqrt(d) if cfg.scale_embedding else 1.0
        layer_args = (d, cfg.n_heads, cfg.hidden_dim, cfg.activation, cfg.dropout, cfg.attention_dropout,
                      cfg.activation_dropout, 1e-5, cfg.pre_norm)
        self.encoder = nn.Module()
        self.decoder = nn.Module()
        for part, n, cls in ((self.encoder, cfg.encoder_layers, EncoderLayer),
                             (self.decoder, cfg.decoder_layers, DecoderLayer)):
            part.embed_positions = nn.Embedding(cfg.max_positions + 2, d)       # BART's offset of 2
            part.layernorm_embedding = nn.LayerNorm(d)
            part.layers = nn.ModuleList(cls(*layer_args) for _ in range(n))
            part.layer_norm = nn.LayerNorm(d) if cfg.pre_norm else None
        self.register_buffer("final_logits_bias", torch.zeros(1, cfg.vocab_size))
        self.gradient_checkpointing = False

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.shared.weight
        return KVCache(self.cfg.decoder_layers, batch_size, self.cfg.n_heads, max_len, self.cfg.head_dim,
                       p.dtype, p.device)

    def embed(self, part, ids, past=0):
        if past + ids.shape[1] > self.cfg.max_positions:
            raise ValueError(f"{past + ids.shape[1]} tokens, but this model has {self.cfg.max_positions} positions "
                             f"(max_position_embeddings): truncate the inputs")
        pos = torch.arange(past, past + ids.shape[1], device=ids.device) + 2
        x = self.shared(ids) * self.embed_scale + part.embed_positions(pos)
        return F.dropout(part.layernorm_embedding(x), self.cfg.dropout, self.training)

    def run(self, layer, *args):
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def encode(self, input_ids, attention_mask=None):
        """Source tokens (B, S) -> encoder output (B, S, dim)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embed(self.encoder, input_ids)
        mask = padding_mask(attention_mask)
        tp = token_positions(attention_mask)
        positions = (tp, tp, attention_mask.bool())                     # for an attention map (LMAM)
        for layer in self.encoder.layers:
            x = self.run(layer, x, mask, positions)
        return self.encoder.layer_norm(x) if self.cfg.pre_norm else x

    def cross_kv(self, enc_out):
        """Keys and values of every decoder layer's cross-attention, computed once per source."""
        return [layer.encoder_attn.kv(enc_out) for layer in self.decoder.layers]

    def decode(self, decoder_input_ids, enc_kv, attention_mask=None, cache: KVCache | None = None,
               return_hidden=False):
        """Target tokens (B, T) -> logits (B, T, vocab), attending to the encoder through enc_kv
        (return_hidden: the final hidden states instead, for lm_loss)."""
        past = cache.length if cache is not None else 0
        x = self.embed(self.decoder, decoder_input_ids, past)
        enc_mask = padding_mask(attention_mask)
        T = decoder_input_ids.shape[1]
        # causal self-attention; with cached tokens and several new ones, an explicit (T, S) mask
        self_mask, is_causal = None, T > 1
        if past and T > 1:
            self_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)[None, None]
            is_causal = False
        tp = torch.arange(past, past + T, device=x.device).expand(x.shape[0], T)
        kp = torch.arange(past + T, device=x.device).expand(x.shape[0], past + T)
        positions = (tp, kp, torch.ones_like(kp, dtype=torch.bool))
        for layer, kv in zip(self.decoder.layers, enc_kv):
            x = self.run(layer, x, self_mask, is_causal, kv, enc_mask, positions, cache)
        if cache is not None:
            cache.advance(T)
        if self.cfg.pre_norm:
            x = self.decoder.layer_norm(x)
        if return_hidden:
            return x
        return linear(x, self.shared.weight) + self.final_logits_bias         # tied LM head

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, return_hidden=False):
        """Source (B, S) and decoder input (B, T) -> logits (B, T, vocab)."""
        enc = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, self.cross_kv(enc), attention_mask, return_hidden=return_hidden)


# The released checkpoints' shapes (roberta-base with a 2-label GLUE head).
ENCDEC_PRESETS = {
    "roberta-base": RobertaConfig(num_labels=2),
    "bart-large": BartConfig(),
    "mbart-large-cc25": BartConfig(vocab_size=250027, pre_norm=True, scale_embedding=True),
}
SHAPE_FIELDS = ("dim", "n_layers", "encoder_layers", "decoder_layers", "n_heads", "hidden_dim", "vocab_size",
                "max_positions", "pre_norm", "scale_embedding")


def shift_tokens_right(labels, pad_id: int, decoder_start_id: int | None):
    """Decoder inputs from labels (B, T) for teacher forcing, label value -100 meaning padding.
    BART: decoder_start_id followed by labels[:, :-1]. mBART (decoder_start_id=None): the last
    real token of each row (the target language code) wrapped around to the front."""
    labels = labels.masked_fill(labels == -100, pad_id)
    out = labels.roll(1, dims=1)
    if decoder_start_id is None:
        last = (labels != pad_id).sum(1) - 1
        out[:, 0] = labels.gather(1, last[:, None]).squeeze(1)
    else:
        out[:, 0] = decoder_start_id
    return out


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
    tied = getattr(model.cfg, "tie_embeddings", False)
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

def load(path: str, dtype=torch.float32, device="cpu", num_labels: int | None = None):
    """Read the checkpoint directory (or llama2.c .bin file) at `path` and return the model.

    The layout is detected from the files present (and the model from config.json's model_type:
    llama, roberta, bart, mbart); the model is built on the meta device and the tensors are
    assigned into it, so a checkpoint is never held twice in memory. `num_labels` (RoBERTa): the
    classification head's outputs; a fresh head is created where the checkpoint has none.
    """
    if num_labels is not None and not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: num_labels is for RoBERTa checkpoints (config.json with model_type roberta)")
    if os.path.isfile(path) and path.endswith(".bin") and not path.endswith("pytorch_model.bin"):
        return load_llama2c(path, dtype, device)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory or llama2.c .bin file")
    if os.path.exists(os.path.join(path, "config.json")):
        return load_hf(path, dtype, device, num_labels)
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
        raise CheckpointError(f"{file}: model_type {hf.get('model_type')!r} is not supported "
                              f"(expected llama, roberta, bart or mbart)")
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


def load_hf(path, dtype=torch.float32, device="cpu", num_labels=None):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    kind = hf.get("model_type", "llama")
    if kind == "roberta":
        return load_roberta(path, hf, dtype, device, num_labels)
    if kind in ("bart", "mbart"):
        return load_bart(path, hf, dtype, device)
    if num_labels is not None:
        raise CheckpointError(f"{file}: num_labels is for RoBERTa; this is a {kind!r} checkpoint")
    cfg = llama_config_from_hf(hf, file)
    tensors, origin = read_hf_tensors(path)
    # Hugging Face keys are ours with a "model." prefix (lm_head.weight has none).
    renamed = {k.removeprefix("model."): t for k, t in tensors.items()}
    origin = {k.removeprefix("model."): o for k, o in origin.items()}
    with torch.device("meta"):
        model = Llama(cfg)
    return assign_weights(model, renamed, origin, dtype, device, ignore=[r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"])


def require(hf: dict, keys, file: str):
    for key in keys:
        if key not in hf:
            raise CheckpointError(f"{file}: missing key {key!r}")


def rename(tensors, origin, key_map, unused, file_of_model):
    """Checkpoint keys -> ours through `key_map` [(regex, replacement)]; keys matching `unused`
    (parts of the checkpoint this model has no use for, e.g. a pretraining head) are dropped,
    any other key is an error naming its file."""
    out, out_origin = {}, {}
    for key, t in tensors.items():
        for pattern, repl in key_map:
            if re.fullmatch(pattern, key):
                new = re.sub(pattern, repl, key)
                out[new], out_origin[new] = t, origin[key]
                break
        else:
            if not any(re.fullmatch(p, key) for p in unused):
                raise CheckpointError(f"{origin[key]}: unexpected tensor {key!r} {tuple(t.shape)} for {file_of_model}")
    return out, out_origin


# Hugging Face RoBERTa keys -> ours (the "roberta." prefix is absent in bare RobertaModel checkpoints).
_R = r"(?:roberta\.)?"
ROBERTA_KEYS = [
    (_R + r"embeddings\.word_embeddings\.weight", "embed_tokens.weight"),
    (_R + r"embeddings\.position_embeddings\.weight", "embed_positions.weight"),
    (_R + r"embeddings\.token_type_embeddings\.weight", "embed_token_types.weight"),
    (_R + r"embeddings\.LayerNorm\.(weight|bias)", r"layernorm_embedding.\1"),
    (_R + r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"layers.\1.self_attn.q_proj.\2"),
    (_R + r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"layers.\1.self_attn.k_proj.\2"),
    (_R + r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"layers.\1.self_attn.v_proj.\2"),
    (_R + r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.self_attn.out_proj.\2"),
    (_R + r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.self_attn_layer_norm.\2"),
    (_R + r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.ffn.fc1.\2"),
    (_R + r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.ffn.fc2.\2"),
    (_R + r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"layers.\1.final_layer_norm.\2"),
    (r"classifier\.(dense|out_proj)\.(weight|bias)", r"head.\1.\2"),
]
ROBERTA_UNUSED = [_R + r"pooler\..*", r"lm_head\..*", _R + r"embeddings\.position_ids"]   # MLM head, pooler


def load_roberta(path, hf, dtype=torch.float32, device="cpu", num_labels=None):
    file = os.path.join(path, "config.json")
    require(hf, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings"), file)
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{file}: hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    tensors, origin = rename(*read_hf_tensors(path), ROBERTA_KEYS, ROBERTA_UNUSED, file)
    head = tensors.get("head.out_proj.weight")
    if head is not None and num_labels is not None and head.shape[0] != num_labels:
        raise CheckpointError(f"{origin['head.out_proj.weight']}: the classification head has {head.shape[0]} "
                              f"labels, num_labels={num_labels} was asked for")
    dropout = hf.get("hidden_dropout_prob", 0.1)
    cfg = RobertaConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                        hidden_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                        max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 1),
                        pad_id=hf.get("pad_token_id", 1), norm_eps=hf.get("layer_norm_eps", 1e-5), activation=act,
                        dropout=dropout, attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                        num_labels=head.shape[0] if head is not None else 0)
    with torch.device("meta"):
        model = Roberta(cfg)
    assign_weights(model, tensors, origin, dtype, device)
    if head is None and num_labels:                       # a fresh head: N(0, 0.02) weights, zero biases
        cfg.num_labels = num_labels
        model.head = ClassificationHead(cfg.dim, num_labels, hf.get("classifier_dropout") or dropout).to(device, dtype)
        for lin in (model.head.dense, model.head.out_proj):
            nn.init.normal_(lin.weight, std=hf.get("initializer_range", 0.02))
            nn.init.zeros_(lin.bias)
    return model


BART_KEYS = [
    (r"(?:model\.)?(encoder|decoder)\.layers\.(\d+)\.(fc1|fc2)\.(weight|bias)", r"\1.layers.\2.ffn.\3.\4"),
    (r"(?:model\.)?((?:encoder|decoder)\.(?:embed_positions|layernorm_embedding|layer_norm|layers\.\d+\.(?:"
     r"(?:self_attn|encoder_attn)\.(?:q|k|v|out)_proj|self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm))"
     r"\.(?:weight|bias))", r"\1"),
    (r"final_logits_bias", "final_logits_bias"),
]
# The token embedding is stored up to four times under these names (tied: one matrix).
BART_EMBEDDINGS = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                   "lm_head.weight", "shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
GENERATION_KEYS = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
                   "forced_eos_token_id", "num_beams", "max_length", "min_length", "no_repeat_ngram_size",
                   "length_penalty", "early_stopping")


def load_bart(path, hf, dtype=torch.float32, device="cpu"):
    file = os.path.join(path, "config.json")
    require(hf, ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                 "vocab_size", "max_position_embeddings"), file)
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(b, hf[a]) != hf[a]:
            raise CheckpointError(f"{file}: {a}={hf[a]} and {b}={hf[b]} differ; this implementation needs them equal")
    act = hf.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{file}: activation_function {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    # generation settings: generation_config.json, else the model config (as transformers does)
    gen_file = os.path.join(path, "generation_config.json")
    gen_src = hf
    if os.path.exists(gen_file):
        with open(gen_file) as f:
            gen_src = json.load(f)
    generation = {k: gen_src[k] for k in GENERATION_KEYS if gen_src.get(k) is not None}
    cfg = BartConfig(dim=hf["d_model"], encoder_layers=hf["encoder_layers"], decoder_layers=hf["decoder_layers"],
                     n_heads=hf["encoder_attention_heads"], hidden_dim=hf["encoder_ffn_dim"],
                     vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
                     pad_id=hf.get("pad_token_id", 1), eos_id=hf.get("eos_token_id", 2),
                     pre_norm=hf["model_type"] == "mbart", scale_embedding=hf.get("scale_embedding", False),
                     activation=act, dropout=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.0),
                     activation_dropout=hf.get("activation_dropout", 0.0), generation=generation)
    raw, raw_origin = read_hf_tensors(path)
    emb = [k for k in BART_EMBEDDINGS if k in raw]
    if not emb:
        raise CheckpointError(f"{', '.join(sorted(set(raw_origin.values())))}: no token embedding "
                              f"(expected one of {', '.join(BART_EMBEDDINGS[:4])})")
    for k in emb[1:]:
        if raw[k].shape != raw[emb[0]].shape or not torch.equal(raw[k], raw[emb[0]]):
            raise CheckpointError(f"{raw_origin[k]}: {k!r} differs from {emb[0]!r}; untied embeddings are not supported")
    tensors, origin = rename({k: t for k, t in raw.items() if k not in emb}, raw_origin, BART_KEYS, [], file)
    tensors["shared.weight"], origin["shared.weight"] = raw[emb[0]], raw_origin[emb[0]]
    with torch.device("meta"):
        model = Bart(cfg)
    return assign_weights(model, tensors, origin, dtype, device)


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

def load_sentencepiece(path: str):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except Exception as e:
        raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
    return sp


class SentencePieceTokenizer:
    """LLaMA 1/2 (and llama2.c) sentencepiece tokenizer.model."""

    def __init__(self, path: str):
        self.path, self.sp = path, load_sentencepiece(path)
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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (vocab.json and merges.txt are written
    in it): printable Latin-1 bytes map to themselves, the other 68 to chr(256 + k)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE (RoBERTa, BART) from a Hugging Face vocab.json + merges.txt, run by tiktoken.

    tiktoken wants {token bytes: rank} where merging always picks the lowest-ranked pair: single
    bytes get ranks 0-255 and merge line i gets rank 256 + i, which is GPT-2's merge priority. The
    ranks are then mapped to the checkpoint's ids through vocab.json (RoBERTa's ids are not GPT-2's:
    fairseq renumbered them by frequency). Special-token text in the input ("<mask>") is encoded as
    plain text.
    """

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab_file: str, merges_file: str):
        import numpy as np
        import tiktoken
        self.path = os.path.dirname(vocab_file)
        b2u = bytes_to_unicode()
        u2b = {c: b for b, c in b2u.items()}
        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{vocab_file}: cannot read the BPE vocabulary ({e})") from None
        ranks = {bytes([b]): i for i, b in enumerate(sorted(b2u))}
        with open(merges_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.startswith("#version") or not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{merges_file}:{n}: expected two space-separated tokens, got {line.rstrip()!r}")
                try:
                    merged = bytes(u2b[c] for c in parts[0] + parts[1])
                except KeyError as e:
                    raise ValueError(f"{merges_file}:{n}: character {e} is not in GPT-2's byte alphabet") from None
                ranks.setdefault(merged, len(ranks))
        self.enc = tiktoken.Encoding(name="gpt2-bpe", pat_str=self.PATTERN, mergeable_ranks=ranks, special_tokens={})
        rank_to_id = np.zeros(len(ranks), dtype=np.int64)
        for token, rank in ranks.items():
            text = "".join(b2u[b] for b in token)
            if text not in vocab:
                raise ValueError(f"{vocab_file}: has no entry for {text!r}, which {merges_file} builds")
            rank_to_id[rank] = vocab[text]
        self.rank_to_id = rank_to_id
        self.id_to_bytes = {i: bytes(u2b[c] for c in t) for t, i in vocab.items() if all(c in u2b for c in t)}
        self.special = {t: i for t, i in vocab.items() if t.startswith("<") and t.endswith(">") and len(t) > 2}
        for name, tok in (("bos_id", "<s>"), ("eos_id", "</s>"), ("pad_id", "<pad>"), ("unk_id", "<unk>")):
            if tok not in vocab:
                raise ValueError(f"{vocab_file}: missing special token {tok!r}")
            setattr(self, name, vocab[tok])
        self.mask_id = vocab.get("<mask>")
        self.vocab_size = max(vocab.values()) + 1

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """<s> text </s> (RoBERTa's and BART's single-sequence format)."""
        ids = self.rank_to_id[self.enc.encode_ordinary(text)].tolist()
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_pair(self, a: str, b: str | None = None, max_length: int | None = None) -> list[int]:
        """<s> A </s></s> B </s> (or <s> A </s>), cut to max_length tokens from the end of the texts
        as transformers' truncation="longest_first" does (the tokenizers library's rule: the shorter
        text keeps its length if the longer one can absorb the cut, else the shorter gets
        budget // 2 and the longer the rest)."""
        x = self.encode(a, bos=False, eos=False)
        y = self.encode(b, bos=False, eos=False) if b else None        # "" counts as no B, as in transformers
        if max_length is not None:
            budget = max_length - (4 if y is not None else 2)
            if budget < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the text")
            if y is None:
                x = x[:budget]
            elif len(x) + len(y) > budget:
                short, long = sorted((len(x), len(y)))
                long = short if short > budget else max(short, budget - short)
                if short + long > budget:
                    short, long = budget // 2, budget // 2 + budget % 2
                nx, ny = (long, short) if len(x) > len(y) else (short, long)
                x, y = x[:nx], y[:ny]
        if y is None:
            return [self.bos_id] + x + [self.eos_id]
        return [self.bos_id] + x + [self.eos_id, self.eos_id] + y + [self.eos_id]

    def decode(self, ids, skip_special: bool = True) -> str:
        inv = {i: t for t, i in self.special.items()}
        out = b"".join(self.id_to_bytes.get(int(i), b"") if int(i) not in inv else
                       (b"" if skip_special else inv[int(i)].encode()) for i in ids)
        return out.decode("utf-8", errors="replace")


class MBartTokenizer:
    """mBART's sentencepiece model with fairseq's ids: <s>=0 <pad>=1 </s>=2 <unk>=3, piece p at
    sentencepiece id + 1 (sentencepiece's own <unk>, id 0, becomes 3), then the 25 language codes,
    then <mask>. A sequence is `text </s> lang_code` (source and target alike)."""

    LANGUAGE_CODES = ["ar_AR", "cs_CZ", "de_DE", "en_XX", "es_XX", "et_EE", "fi_FI", "fr_XX", "gu_IN", "hi_IN",
                      "it_IT", "ja_XX", "kk_KZ", "ko_KR", "lt_LT", "lv_LV", "my_MM", "ne_NP", "nl_XX", "ro_RO",
                      "ru_RU", "si_LK", "tr_TR", "vi_VN", "zh_CN"]
    OFFSET = 1

    def __init__(self, path: str):
        self.path, self.sp = path, load_sentencepiece(path)
        n = self.sp.GetPieceSize()
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.lang_code_to_id = {c: n + self.OFFSET + i for i, c in enumerate(self.LANGUAGE_CODES)}
        self.mask_id = n + self.OFFSET + len(self.LANGUAGE_CODES)
        self.vocab_size = self.mask_id + 1

    def lang_id(self, lang: str) -> int:
        if lang not in self.lang_code_to_id:
            raise ValueError(f"unknown mBART language code {lang!r}; valid: {', '.join(self.LANGUAGE_CODES)}")
        return self.lang_code_to_id[lang]

    def encode(self, text: str, lang: str | None = None) -> list[int]:
        """text </s> lang_code (without lang_code when lang is None)."""
        ids = [i + self.OFFSET if i else self.unk_id for i in self.sp.EncodeAsIds(text)]
        return ids + [self.eos_id] + ([self.lang_id(lang)] if lang is not None else [])

    def decode(self, ids, skip_special: bool = True) -> str:
        n = self.sp.GetPieceSize()
        pieces = [int(i) - self.OFFSET for i in ids if 4 <= int(i) < n + self.OFFSET]
        return self.sp.DecodeIds(pieces)


def load_tokenizer(path: str):
    """A tokenizer from a file or a checkpoint directory: vocab.json + merges.txt (GPT-2 BPE:
    RoBERTa, BART), sentencepiece.bpe.model / sentence.bpe.model (mBART), tokenizer.model in
    sentencepiece format (LLaMA 1/2, llama2.c) or tiktoken format (LLaMA 3)."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "vocab.json")):
            merges = os.path.join(path, "merges.txt")
            if not os.path.exists(merges):
                raise ValueError(f"{path}: has vocab.json but no merges.txt (GPT-2 BPE needs both)")
            return GPT2BPETokenizer(os.path.join(path, "vocab.json"), merges)
        for name in ("sentencepiece.bpe.model", "sentence.bpe.model"):
            if os.path.exists(os.path.join(path, name)):
                return MBartTokenizer(os.path.join(path, name))
        if not os.path.exists(os.path.join(path, "tokenizer.model")):
            raise ValueError(f"{path}: no tokenizer found (expected tokenizer.model, vocab.json + merges.txt, "
                             f"or sentencepiece.bpe.model)")
        path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such tokenizer file")
    if os.path.basename(path) in ("sentencepiece.bpe.model", "sentence.bpe.model"):
        return MBartTokenizer(path)
    with open(path, "rb") as f:
        first = f.readline(4096)
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path)


# -----------------------------------------------------------------------------
# The language-model loss

class LinearCrossEntropy(torch.autograd.Function):
    """Σ_rows cross_entropy(h Wᵀ + b, labels) without materialising the (N, V) logits: rows go
    through in chunks, and each chunk's gradient (softmax − target) is turned into dh (and dW when
    W trains) right away, so only (chunk, V) floats live at a time. Backward scales the saved dh,
    dW. With V = 32000 and N = 2048 this avoids ~0.5 GB of logits, their log-softmax and its
    gradient: 2-2.7x less peak memory per training step (bench.py). The matrix products are the
    same, so the speed is the plain path's, except where fresh memory is slow (glibc on a VM:
    bench.py). Label smoothing ε as torch's cross_entropy: (1 − ε)·NLL + ε·mean_j(−log p_j)."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, label_smoothing, chunk, needs_grad):
        N, V = h.shape[0], weight.shape[0]
        eps = float(label_smoothing)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if needs_grad else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if needs_grad and weight.requires_grad else None
        buf = None
        for s in range(0, N, chunk):
            hc, y = h[s:s + chunk], labels[s:s + chunk]
            valid = (y != -100).unsqueeze(1)
            y = y.clamp(min=0).unsqueeze(1)
            if buf is None:
                z = hc @ weight.t()                                            # (c, V) logits
                # reused by the next chunks (a fresh 64 MB each costs page faults); not when autocast
                # changed the dtype: out= bypasses it
                buf = z if z.dtype == hc.dtype == weight.dtype else None
            else:
                z = torch.mm(hc, weight.t(), out=buf[:len(hc)])
            z = z.float()
            if bias is not None:
                z += bias.float()
            z_y = z.gather(1, y)
            z_mean = z.mean(-1, keepdim=True) if eps else None
            m = z.amax(-1, keepdim=True)
            p = z.sub_(m).exp_()                                               # in place: no other (c, V) buffer
            total = p.sum(-1, keepdim=True)
            lse = m + total.log()                                              # log Σ exp(z)
            nll = lse - z_y
            if eps:
                nll = (1 - eps) * nll + eps * (lse - z_mean)
            loss += (nll * valid).sum()
            if not needs_grad:
                continue
            g = p.mul_(valid / total)                                          # softmax; 0 on ignored rows
            g.scatter_add_(1, y, -(1 - eps) * valid.to(g.dtype))
            if eps:
                g.sub_(eps / V * valid)
            g = g.to(weight.dtype)
            dh[s:s + chunk] = g @ weight
            if dw is not None:
                dw.addmm_(g.t().float(), hc.float())
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad, None if dw is None else (dw * grad).to(ctx.weight_dtype), None, None, None, None, None


def lm_loss(hidden, head, labels, bias=None, label_smoothing=0.0, chunk=None):
    """Summed cross-entropy of the logits head(hidden) + bias against labels (-100: ignored), fp32.

    hidden (..., d), labels (...). `head`: the LM head module, or its weight (V, d) when it is tied
    to the embedding (BART). A weight or a plain bias-free Linear goes through
    LinearCrossEntropy; a head that a PEFT method has wrapped computes its logits."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if not (isinstance(head, torch.Tensor) or (type(head) in (nn.Linear, Linear) and head.bias is None)):
        logits = head(h).float() + (0 if bias is None else bias.float())
        return F.cross_entropy(logits, y, ignore_index=-100, label_smoothing=label_smoothing, reduction="sum")
    weight = head if isinstance(head, torch.Tensor) else head.weight
    chunk = chunk or max(64, 2 ** 24 // weight.shape[0])              # (chunk, V) fp32: 64 MB at most
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return LinearCrossEntropy.apply(h, weight, bias, y, label_smoothing, chunk, needs_grad)


# -----------------------------------------------------------------------------
# Generation

def constrain(scores, seqs, *, eos_id=None, min_length=0, no_repeat_ngram_size=0, forced_bos_id=None,
              forced_eos_id=None, max_length=None):
    """transformers' logits processors, in its order, for the token after seqs (N, L):
    no_repeat_ngram_size (a token that would repeat an n-gram of seqs gets -inf), min_length (no
    EOS while L < min_length), forced BOS (only forced_bos_id when L == 1) and forced EOS (only
    forced_eos_id when L == max_length - 1). scores (N, V) -> scores."""
    N, V = scores.shape
    L = seqs.shape[1]
    n = no_repeat_ngram_size
    if n and L >= n:
        windows = seqs.unfold(1, n, 1)                                        # (N, L - n + 1, n)
        seen = (windows[..., :-1] == seqs[:, L - n + 1:][:, None]).all(-1)  # n-grams starting with the last n-1 tokens
        banned = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(seen, windows[..., -1].clamp(max=V), V), True)
        scores = scores.masked_fill(banned[:, :V], float("-inf"))
    if eos_id is not None and L < min_length:
        scores = scores.clone()
        scores[:, eos_id] = float("-inf")
    for token, at in ((forced_bos_id, 1), (forced_eos_id, None if max_length is None else max_length - 1)):
        if token is not None and L == at:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, token] = 0
    return scores


def decode_loop(step, reorder, prompt, max_length, num_beams=1, eos_id=None, pad_id=None, length_penalty=1.0,
                early_stopping=False, **rules):
    """Greedy decoding (num_beams=1) or beam search over a model given as two functions, shared by
    decoder-only and encoder-decoder models.

    step(tokens (N, t)) -> fp32 logits (N, V) for the next token, the model keeping its own KV cache
    (t = prompt length on the first call, then 1); reorder(idx) reorders that cache (beam search).
    prompt (B, T): the tokens already there (LLaMA: the prompt; BART: the decoder start token).
    max_length counts them. `rules`: constrain()'s settings. Returns (B, T + generated).

    Beam search follows transformers (generation/utils.py `_beam_search`): each step takes the top
    2·num_beams continuations over all beams; those ending in EOS among the first num_beams become
    finished hypotheses scored logp / generated_length ** length_penalty; the best num_beams not
    ending in EOS keep running. A prompt is done when its best running beam, scored at the current
    length, cannot beat its worst finished hypothesis, or (early_stopping=True) as soon as it has
    num_beams finished hypotheses; everything stops at max_length.
    """
    B, T = prompt.shape
    K, device = num_beams, prompt.device
    if max_length <= T:
        raise ValueError(f"max_length={max_length} leaves no room after the {T} tokens already there")
    rules = dict(rules, eos_id=eos_id, max_length=max_length)
    if K == 1:                                                # greedy; finished rows get pad_id
        seqs, done, tokens = prompt, torch.zeros(B, dtype=torch.bool, device=device), prompt
        for _ in range(T, max_length):
            nxt = constrain(step(tokens), seqs, **rules).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id if pad_id is not None else eos_id), nxt)
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            if eos_id is not None:
                done = done | (nxt == eos_id)
                if bool(done.all()):
                    break
            tokens = nxt[:, None]
        return seqs

    fill = pad_id if pad_id else (eos_id if eos_id is not None else -1)     # as transformers fills
    running = torch.full((B, K, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :T] = prompt[:, None]
    run_scores = torch.zeros(B, K, device=device)
    run_scores[:, 1:] = -1e9                        # all beams start equal: expand only the first
    finished = running.clone()
    fin_scores = torch.full((B, K), -1e9, device=device)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    improvable = torch.ones(B, dtype=torch.bool, device=device)
    tokens = prompt.repeat_interleave(K, dim=0)
    batch = torch.arange(B, device=device)[:, None]

    for cur in range(T, max_length):
        logp = constrain(step(tokens).log_softmax(-1), running[:, :, :cur].reshape(B * K, cur), **rules)
        V = logp.shape[-1]
        cand = (logp.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        top_scores, top_idx = cand.topk(2 * K, dim=-1)                             # (B, 2K)
        beam, tok = top_idx // V, top_idx % V
        cand_seqs = running[batch, beam]                                           # (B, 2K, max_length)
        cand_seqs[:, :, cur] = tok
        ends = (tok == eos_id) if eos_id is not None else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= max_length:
            ends = torch.ones_like(ends)                                           # max length reached

        # Running beams for the next step: the best K candidates that did not end.
        keep = (top_scores - 1e9 * ends.float()).topk(K, dim=-1).indices
        running = cand_seqs[batch, keep]
        run_scores = (top_scores - 1e9 * ends.float())[batch, keep]
        parent = beam[batch, keep]

        # Finished hypotheses: merge candidates that ended (among the first K) into the finished set.
        new_scores = top_scores / ((cur + 1 - T) ** length_penalty)
        full = fin_done.all(-1) & (early_stopping is True)
        ok = ends & (torch.arange(2 * K, device=device) < K)[None] & (improvable & ~full)[:, None]
        new_scores = new_scores - 1e9 * (~ok).float()
        all_scores = torch.cat([fin_scores, new_scores], dim=1)
        best = all_scores.topk(K, dim=-1).indices
        finished = torch.cat([finished, cand_seqs], dim=1)[batch, best]
        fin_done = torch.cat([fin_done, ok], dim=1)[batch, best]
        fin_len = torch.cat([fin_len, torch.full_like(tok, cur + 1 - T)], dim=1)[batch, best]
        fin_scores = all_scores[batch, best]

        # Can a running beam still beat the worst finished one?
        best_len = (max_length - T) if early_stopping == "never" and length_penalty > 0 else (cur + 1 - T)
        best_possible = run_scores[:, 0] / (best_len ** length_penalty)
        worst = torch.where(fin_done.all(-1), fin_scores.min(-1).values, torch.full_like(best_possible, -1e9))
        improvable = improvable & (best_possible > worst)
        all_full = bool(fin_done.all()) and early_stopping is True
        if not bool(improvable.any()) or bool(ends.all()) or all_full:
            break
        reorder((parent + batch * K).view(-1))
        tokens = running[:, :, cur].reshape(B * K, 1)

    out_len = T + int(fin_len[:, 0].max())
    return finished[:, 0, :out_len]


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens=32, num_beams=1, eos_id=None, pad_id=0,
             length_penalty=1.0, early_stopping=False, min_length=0, no_repeat_ngram_size=0):
    """Continue each prompt of a decoder-only model (LLaMA) with greedy decoding or beam search.

    input_ids (B, T), left-padded when prompts differ in length, with attention_mask (B, T) marking
    real tokens. Returns (B, T + generated) token ids, prompts included, like transformers'
    `generate(do_sample=False, num_beams=...)`: finished greedy rows are filled with `pad_id`, and
    beam search returns the best finished hypothesis per prompt (see decode_loop).
    """
    model.eval()
    B, T = input_ids.shape
    K = num_beams
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).repeat_interleave(K, 0)
    cache = model.new_cache(B * K, T + max_new_tokens)
    state = {"mask": mask}

    def step(tokens):
        if cache.length:                                  # one new real token per row
            state["mask"] = F.pad(state["mask"], (0, 1), value=1)
        h = model(tokens, attention_mask=state["mask"], cache=cache, return_hidden=True)
        return model.lm_head(h[:, -1]).float()           # the LM head on the last position only

    return decode_loop(step, cache.reorder, input_ids, T + max_new_tokens, K, eos_id, pad_id, length_penalty,
                       early_stopping, min_length=min_length, no_repeat_ngram_size=no_repeat_ngram_size)


@torch.no_grad()
def generate_seq2seq(model, input_ids, attention_mask=None, **settings):
    """Generate target sequences with an encoder-decoder model (BART, mBART), token-identical to
    transformers' `generate`. input_ids (B, S) right-padded sources with attention_mask.

    settings (each defaults to the checkpoint's generation config, model.cfg.generation, then to
    transformers' defaults): num_beams (1), max_length (20, counting the decoder start token),
    min_length (0), length_penalty (1.0), no_repeat_ngram_size (0), early_stopping (False),
    decoder_start_token_id, forced_bos_token_id (mBART-50: the target language code),
    forced_eos_token_id, eos_token_id, pad_token_id.
    Returns (B, L) decoder tokens starting with the decoder start token.
    """
    known = ("num_beams", "max_length", "min_length", "length_penalty", "no_repeat_ngram_size", "early_stopping",
             "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id", "eos_token_id", "pad_token_id")
    unknown = set(settings) - set(known)
    if unknown:
        raise ValueError(f"unknown generation settings {sorted(unknown)}; valid: {', '.join(known)}")
    g = dict(num_beams=1, max_length=20, min_length=0, length_penalty=1.0, no_repeat_ngram_size=0,
             early_stopping=False, eos_token_id=model.cfg.eos_id, pad_token_id=model.cfg.pad_id)
    g.update(model.cfg.generation or {})
    g.update({k: v for k, v in settings.items() if v is not None})
    start = g.get("decoder_start_token_id", g.get("bos_token_id"))
    if start is None:
        raise ValueError("no decoder_start_token_id in the settings or the checkpoint's generation config")
    model.eval()
    B, K = input_ids.shape[0], g["num_beams"]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    enc = model.encode(input_ids, attention_mask).repeat_interleave(K, dim=0)   # (B·K, S, dim)
    enc_kv = model.cross_kv(enc)     # beams of one source share it: reordering beams never moves it
    enc_mask = attention_mask.repeat_interleave(K, dim=0)
    cache = model.new_cache(B * K, g["max_length"])

    def step(tokens):
        return model.decode(tokens, enc_kv, enc_mask, cache)[:, -1].float()

    prompt = torch.full((B, 1), start, dtype=torch.long, device=input_ids.device)
    return decode_loop(step, cache.reorder, prompt, g["max_length"], K, g["eos_token_id"], g["pad_token_id"],
                       g["length_penalty"], g["early_stopping"], min_length=g["min_length"],
                       no_repeat_ngram_size=g["no_repeat_ngram_size"],
                       forced_bos_id=g.get("forced_bos_token_id"), forced_eos_id=g.get("forced_eos_token_id"))
