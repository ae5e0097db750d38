"""The transformer architectures the paper fine-tunes, written out by hand: modules and shapes only.

  - LLaMA 1/2/3 (Touvron et al. 2023; Meta 2024): RMSNorm, rotary position embeddings (RoPE),
    grouped-query attention, SwiGLU feed-forward, a KV cache for decoding;
  - RoBERTa (Liu et al. 2019) with the GLUE classification head;
  - BART (Lewis et al. 2020) and mBART (Liu et al. 2020), encoder-decoder;
  - DeBERTa-v2/v3 (He et al. 2021) with disentangled attention and the GLUE classification head.
Each comes with its config dataclass and the presets of the released shapes (LLAMA_PRESETS,
ENCDEC_PRESETS). The rest of the machinery lives next to this file, one concern per file:
  - checkpoint.py (with checkpoint_meta.py, checkpoint_gguf.py): reading checkpoints (Hugging
    Face, Meta, llama2.c, GGUF) into these models, the safetensors reader/writer, `build()`;
  - tokenizer.py: the tokenizers (sentencepiece, tiktoken, GPT-2 BPE, mBART);
  - generate.py: greedy decoding and beam search (decoder-only and encoder-decoder);
  - loss.py: the language-model loss, written out and with the LM head fused into the cross-entropy.

This file implements no PEFT method, no training loop and no benchmark. A model's forward builds
one AttnState (mask, token positions, KV cache, RoPE tables, ...) and hands it to every layer.
The PEFT methods (methods.py) attach through:
  - every projection is an nn.Linear with a stable name (q_proj, k_proj, v_proj, o_proj /
    out_proj, gate_proj, up_proj, down_proj, fc1, fc2: the names of the Hugging Face
    checkpoints), so a method can swap it for a wrapper that owns the same `weight`;
  - `attend(...)`, the one attention function, with `extra_kv` (an attention's `prefix`: prefix
    keys/values) and `attn_map` (an object that computes the attention with a learned map added:
    lmam.py; DeBERTa's attention asks it for its terms instead);
  - `MLP.adapter` / `FFN.adapter` / `MultiHeadAttention.adapter`: where an adapter adds its term
    after a sub-block (in RoBERTa/BART, as He et al.: the FFN's after the block's dropout, the
    attention's before it);
  - `Llama.s2_ratio`: LongLoRA's shifted sparse attention in training (shifted_sparse_attention).
Training reaches it only through dropout, `gradient_checkpointing` and the modules' train() mode.
Positions are token positions (0 at each sequence's first real token, independent of padding),
computed once per forward (map_positions) and passed down in the AttnState.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

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
    name: str | None = None       # the checkpoint's name, for presets.py (set by checkpoint.build / load)
    # RoPE scaling (rope_cos_sin): None, {"rope_type": "linear", "factor": f} (position interpolation,
    # LongLoRA) or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} (Llama 3.1 / 3.2); read from config.json by checkpoint.py
    rope_scaling: dict | None = None

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
    # SmolLM2-135M(-Instruct), HuggingFaceTB: a real pretrained LLaMA-architecture model small enough
    # for a CPU (its config.json; GQA with 3 KV heads, tied embeddings)
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                         norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    # tiny shapes for tests and the CPU demo
    "llama-tiny":     dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=176,
                           vocab_size=512, max_seq_len=256),
    "llama-tiny-gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176,
                           vocab_size=512, max_seq_len=256, rope_theta=500000.0, norm_eps=1e-5),
}


def preset_name(cfg) -> str | None:
    """The preset whose config fields a loaded config has (shapes, norm_eps, rope_theta, vocab):
    the checkpoint's name for presets.py. LLaMA-7B and LLaMA2-7B differ only in norm_eps."""
    if not isinstance(cfg, LlamaConfig):
        shape = lambda c: {k: v for k, v in vars(c).items() if k in SHAPE_FIELDS}
        return next((n for n, p in ENCDEC_PRESETS.items() if type(p) is type(cfg) and shape(p) == shape(cfg)), None)
    for name, p in LLAMA_PRESETS.items():
        if all(getattr(cfg, k) == v for k, v in p.items() if k != "max_seq_len") and \
                all(getattr(cfg, f.name) == f.default for f in fields(LlamaConfig)
                    if f.name not in p and f.name not in ("max_seq_len", "tie_embeddings", "name")):
            return name
    return None


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


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None):
    """RoPE's frequencies θ_i = theta^(-2i/hd), i < hd/2 (Su et al. 2021), with an optional scaling:
      - linear (position interpolation, Chen et al. 2023, used by LongLoRA): position p is read as
        p / factor, i.e. every θ_i is divided by factor;
      - llama3 (Llama 3.1, Meta's llama-models `apply_scaling`): with λ_i = 2π/θ_i and L the
        original context, wavelengths longer than L/low_freq_factor are divided by factor, shorter
        than L/high_freq_factor kept, and in between θ_i is interpolated as (1 − s)·θ_i/factor + s·θ_i,
        s = (L/λ_i − low_freq_factor) / (high_freq_factor − low_freq_factor).
    The same float32 operations as transformers' modeling_rope_utils, so the logits match."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)     # long waves: / factor
        s = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - s) * scaled / factor + s * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"RoPE scaling {kind!r} is not supported (linear, llama3)")
    return inv_freq


def rope_cos_sin(positions, head_dim: int, theta: float, dtype, scaling: dict | None = None):
    """cos/sin tables for RoPE at the given token positions (B, T) -> each (B, 1, T, head_dim);
    `scaling`: LlamaConfig.rope_scaling (rope_inv_freq)."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    angles = positions.float()[..., None] * inv_freq          # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)               # (B, T, hd): the "rotate_half" layout
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + hd/2) of each head (Hugging Face's layout; Meta's interleaved pairs
    (2i, 2i+1) are converted at load time by permuting the rows of wq and wk)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class AttnState:
    """What every attention layer of one forward reads besides its input: built once per forward
    (Llama.forward, Roberta.encode, Bart.encode / decode, Deberta.encode) and passed down whole.

    mask: boolean, True = attend: (B, 1, T, S) or a key mask (B, 1, 1, S); None: nothing to mask.
    is_causal: causal attention without a mask (SDPA's fastest kernels).
    positions: (query token positions (B, T), key token positions (B, S), key slot is a real token
      (B, S)): where an attention map (attn_map) reads each query and key (map_positions).
    cache: the KV cache (decoding). rope: the (cos, sin) tables of the queries (LLaMA).
    s2: (group, wrap): LongLoRA's shifted sparse attention (training; shifted_sparse_attention).
    rel: DeBERTa's (relative embeddings (2k, D), their bucket index (T, T)).
    need_weights: also return the (B, H, T, S) attention probabilities (pictures, tests)."""
    mask: torch.Tensor | None = None
    is_causal: bool = False
    positions: tuple | None = None
    cache: KVCache | None = None
    rope: tuple | None = None
    s2: tuple | None = None
    rel: tuple | None = None
    need_weights: bool = False


