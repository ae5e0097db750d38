"""LMAM, the Low-rank Multi-head Attention Map (Li et al. 2025, "LoRaDA", Section 3.2, App. A.1).

A learned map is added to the attention probabilities of self-attention, after the softmax:

    PE_pos = 1 / 10000^(2·pos/n)                                  Eq. 7
    Attn_s = (Wa + PE_rows) · (Wb + PE_cols) · s                  Eq. 8-10, Wa: (h_s, n, r), Wb: (h_s, r, n)
    Attn_s = Attn_s ⊙ M_causal          (decoders only)          Eq. 11
    O = (softmax(QKᵀ/√d) + Attn_s) · V                           Eq. 12-13

Map index i is a *token position* (0 at each sequence's first real token), so padding never
moves it. With N tokens: the map covers positions [0, min(n, N)) (Eq. 14-15); in "tail" mode it
covers the last n tokens of each sequence instead (Eq. 16; with N < n, the map's bottom-right
N×N block). When h_s < h, head i uses map i mod h_s (torch's repeat, Eq. 17).
Parameters: 2·h_s·n·r per layer (full_rank: h_s·n²).

Computation: (softmax(S) + A)·V = SDPA(Q, K, V) + A·V. The main attention stays in
scaled_dot_product_attention; the extra term gathers the values of the n tokens on the map
(B, h, n, hd), multiplies them once by the (h, n, n) map, u = Attn_s·V_map, O(h·n²·hd), and hands
each query the row of u at its map index (a query's row of A·V only depends on its map index).
Nothing T×T is built. A naive path that materialises the (B, h, T, S) map is kept for tests and
pictures (`need_weights=True`). `merge()` computes Attn_s once for inference.

Ablations (Table 9): variant "pre_softmax" (¬N: softmax(QKᵀ/√d + Attn_s)·V, which needs the
dense bias), "softmax_map" (¬S: + softmax(Attn_s) over keys), "full_rank" (¬L, FMAM: a trainable
(h_s, n, n) map, no positional term), "no_pos" (¬P).

Initialisation and parametrisation (the paper gives no initialisation). Two modes:

  init="zero" (default). The stored factors are wa = √s·Wa and wb = √s·Wb, so
      Attn_s = s·(Wa + PE)(Wb + PE) = (wa + √s·PE)(wb + √s·PE),
  the same function of (Wa, Wb) at every point (Eq. 8-10), with s absorbed into the factors.
  wa ~ N(0, 1/r) and wb = −√s·PE, so Attn_s ≡ 0 at step 0: the adapted model is the base model,
  as with LoRA's B = 0. Why absorb s: Adam moves every parameter by about lr per step whatever
  its gradient's size. With the paper's s = 1/(4096·600) and factors in the literal
  parametrisation, a step of lr = 1e-4 on Wa changes Attn_s by about s·|Wb|·lr, so the map can
  never grow to the size of an attention probability; in the absorbed one a step changes it by
  about |wb|·lr, and s is left only in the offsets √s·PE. (Without weight decay this is the
  trajectory of an lr multiplier of 1/√s on the literal factors, up to Adam's ε; with AdamW's
  decoupled decay it is not: the multiplier also multiplies the decay, lr·wd, by 1/√s.)
  A consequence at the paper's LLaMA s (≈ 4e-7, √s ≈ 6e-4): PE and s are inert. In wb the
  offset −√s·PE is constant and Adam ignores it; in wa, √s·PE is 1.6e-4 of wa's norm. Any
  parametrisation in which the map grows to ~0.1 needs factors with s·|Wa||Wb|·r ≈ 0.1, i.e. of a
  few hundred in the paper's units, next to which PE (≤ 1) adds s·r·PE·PE ≤ 1e-6 and cross terms
  s·r·|W|·PE ≤ 3e-4. So the ¬P ablation (variant "no_pos") and the choice of s among Table 19's
  values give nearly the same map on LLaMA (README, "Why LMAM absorbs s", for the numbers); on
  BART's s = 1, PE is as large as wa and they differ.
  init="paper": the literal reading, for faithfulness studies. Wa, Wb ~ N(0, 1) stored as they
  are, Attn_s = s·(Wa + PE)(Wb + PE). It is not the base model at step 0 (for s = 1, Attn_s[0, 0]
  ≈ r from the PE term alone) and, for LLaMA's s, the map barely moves at lr 1e-4: there PE does
  shape the map (its term is as large as the random one), but the map stays ~1e-6.
FMAM (variant "full_rank", ¬L of §4.3): the full (h, n, n) map of every head, trained directly,
no factors and no s, starting at 0.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import attention_naive, sdpa, shifted_sparse_attention

VARIANTS = ("default", "pre_softmax", "softmax_map", "full_rank", "no_pos")
INITS = ("zero", "paper")


class LMAM(nn.Module):
    def __init__(self, n_heads: int, h_s: int, rank: int, length: int, scale: float, causal: bool,
                 variant: str = "default", tail: bool = False, init: str = "zero", device=None):
        """n_heads: the layer's attention heads h; h_s: the maps (h_s divides h, Eq. 17); rank r;
        length n (the map is n×n); scale s; causal: decoders (Eq. 11)."""
        super().__init__()
        if h_s <= 0 or n_heads % h_s:
            divisors = [d for d in range(1, n_heads + 1) if n_heads % d == 0]
            raise ValueError(f"--lmam_heads {h_s}: the model's {n_heads} attention heads are not divisible by it "
                             f"(h_s must divide them: {', '.join(map(str, divisors))})")
        if rank <= 0 or length <= 0:
            raise ValueError(f"lmam_rank and lmam_len must be positive, got {rank} and {length}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown lmam_variant {variant!r}; valid: {', '.join(VARIANTS)}")
        if init not in INITS:
            raise ValueError(f"unknown lmam_init {init!r}; valid: {', '.join(INITS)}")
        if variant != "full_rank" and not scale > 0:
            raise ValueError(f"lmam_scale must be positive, got {scale}")
        if variant == "full_rank":                          # ¬L: every head has its own map, no s
            h_s, scale = n_heads, 1.0
        self.n_heads, self.h_s, self.rank, self.length = n_heads, h_s, rank, length
        self.scale, self.causal, self.variant, self.tail, self.init = float(scale), causal, variant, tail, init
        pe = 1.0 / 10000 ** (2 * torch.arange(length, device=device, dtype=torch.float32) / length)   # Eq. 7
        self.register_buffer("pe", pe, persistent=False)
        if variant == "full_rank":
            self.w = nn.Parameter(torch.zeros(h_s, length, length, device=device))
        elif init == "paper":                               # literal: Wa, Wb ~ N(0, 1) as stored
            self.root, self.gain = 1.0, self.scale
            self.wa = nn.Parameter(torch.randn(h_s, length, rank, device=device))
            self.wb = nn.Parameter(torch.randn(h_s, rank, length, device=device))
        else:                                               # zero: √s absorbed, Attn_s ≡ 0 at step 0
            self.root, self.gain = self.scale ** 0.5, 1.0
            self.wa = nn.Parameter(torch.randn(h_s, length, rank, device=device) * rank ** -0.5)
            self.wb = nn.Parameter(torch.zeros(h_s, rank, length, device=device))
            if variant != "no_pos":
                with torch.no_grad():
                    self.wb.copy_(-self.root * pe.expand(h_s, rank, length))
        self.merged_map = None

    def attn_map(self, params=None):
        """Attn_s (h_s, n, n), causal-masked for decoders (Eq. 7-11). `params`: {"wa", "wb"} or {"w"}
        to use instead of the module's own (a sharded model's, gathered: map_sizes)."""
        if self.merged_map is not None:
            return self.merged_map
        params = params or {}
        if self.variant == "full_rank":
            a = params.get("w", self.w)                                         # ¬L: the map itself
        else:
            wa, wb = self.factors(params.get("wa", self.wa), params.get("wb", self.wb))
            a = (wa @ wb) * self.gain                                           # Eq. 10 (gain: s, or 1 if absorbed)
        if self.causal:
            keep = torch.ones(self.length, self.length, dtype=torch.bool, device=a.device).tril()
            if self.variant == "softmax_map":
                a = a.masked_fill(~keep, float("-inf"))
            else:
                a = a * keep                                                    # Eq. 11
        if self.variant == "softmax_map":
            a = a.softmax(dim=-1)
        return a

    def merge(self):
        """Inference: compute Attn_s once and reuse it."""
        with torch.no_grad():
            self.merged_map = None
            self.merged_map = self.attn_map().detach()

    def unmerge(self):
        self.merged_map = None

    # -- where each token falls on the map ------------------------------------------------------
    def map_index(self, pos, valid, lengths):
        """Map index of each token (B, L) -> (index clamped into [0, n), in-map mask)."""
        idx = pos - (lengths[:, None] - self.length) if self.tail else pos
        ok = valid & (idx >= 0) & (idx < self.length)
        return idx.clamp(0, self.length - 1), ok

    def heads_map(self, a):
        return a.repeat(self.n_heads // self.h_s, 1, 1)                      # Eq. 17: head i -> i mod h_s

    def dense(self, qi, qok, ki, kok):
        """The map on the (B, h, T, S) grid of query and key slots (naive path, ¬N and pictures)."""
        a = self.heads_map(self.attn_map()).to(torch.float32)                  # (h, n, n)
        d = a[:, qi[:, :, None], ki[:, None, :]]                               # (h, B, T, S)
        return (d * (qok[:, :, None] & kok[:, None, :])).transpose(0, 1)       # (B, h, T, S)

    def map_indices(self, positions, n_keys: int):
        """(query map index, query on the map, key map index, key on the map), (B, T) and (B, S):
        positions = AttnState.positions; key slots in front of those positions describe (n_keys
        of them in all) are prefix keys, never on the map."""
        q_pos, k_pos, k_valid = positions
        P = n_keys - k_pos.shape[1]
        if P:
            k_pos, k_valid = F.pad(k_pos, (P, 0)), F.pad(k_valid, (P, 0), value=False)
        lengths = k_valid.sum(-1)
        return (*self.map_index(q_pos, torch.ones_like(q_pos, dtype=torch.bool), lengths),
                *self.map_index(k_pos, k_valid, lengths))

    def terms(self, positions, n_keys: int):
        """(term added to the scores, term added to the probabilities), one of them None, each on the
        (B, h, T, S = n_keys) grid in fp32: for an attention that builds its probabilities itself
        (DeBERTa's disentangled attention). ¬N (pre_softmax) adds the map to the scores, every
        other variant to the probabilities (Eq. 12-13)."""
        grid = self.dense(*self.map_indices(positions, n_keys))
        return (grid, None) if self.variant == "pre_softmax" else (None, grid)

    def attend(self, q, k, v, state, dropout_p=0.0):
        """softmax(q kᵀ/√d) v + Attn_s v for one layer; returns (y, probs or None).

        state: model.AttnState: its mask, is_causal, need_weights, s2 (LongLoRA's shifted sparse
        attention for the softmax part) and positions (map_indices; keys of a prefix, if any, come
        first). Attention dropout (`dropout_p`) applies to the softmax part only."""
        mask, is_causal, s2 = state.mask, state.is_causal, state.s2
        if self.tail and state.positions[0].shape[1] < state.positions[1].shape[1]:   # fewer queries than keys
            raise ValueError("LMAM tail mode (Eq. 16) cannot decode with a KV cache: the last n tokens "
                             "move with every new token; run full forwards instead")
        qi, qok, ki, kok = self.map_indices(state.positions, k.shape[2])
        H, Hkv = q.shape[1], k.shape[1]

        if self.variant == "pre_softmax" or state.need_weights:
            bias = self.dense(qi, qok, ki, kok).to(q.dtype)
            if self.variant == "pre_softmax":                                  # ¬N: inside the softmax
                return attention_naive(q, k, v, mask, is_causal=is_causal, bias=bias, dropout_p=dropout_p)
            y, probs = attention_naive(q, k, v, mask, is_causal=is_causal, dropout_p=dropout_p)
            vv = v.repeat_interleave(H // Hkv, dim=1)
            return y + bias @ vv, probs + bias                                   # Eq. 12-13

        y = sdpa(q, k, v, mask, is_causal, dropout_p) if s2 is None else shifted_sparse_attention(q, k, v, *s2)
        # Gather the values of the tokens on the map: slot of map index j per row (B, n).
        (B, _, T, hd), S, n = q.shape, k.shape[2], self.length
        slot = torch.full((B, n + 1), S, dtype=torch.long, device=q.device)
        slot.scatter_(1, torch.where(kok, ki, n), torch.arange(S, device=q.device).expand(B, S))
        slot = slot[:, :n]                                                      # S = "no token"
        v_map = v.gather(2, slot.clamp(max=S - 1)[:, None, :, None].expand(B, Hkv, n, hd))
        v_map.mul_((slot < S)[:, None, :, None])                                # zero where no token
        if H != Hkv:
            v_map = v_map.repeat_interleave(H // Hkv, dim=1)                    # (B, H, n, hd)
        a = self.heads_map(self.attn_map())                                     # (H, n, n), fp32
        if T < n:       # few queries (decoding: one per step): only their rows of the map, O(h·T·n·hd)
            rows = a[:, qi].transpose(0, 1) * qok[:, None, :, None]             # (B, H, T, n); 0 off the map
            return y + (rows @ v_map.to(a.dtype)).to(q.dtype), None
        a = F.pad(a, (0, 0, 0, 1))                                              # (H, n + 1, n): row n zeros
        u = (a @ v_map.to(a.dtype)).to(q.dtype)                                 # (B, H, n + 1, hd) = Attn_s·V, fp32
        row = torch.where(qok, qi, n)                                           # queries off the map get row n
        out = u.gather(2, row[:, None, :, None].expand(B, H, T, hd))            # each query's map row
        return out.add_(y), None                  # (in place on the gather's fresh output: no second copy)

    def factors(self, wa=None, wb=None):
        """(Wa + PE on its rows, Wb + PE on its columns), Eq. 8-9, each times root (√s when s is
        absorbed, else 1); the stored parameters never change."""
        wa, wb = (self.wa if wa is None else wa), (self.wb if wb is None else wb)
        if self.variant == "no_pos":
            return wa, wb
        pe = self.root * self.pe
        return wa + pe[:, None], wb + pe[None, :]

    def extra_repr(self):
        return (f"h_s={self.h_s}, rank={self.rank}, len={self.length}, scale={self.scale:.3g}, "
                f"causal={self.causal}, variant={self.variant}, tail={self.tail}, init={self.init}")


def map_sizes(model) -> list[float]:
    """max |Attn_s| of every LMAM layer, in model order (train.py logs it: is the map learning?)."""
    maps = [m for m in model.modules() if isinstance(m, LMAM)]
    if not maps:
        return []
    sizes = []
    with torch.no_grad():
        for m in maps:                        # a sharded model's factors (DTensors, fsdp.py) gathered first
            whole = {n: p.full_tensor() for n, p in m.named_parameters(recurse=False) if hasattr(p, "full_tensor")}
            sizes.append(m.attn_map(whole).abs().amax().float())
        return torch.stack(sizes).tolist()