def token_positions(attention_mask):
    """Position of each token counted from its sequence's first real token; 0 on padding.
    attention_mask (B, S) of 0/1 -> (B, S) long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def map_positions(attention_mask, past: int = 0):
    """AttnState.positions for key slots attention_mask (B, S) of 0/1, the queries being the slots
    after the `past` cached ones: (query positions (B, S - past), key positions (B, S), real (B, S))."""
    keys = token_positions(attention_mask)
    return keys[:, past:], keys, attention_mask.bool()


def causal_mask(attention_mask, past: int, T: int, device):
    """(mask, is_causal) of T new query slots after `past` cached ones: key slot s is visible to
    query slot t if s <= t and s is a real token (attention_mask (B, past + T); None: no padding).
    A padded query also sees itself, so that its (unused) softmax row is never empty."""
    if attention_mask is None and (past == 0 or T == 1):
        # no mask to build: causal from the start (T = 1 included: a 1×1 causal mask is no mask),
        # one new token attending to the whole cache otherwise. is_causal is a Python bool, never a
        # function of T, so a compiled graph does not depend on it.
        return None, past == 0
    q_slot = torch.arange(past, past + T, device=device)[:, None]
    k_slot = torch.arange(past + T, device=device)[None, :]
    mask = (k_slot <= q_slot)[None]                                              # (1, T, S)
    if attention_mask is not None:
        mask = (mask & attention_mask.bool()[:, None, :]) | (k_slot == q_slot)  # (B, T, S)
    return mask[:, None], False                                                  # (B or 1, 1, T, S)


def padding_mask(attention_mask):
    """(B, S) 0/1 -> boolean key mask (B, 1, 1, S) for SDPA; None without a mask. (The mask's values
    are not inspected: that would be a host-device sync on every forward.)"""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]


def attend(q, k, v, state: AttnState, *, extra_kv=None, attn_map=None, dropout_p=0.0):
    """softmax(q kᵀ / √d + mask) v, the one attention function of this file; returns (y, probs or None).

    q (B, H, T, hd); k, v (B, Hkv, S, hd) with H a multiple of Hkv (grouped-query attention:
    query head i reads key/value head i // (H / Hkv)). `state`: the forward's AttnState (mask,
    is_causal, need_weights: the T×S probabilities materialised and returned, s2).
    `extra_kv` = (k', v') of shape (B, Hkv, P, hd) prepended to every query's keys (prefix tuning).
    `attn_map`: an object adding a learned attention map, which then computes the attention
    itself (its attend(q, k, v, state, dropout_p): LMAM, lmam.py). `dropout_p`: attention dropout
    on the probabilities (RoBERTa/BART fine-tuning; pass 0.0 in eval mode).
    """
    if state.s2 is not None and (state.mask is not None or not state.is_causal or extra_kv is not None):
        raise ValueError("S²-Attn (--s2_ratio) needs causal rows without padding or a prefix: LongLoRA's "
                         "rows of exactly L tokens")
    if extra_kv is not None:
        k, v, state = with_prefix(q, k, v, extra_kv, state)
    if attn_map is not None:
        return attn_map.attend(q, k, v, state, dropout_p=dropout_p)
    if state.s2 is not None:
        return shifted_sparse_attention(q, k, v, *state.s2), None
    if state.need_weights:
        return attention_naive(q, k, v, state.mask, is_causal=state.is_causal, dropout_p=dropout_p)
    return sdpa(q, k, v, state.mask, state.is_causal, dropout_p), None


def with_prefix(q, k, v, extra_kv, state: AttnState):
    """Keys and values with the prefix (k', v') (B, Hkv, P, hd) in front, and the state's mask
    widened to match: every query sees every prefix key."""
    pk, pv = extra_kv
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)                 # (B, Hkv, P + S, hd)
    mask, is_causal = state.mask, state.is_causal
    if mask is None and is_causal:
        T, S = q.shape[2], k.shape[2] - pk.shape[2]
        mask, is_causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None], False
    if mask is not None:
        prefix_ok = torch.ones(*mask.shape[:-1], pk.shape[2], dtype=torch.bool, device=q.device)
        mask = torch.cat([prefix_ok, mask], dim=-1)                              # (B, 1, T, P + S)
    return k, v, replace(state, mask=mask, is_causal=is_causal)


def shifted_sparse_attention(q, k, v, group: int, wrap: bool = False):
    """S²-Attn (LongLoRA, Chen et al. 2024, §3.2), its training-time attention: causal attention
    within groups of `group` tokens; query heads [H/2, H) use groups shifted by group/2, so that
    information flows between neighbouring groups.

      wrap=False (LongLoRA's code since 2023-10, its flash-attention version, the default): the
        shifted heads' groups are [0, G/2), [G/2, 3G/2), ..., [L − G/2, L).
      wrap=True (the paper's Algorithm 1, a roll): the shifted heads' last group is [L − G/2, L)
        followed by [0, G/2), and tokens 0..G/2−1 attend to the last G/2 tokens (the future).

    q (B, H, L, hd); k, v (B, Hkv, L, hd) (grouped-query: repeated to H heads first, as LongLoRA
    applies it after repeat_kv); L a multiple of `group`, `group` even. Nothing L×L is built: the
    groups become SDPA's batch, (B·L/G, heads, G, hd)."""
    B, H, L, hd = q.shape
    if group <= 0 or L % group or group % 2:
        raise ValueError(f"S²-Attn: {L} tokens cannot be cut into groups of {group} shifted by half a group "
                         f"(the group must divide the length and be even: L = 4·G with the default ratio 1/4)")
    k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    n, half, shift = L // group, H // 2, group // 2

    def grouped(x):                                      # (B, h, L, hd) -> (B·n, h, G, hd)
        return x.unflatten(2, (n, group)).transpose(1, 2).flatten(0, 1)

    def ungrouped(y):                                    # (B·n, h, G, hd) -> (B, h, L, hd)
        return y.unflatten(0, (B, n)).transpose(1, 2).flatten(2, 3)

    plain = ungrouped(F.scaled_dot_product_attention(*(grouped(x[:, :half]) for x in (q, k, v)), is_causal=True))
    # the shifted heads: roll left by G/2, so that group j holds tokens [G/2 + jG, G/2 + (j+1)G)
    rolled = [grouped(x[:, half:].roll(-shift, dims=2)) for x in (q, k, v)]
    mask = None
    if not wrap:    # the last group holds [L − G/2, L) then [0, G/2): two segments, each causal alone
        pos = torch.arange(group, device=q.device)
        second = pos >= shift
        last = (second[:, None] == second[None, :]) & (pos[None, :] <= pos[:, None])
        mask = torch.ones(n, group, group, dtype=torch.bool, device=q.device).tril()
        mask[-1] = last
        mask = mask.repeat(B, 1, 1)[:, None]                                     # (B·n, 1, G, G)
    shifted = F.scaled_dot_product_attention(*rolled, attn_mask=mask, is_causal=mask is None)
    return torch.cat([plain, ungrouped(shifted).roll(shift, dims=2)], dim=1)      # (B, H, L, hd)


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
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.prefix = None    # prefix tuning sets a module returning (k', v') for a batch size
        self.attn_map = None  # LMAM sets its map here

    def forward(self, x, state: AttnState):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, *state.rope), apply_rope(k, *state.rope)
        if state.cache is not None:
            k, v = state.cache.update(k, v)                                             # (B, Hkv, S, hd)
        extra_kv = self.prefix(B, x.dtype) if self.prefix is not None else None
        y, probs = attend(q, k, v, state, extra_kv=extra_kv, attn_map=self.attn_map)
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

    def forward(self, x, state: AttnState):
        a, probs = self.self_attn(self.input_layernorm(x), state)
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

    def reorder(self, idx, start: int = 0):
        """Row i takes row idx[i]'s keys and values (beam search: each beam its parent's). Slots
        before `start` must already be equal in every row that idx maps onto each other (a prompt's
        beams share the prompt), so only slots [start, length) are moved."""
        if start == 0 or len(idx) != self.k[0].shape[0]:                # a new number of rows: copy all
            self.k = [k.index_select(0, idx) for k in self.k]
            self.v = [v.index_select(0, idx) for v in self.v]
            return
        for buf in self.k + self.v:
            part = buf[:, :, start:self.length]                          # (B, Hkv, generated, hd)
            part.copy_(part.index_select(0, idx))


def run_layer(model, layer, *args):
    """layer(*args); recomputed in the backward pass instead of keeping its activations when the
    model trains with gradient_checkpointing (activation checkpointing)."""
    if model.gradient_checkpointing and model.training:
        return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


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
        self.s2_ratio, self.s2_wrap = 0.0, False   # S²-Attn in training (LongLoRA): group = ratio × length

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.cfg.n_layers, batch_size, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, p.dtype, p.device)

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, need_weights=False,
                return_hidden=False, positions=None):
        """input_ids (B, T) -> logits (B, T, vocab).

        attention_mask (B, S) with 1 for real tokens and 0 for padding (left or right), where S is T,
        or, when decoding with `cache`, the cached length plus T. Give no mask when nothing is padded:
        then SDPA runs its fastest causal kernels, and nothing here looks at the mask's values (no
        host-device sync; one graph under torch.compile). positions (B, T): the queries' token
        positions, for RoPE and an attention map (default: counted from each row's first real token).
        With need_weights=True returns (logits, [attention probabilities per layer]); with
        return_hidden=True the final hidden states (B, T, dim) instead of the logits.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0                 # a Python int, never a tensor
        device = input_ids.device
        room = self.cfg.max_seq_len * (self.cfg.rope_scaling or {}).get("factor", 1)
        if past + T > room:                                              # a shape check: no sync
            raise ValueError(f"{past + T} positions, but this model was trained for {self.cfg.max_seq_len}"
                             + ("" if room == self.cfg.max_seq_len else f" (× RoPE scaling: {room:g})") +
                             ": interpolate positions (LongLoRA: --method longlora) or shorten the input")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + T)}")
        real = torch.ones(B, past + T, dtype=torch.long, device=device) if attention_mask is None else attention_mask
        q_pos, k_pos, k_real = map_positions(real, past)                 # (B, T), (B, S), (B, S)
        positions = q_pos if positions is None else positions
        mask, is_causal = causal_mask(attention_mask, past, T, device)
        # LongLoRA's S²-Attn in training mode only (evaluation uses full attention, as LongLoRA does)
        s2 = (int(T * self.s2_ratio), self.s2_wrap) if self.training and self.s2_ratio and cache is None else None

        x = self.embed_tokens(input_ids)
        rope = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype, self.cfg.rope_scaling)
        state = AttnState(mask, is_causal, positions=(positions, k_pos, k_real), cache=cache, rope=rope, s2=s2,
                          need_weights=need_weights)
        all_probs = []
        for layer in self.layers:
            x, probs = run_layer(self, layer, x, state)
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
class EncoderConfig:
    """What the two encoders, RoBERTa and DeBERTa, share (roberta-base's values)."""
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072
    vocab_size: int = 50265
    max_positions: int = 514       # RoBERTa: learned positions, numbered from pad_id + 1
    type_vocab_size: int = 1       # 0: no token-type embedding (DeBERTa v3)
    pad_id: int = 1
    norm_eps: float = 1e-5
    activation: str = "gelu"
    dropout: float = 0.1           # hidden_dropout_prob (DeBERTa: also on the relative embeddings, per layer)
    attention_dropout: float = 0.1
    num_labels: int = 0            # 0: no classification head; 1: regression (STS-B)
    name: str | None = None        # the checkpoint's name, for presets.py (set by checkpoint.build / load)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class RobertaConfig(EncoderConfig):
    """roberta-base."""


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
    name: str | None = None         # the checkpoint's name, for presets.py (set by checkpoint.build / load)
    model_type: str = "bart"        # "bart" or "mbart" (the checkpoint's model_type): mBART adds language codes

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
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.prefix = None    # prefix tuning sets a module returning (k', v') for a batch size
        self.attn_map = None  # LMAM sets its map here
        self.adapter = None   # Houlsby's adapter on this block's output, applied by the layer before its dropout

    def heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)                # (B, H, T, hd)

    def kv(self, x):
        return self.heads(self.k_proj(x)), self.heads(self.v_proj(x))

    def forward(self, x, state: AttnState, kv=None):
        """x (B, T, D) -> (output (B, T, D), probabilities or None); kv: cross-attention's (k, v)."""
        B, T, D = x.shape
        q = self.heads(self.q_proj(x))
        if kv is None:                                  # self-attention
            k, v = self.kv(x)
            if state.cache is not None:
                k, v = state.cache.update(k, v)
        else:                                           # cross-attention
            k, v = kv
        extra_kv = self.prefix(B, x.dtype) if self.prefix is not None else None
        y, probs = attend(q, k, v, state, extra_kv=extra_kv, attn_map=self.attn_map,
                          dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D)), probs                # (B, T, D)


class FFN(nn.Module):
    """fc2(act(fc1(x))) with biases. `adapter`: an FFN-level adapter (Adapter-FFN, Houlsby's), which
    the layer applies to this block's output after the residual dropout, as He et al. do."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act, self.activation_dropout = ACTIVATIONS[activation], activation_dropout
        self.adapter = None

    def forward(self, x):
        return self.fc2(F.dropout(self.act(self.fc1(x)), self.activation_dropout, self.training))


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

    def residual(self, x, norm, f, adapter=None, inner=None):
        """One sub-block with its residual connection and dropout, with adapters where He et al.'s
        code puts them: `inner` (the attention's Houlsby adapter) on the block's output before the
        dropout (RoBERTa: dense → adapter → dropout; BART/mBART: right after out_proj, inside the
        attention module, the layer's dropout afterwards); `adapter` (the FFN's: Adapter-FFN,
        Houlsby's) after it (dense → dropout → adapter). Both are called adapter(x, y), x the
        residual stream (in a pre-LN layer, mBART, before the LayerNorm: He et al.'s placement)."""
        y = f(norm(x) if self.pre_norm else x)
        if inner is not None:
            y = inner(x, y)
        y = F.dropout(y, self.dropout, self.training)
        if adapter is not None:
            y = adapter(x, y)
        return x + y if self.pre_norm else norm(x + y)

    def forward(self, x, state: AttnState):
        """-> (x, the attention probabilities or None)"""
        probs = []
        def attention(h):
            y, p = self.self_attn(h, state)
            probs.append(p)
            return y
        x = self.residual(x, self.self_attn_layer_norm, attention, inner=self.self_attn.adapter)
        x = self.residual(x, self.final_layer_norm, self.ffn, self.ffn.adapter)
        return x, probs[0]


class DecoderLayer(EncoderLayer):
    """Causal self-attention, cross-attention to the encoder output, FFN."""

    def __init__(self, dim, n_heads, hidden_dim, activation, dropout, attention_dropout, activation_dropout,
                 norm_eps=1e-5, pre_norm=False):
        super().__init__(dim, n_heads, hidden_dim, activation, dropout, attention_dropout, activation_dropout,
                         norm_eps, pre_norm)
        self.encoder_attn = MultiHeadAttention(dim, n_heads, attention_dropout)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x, state: AttnState, enc_kv, enc_state: AttnState):
        """state: the causal self-attention's; enc_kv, enc_state: the cross-attention's keys and
        values (Bart.cross_kv) and its state (the source's padding)."""
        x = self.residual(x, self.self_attn_layer_norm, lambda h: self.self_attn(h, state)[0],
                          inner=self.self_attn.adapter)
        x = self.residual(x, self.encoder_attn_layer_norm, lambda h: self.encoder_attn(h, enc_state, enc_kv)[0],
                          inner=self.encoder_attn.adapter)
        return self.residual(x, self.final_layer_norm, self.ffn, self.ffn.adapter)


class ClassificationHead(nn.Module):
    """The GLUE head on the first token: out_proj(dropout(act(dense(dropout(x[:, 0]))))).
    RoBERTa: tanh, one dropout for both; DeBERTa (transformers' ContextPooler + classifier): its
    pooler's activation and dropout first, the classifier's dropout (cls_dropout) second."""

    def __init__(self, dim: int, num_labels: int, dropout: float, activation=torch.tanh,
                 out_dropout: float | None = None):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, num_labels)
        self.act = activation
        self.dropout, self.out_dropout = dropout, dropout if out_dropout is None else out_dropout

    def forward(self, h):
        x = F.dropout(h[:, 0].to(self.dense.weight.dtype), self.dropout, self.training)  # an fp32 head on bf16 states
        x = self.act(self.dense(x))
        return self.out_proj(F.dropout(x, self.out_dropout, self.training))


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
        (RoBERTa's positions skip it) or attention_mask == 0. need_weights=True: also every layer's
        attention probabilities (B, H, T, T), an attention map's term (attn_map) included, to look at."""
        if attention_mask is None:
            attention_mask = (input_ids != self.cfg.pad_id).long()
        real = (input_ids != self.cfg.pad_id).long()
        pos = real.cumsum(-1) * real + self.cfg.pad_id                  # pads keep position pad_id
        room = self.cfg.max_positions - self.cfg.pad_id - 1
        if input_ids.shape[1] > room:                                   # a shape check: no sync
            raise ValueError(f"{input_ids.shape[1]} tokens, but this model has room for {room} "
                             f"(max_position_embeddings {self.cfg.max_positions} minus padding_idx + 1): "
                             f"truncate the inputs")
        x = self.embed_tokens(input_ids) + self.embed_positions(pos) + self.embed_token_types(torch.zeros_like(input_ids))
        x = F.dropout(self.layernorm_embedding(x), self.cfg.dropout, self.training)
        state = AttnState(padding_mask(attention_mask), positions=map_positions(attention_mask),
                          need_weights=need_weights)
        all_probs = []
        for layer in self.layers:
            x, probs = run_layer(self, layer, x, state)
            all_probs.append(probs)
        return (x, all_probs) if need_weights else x

    def forward(self, input_ids, attention_mask=None):
        """input_ids (B, T) -> the head's logits (B, num_labels)."""
        if self.head is None:
            raise ValueError("this RoBERTa has no classification head: checkpoint.load(path, num_labels=k) adds one")
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

    def encode(self, input_ids, attention_mask=None, need_weights=False):
        """Source tokens (B, S) -> encoder output (B, S, dim); need_weights=True: also every encoder
        layer's attention probabilities (B, H, S, S), an attention map's term included."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.embed(self.encoder, input_ids)
        state = AttnState(padding_mask(attention_mask), positions=map_positions(attention_mask),
                          need_weights=need_weights)
        all_probs = []
        for layer in self.encoder.layers:
            x, probs = run_layer(self, layer, x, state)
            all_probs.append(probs)
        x = self.encoder.layer_norm(x) if self.cfg.pre_norm else x
        return (x, all_probs) if need_weights else x

    def cross_kv(self, enc_out):
        """Keys and values of every decoder layer's cross-attention, computed once per source."""
        return [layer.encoder_attn.kv(enc_out) for layer in self.decoder.layers]

    def decode(self, decoder_input_ids, enc_kv, attention_mask=None, cache: KVCache | None = None,
               return_hidden=False):
        """Target tokens (B, T) -> logits (B, T, vocab), attending to the encoder through enc_kv
        (return_hidden: the final hidden states instead, for lm_loss)."""
        past = cache.length if cache is not None else 0
        x = self.embed(self.decoder, decoder_input_ids, past)
        (B, T), device = decoder_input_ids.shape, x.device
        real = torch.ones(B, past + T, dtype=torch.long, device=device)      # no mask: pads come after a target
        state = AttnState(*causal_mask(None, past, T, device), positions=map_positions(real, past), cache=cache)
        enc_state = AttnState(padding_mask(attention_mask))
        for layer, kv in zip(self.decoder.layers, enc_kv):
            x = run_layer(self, layer, x, state, kv, enc_state)
        if cache is not None:
            cache.advance(T)
        if self.cfg.pre_norm:
            x = self.decoder.layer_norm(x)
        if return_hidden:
            return x
        return F.linear(x, self.shared.weight) + self.final_logits_bias         # tied LM head

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, return_hidden=False):
        """Source (B, S) and decoder input (B, T) -> logits (B, T, vocab)."""
        enc = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, self.cross_kv(enc), attention_mask, return_hidden=return_hidden)


# -----------------------------------------------------------------------------
# DeBERTa-v2/v3 (He et al. 2021; DeBERTaV3: He, Gao, Chen 2021), Table 11's GLUE model
#
# RoBERTa's post-LN layer (EncoderLayer, the same module names, so methods attach as they do to
# RoBERTa) with *disentangled* attention: no absolute positions; every layer adds to the content
# scores qᵢ·kⱼ a content-to-position term qᵢ·k_r[δ(i, j)] and a position-to-content term
# kⱼ·q_r[δ(i, j)], where q_r, k_r are the layer's own q_proj / k_proj applied to one table of
# relative-position embeddings shared by all layers (share_att_key), normalised by a LayerNorm
# (norm_rel_ebd), and δ(i, j) is i − j in log buckets. The three terms are scaled by 1/√(3·hd).
# Only the configuration of the v3 checkpoints is built (relative_attention, pos_att_type
# "p2c|c2p", share_att_key, norm_rel_ebd "layer_norm", no absolute positions, no conv layer);
# checkpoint.load_deberta rejects the others by name.

@dataclass
class DebertaConfig(EncoderConfig):
    """microsoft/deberta-v3-base: EncoderConfig's fields with its values, and its own below."""
    vocab_size: int = 128100
    max_positions: int = 512          # max_position_embeddings: the relative span when max_relative_positions < 1
    type_vocab_size: int = 0
    pad_id: int = 0
    norm_eps: float = 1e-7
    position_buckets: int = 256       # relative positions in log buckets of this size; <= 0: none
    max_relative_positions: int = -1  # the largest distance the buckets reach; < 1: max_positions
    pooler_activation: str = "gelu"   # the GLUE head: dense + this activation on token 0 ([CLS])
    pooler_dropout: float = 0.0
    cls_dropout: float | None = None  # before the classifier; None: dropout (transformers' rule)

    @property
    def max_relative(self) -> int:
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_positions

    @property
    def span(self) -> int:
        """k: relative positions are clamped to [-k, k) and the shared table has 2k rows."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative


def log_bucket(rel, buckets: int, max_position: int):
    """DeBERTa's relative-position buckets: distances below buckets/2 are kept, longer ones are
    mapped logarithmically so that max_position lands on bucket buckets − 1 (same sign). Computed
    in fp32 as transformers' make_log_bucket_position."""
    mid = buckets // 2
    sign = torch.sign(rel)
    near = (rel < mid) & (rel > -mid)
    abs_pos = torch.where(near, torch.full_like(rel, mid - 1), rel.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(abs_pos <= mid, rel.float(), log_pos * sign).long()


def relative_positions(T: int, S: int, cfg: DebertaConfig, device):
    """(T, S) relative position of query slot i to key slot j: i − j, log-bucketed. Slots, not
    token positions: only differences matter, and they are the same for real tokens however the
    batch is padded."""
    rel = torch.arange(T, device=device)[:, None] - torch.arange(S, device=device)[None, :]
    if cfg.position_buckets > 0:
        rel = log_bucket(rel, cfg.position_buckets, cfg.max_relative)
    return rel


class DisentangledAttention(MultiHeadAttention):
    """DeBERTa's self-attention with MultiHeadAttention's slots (q/k/v/out_proj, prefix, attn_map,
    adapter), computing the (B, H, T, S) probabilities itself (the position terms are not SDPA's):

        scores = (q kᵀ + c2p + p2c) / √(3·hd),   c2p[i, j] = qᵢ·k_r[idx(i, j)],  p2c[i, j] = kⱼ·q_r[idx(i, j)]

    with k_r = k_proj(rel), q_r = q_proj(rel) (the layer's own projections, biases included, on the
    shared relative embeddings) and idx(i, j) = clamp(δ(i, j) + k, 0, 2k − 1). (transformers
    writes p2c with −δ(j, i), the same index: δ is antisymmetric.)
    An attention map (attn_map) gives its terms on the (B, H, T, S) token grid through
    attn_map.terms(positions, n_keys): one added to the scores before the softmax, one added to
    the probabilities after it (lmam.py's LMAM.terms). Prefix keys (prefix tuning) carry no
    position: their scores are the content term alone."""

    def __init__(self, dim: int, n_heads: int, dropout: float, rel_dropout: float):
        super().__init__(dim, n_heads, dropout)
        self.rel_dropout = rel_dropout        # transformers' pos_dropout (hidden_dropout_prob), per layer

    def forward(self, x, state: AttnState):
        """x (B, T, D); state.mask (B, 1, 1, T) boolean key mask; state.rel = (relative embeddings
        (2k, D), their bucket index (T, T)). Returns (output (B, T, D), probabilities (B, H, T, S) or None)."""
        B, T, D = x.shape
        (rel_emb, idx), mask = state.rel, state.mask
        q, k, v = self.heads(self.q_proj(x)), *self.kv(x)                            # (B, H, T, hd)
        rel_emb = F.dropout(rel_emb, self.rel_dropout, self.training)[None]          # (1, 2k, D)
        k_r, q_r = self.heads(self.k_proj(rel_emb)), self.heads(self.q_proj(rel_emb))   # (1, H, 2k, hd)
        index = idx.expand(B, self.n_heads, T, T)
        c2p = torch.gather(q @ k_r.transpose(-1, -2), -1, index)                     # (B, H, T, T)
        p2c = torch.gather(k @ q_r.transpose(-1, -2), -1, index.transpose(-1, -2)).transpose(-1, -2)
        scale = math.sqrt(self.head_dim * 3)
        scores = (q @ k.transpose(-1, -2) + c2p + p2c) / scale
        if self.prefix is not None:                                                   # content term only
            pk, pv = self.prefix(B, x.dtype)                                          # (B, H, P, hd)
            scores = torch.cat([q @ pk.transpose(-1, -2) / scale, scores], dim=-1)
            v = torch.cat([pv, v], dim=2)
            if mask is not None:
                mask = F.pad(mask, (pk.shape[2], 0), value=True)
        before = after = None                # an attention map's terms on the (B, H, T, S) grid, fp32
        if self.attn_map is not None:
            before, after = self.attn_map.terms(state.positions, n_keys=scores.shape[-1])
        if before is not None:                                                        # added to the scores
            scores = scores + before.to(scores.dtype)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        y = F.dropout(probs, self.dropout, self.training) @ v
        if after is not None:                                                         # added to the probabilities
            y = y + after.to(v.dtype) @ v
            probs = probs + after.to(probs.dtype)
        y = self.out_proj(y.transpose(1, 2).reshape(B, T, D))
        return y, (probs if state.need_weights else None)


class DebertaLayer(EncoderLayer):
    """RoBERTa's post-LN layer with disentangled attention (no dropout after the FFN's activation)."""

    def __init__(self, cfg: DebertaConfig):
        super().__init__(cfg.dim, cfg.n_heads, cfg.hidden_dim, cfg.activation, cfg.dropout, cfg.attention_dropout,
                         0.0, cfg.norm_eps)
        self.self_attn = DisentangledAttention(cfg.dim, cfg.n_heads, cfg.attention_dropout, cfg.dropout)


def deberta_head(cfg: DebertaConfig) -> ClassificationHead:
    """DeBERTa's GLUE head: the pooler's activation and dropout, then the classifier's dropout."""
    return ClassificationHead(cfg.dim, cfg.num_labels, cfg.pooler_dropout, ACTIVATIONS[cfg.pooler_activation],
                              cfg.dropout if cfg.cls_dropout is None else cfg.cls_dropout)


class Deberta(nn.Module):
    """DeBERTa-v2/v3 (microsoft/deberta-v3-base) with the GLUE classification head; Roberta's interface."""

    def __init__(self, cfg: DebertaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_id)
        self.embed_token_types = nn.Embedding(cfg.type_vocab_size, cfg.dim) if cfg.type_vocab_size > 0 else None
        self.layernorm_embedding = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(DebertaLayer(cfg) for _ in range(cfg.n_layers))
        self.rel_embeddings = nn.Embedding(2 * cfg.span, cfg.dim)        # shared by every layer
        self.rel_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = deberta_head(cfg) if cfg.num_labels else None
        self.gradient_checkpointing = False

    def encode(self, input_ids, attention_mask=None, need_weights=False, token_type_ids=None):
        """input_ids (B, T) -> last hidden states (B, T, dim). Padding is where attention_mask == 0
        (default: input_ids == pad_id). token_type_ids: segment ids, used only by checkpoints with
        a type embedding (v3 has none). need_weights=True: also every layer's attention
        probabilities (B, H, T, T), an attention map's term included. A padded query row attends to the real
        keys (transformers': evenly to every key); either way no real token ever sees it."""
        if attention_mask is None:
            attention_mask = (input_ids != self.cfg.pad_id).long()
        x = self.embed_tokens(input_ids)
        if self.embed_token_types is not None:
            x = x + self.embed_token_types(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        x = self.layernorm_embedding(x) * attention_mask[..., None].to(x.dtype)     # padding zeroed, as transformers
        x = F.dropout(x, self.cfg.dropout, self.training)
        T, k = input_ids.shape[1], self.cfg.span
        rel_emb = self.rel_layer_norm(self.rel_embeddings.weight).to(x.dtype)          # (2k, D), every layer's
        idx = (relative_positions(T, T, self.cfg, input_ids.device) + k).clamp(0, 2 * k - 1)   # (T, T) rows of it
        state = AttnState(padding_mask(attention_mask), positions=map_positions(attention_mask), rel=(rel_emb, idx),
                          need_weights=need_weights)
        all_probs = []
        for layer in self.layers:
            x, probs = run_layer(self, layer, x, state)
            all_probs.append(probs)
        return (x, all_probs) if need_weights else x

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """input_ids (B, T) -> the head's logits (B, num_labels)."""
        if self.head is None:
            raise ValueError("this DeBERTa has no classification head: checkpoint.load(path, num_labels=k) adds one")
        return self.head(self.encode(input_ids, attention_mask, token_type_ids=token_type_ids))


# The released checkpoints' shapes (roberta-base with a 2-label GLUE head).
ENCDEC_PRESETS = {
    "roberta-base": RobertaConfig(num_labels=2),
    "bart-large": BartConfig(),
    "mbart-large-cc25": BartConfig(vocab_size=250027, pre_norm=True, scale_embedding=True, model_type="mbart"),
    "deberta-v3-base": DebertaConfig(num_labels=2),           # microsoft/deberta-v3-base's config.json
}
SHAPE_FIELDS = ("dim", "n_layers", "encoder_layers", "decoder_layers", "n_heads", "hidden_dim", "vocab_size",
                "max_positions", "pre_norm", "scale_embedding", "model_type")


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
