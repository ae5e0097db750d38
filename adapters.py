"""Adapters and prefix tuning: LLM-Adapters' bottleneck adapters (series, parallel) for LLaMA,
He et al.'s scaled parallel adapter on the FFN (Adapter-FFN), and prefix tuning.
MAM (He et al. 2021) is prefix tuning + the scaled parallel adapter: the registry combines them.
BitFit and full fine-tuning need no module: they only choose which base parameters train.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class BottleneckLinear(nn.Module):
    """LLM-Adapters' bottleneck adapter around a frozen linear W (Hu et al. 2023, "LLM-Adapters";
    peft/tuners/bottleneck.py in their repo), with f(z) = s · up(tanh(down(dropout(z)))):

        kind "series_in"  (mh_adapter, on gate_proj/up_proj):  y = W (x + f(x)) + b
        kind "series_out" (output_adapter, on down_proj):      h = W x + b;  y = h + f(h)
        kind "parallel"   (parallel adapter):                  y = W x + b + f(x)

    down: (d_in → r), up: (r → d_out), no biases; d_in = d_out = in (series_in), out (series_out),
    or in → out (parallel). Parameters added: r · (d_in + d_out). Init "bert": both N(0, 0.02), so
    the adapter is near (not exactly) the identity at the start, as in the reference. Runs in fp32.
    (Houlsby's adapter on RoBERTa/BART is HoulsbyAdapter below.)
    """

    def __init__(self, base: nn.Linear, r: int, kind: str, scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"adapter rank must be positive, got adapter_r={r}")
        self.weight, self.bias, self.kind, self.scale = base.weight, base.bias, kind, float(scale)
        self.in_features, self.out_features = base.in_features, base.out_features
        d_in, d_out = {"series_in": (self.in_features, self.in_features),
                       "series_out": (self.out_features, self.out_features),
                       "parallel": (self.in_features, self.out_features)}[kind]
        dev = base.weight.device
        self.adapter_down = nn.Linear(d_in, r, bias=False, device=dev, dtype=torch.float32)
        self.adapter_up = nn.Linear(r, d_out, bias=False, device=dev, dtype=torch.float32)
        for lin in (self.adapter_down, self.adapter_up):
            nn.init.normal_(lin.weight, std=0.02)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def f(self, z):
        """s · up(tanh(down(dropout(z)))), in fp32."""
        h = self.adapter_down(self.dropout(z.float()))
        return self.adapter_up(torch.tanh(h)).to(z.dtype) * self.scale

    def forward(self, x):
        if self.kind == "series_in":
            return F.linear(x + self.f(x), self.weight, self.bias)
        h = F.linear(x, self.weight, self.bias)
        return h + self.f(h if self.kind == "series_out" else x)


class HoulsbyAdapter(nn.Module):
    """Houlsby et al.'s adapter as He et al. run it on RoBERTa/BART/mBART (their "sequential"
    adapter), after a sub-block's output projection:

        y' = y + up(dropout(ReLU(down(LN(y)))))        y: the sub-block's output

    with a LayerNorm on the adapter's input after attention only (layer_norm=True) and biases.
    down: (d → r), up: (r → d): 2·d·r + r + d parameters (+ 2·d for the LayerNorm). Init "bert":
    weights N(0, 0.02), biases 0, as in the reference. Attached in a sub-block's `adapter` slot
    (model.py: MultiHeadAttention.adapter, FFN.adapter); where each acts follows He et al.'s code
    (EncoderLayer.residual): after attention, on out_proj's output *before* the block's dropout
    (RoBERTa's SelfOutput: dense → adapter → dropout; BART/mBART: inside the attention module,
    right after out_proj); after the FFN, *after* the block's dropout (fc2 → dropout → adapter).
    """

    def __init__(self, dim: int, r: int, dropout: float = 0.0, layer_norm: bool = False, device=None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"adapter rank must be positive, got adapter_r={r}")
        self.adapter_down = nn.Linear(dim, r, device=device, dtype=torch.float32)
        self.adapter_up = nn.Linear(r, dim, device=device, dtype=torch.float32)
        for lin in (self.adapter_down, self.adapter_up):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.adapter_norm = nn.LayerNorm(dim, device=device, dtype=torch.float32) if layer_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x, y):
        """x: the sub-block's input (unused: the adapter reads y), y: its output (attention: before
        the block's dropout; FFN: after it)."""
        h = self.dropout(F.relu(self.adapter_down(self.adapter_norm(y.float()))))      # dropout after ReLU
        return y + self.adapter_up(h).to(y.dtype)


class AdapterFFN(nn.Module):
    """Scaled parallel adapter on the FFN (He et al. 2021, "Towards a Unified View of
    Parameter-Efficient Transfer Learning", the "FFN scaled PA"; Adapter-FFN in the LoRaDA paper):

        FFN'(x) = FFN(x) + s · (W_up dropout(ReLU(W_down x + b_down)) + b_up)

    x is what the adapter reads, and the two pre-norm families differ:
      - RoBERTa/BART (post-LN): the FFN's input;
      - mBART (pre-LN): the residual stream before the FFN's LayerNorm, as He et al. place it;
      - LLaMA (pre-RMSNorm): the MLP's input, i.e. the *normalised* stream (MLP.adapter gets what
        the MLP gets). No reference places Adapter-FFN in LLaMA; this reads what LLM-Adapters'
        parallel adapter on up_proj reads. A choice (docs/choices.md), not He et al.'s mBART rule.
    On RoBERTa/BART/mBART the term is added after the block's residual dropout, as in He et al.'s
    code (the layer applies `FFN.adapter` after dropout); LLaMA has no dropout there. W_down: (r, d),
    W_up: (d, r), with biases: 2·d·r + r + d parameters. LoRA-style init as in the reference
    (init_option "lora"): W_down kaiming-uniform (a = √5), W_up and both biases zero, so the adapter
    starts as an exact no-op. Attached as `MLP.adapter` (LLaMA) or `FFN.adapter`.
    """

    def __init__(self, dim: int, r: int, scale: float, dropout: float = 0.0, device=None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"adapter rank must be positive, got adapter_r={r}")
        self.scale = float(scale)
        self.adapter_down = nn.Linear(dim, r, device=device, dtype=torch.float32)
        self.adapter_up = nn.Linear(r, dim, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x, y):
        h = self.dropout(F.relu(self.adapter_down(x.to(self.adapter_down.weight.dtype))))
        return y + (self.adapter_up(h) * self.scale).to(y.dtype)


class PrefixEncoder(nn.Module):
    """Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

    l trainable key/value vectors per layer are prepended to the keys and values of self-attention;
    queries are unchanged and the prefixes carry no position (no RoPE). They come from
      - mid_dim = 0 (peft's default, LLM-Adapters' LLaMA baseline): a table P of (l, L·2·d_kv);
        l · L · 2 · d_kv parameters;
      - mid_dim > 0 (Li & Liang's reparametrisation, He et al.'s MAM with mid_dim 800, peft's
        prefix_projection): P = W2 tanh(W1 E + b1) + b2 with E: (l, d_model);
        l·d_model + d_model·mid + mid + mid·L·2·d_kv + L·2·d_kv parameters.
    Row layout (L·2, H_kv, head_dim), layer i's key at 2i and value at 2i + 1, as in peft and jxhe.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, d_model: int, length: int,
                 mid_dim: int = 0, device=None):
        super().__init__()
        if length <= 0:
            raise ValueError(f"prefix length must be positive, got prefix_len={length}")
        self.n_layers, self.n_kv_heads, self.head_dim, self.length = n_layers, n_kv_heads, head_dim, length
        out = n_layers * 2 * n_kv_heads * head_dim
        if mid_dim > 0:
            self.prefix_embedding = nn.Embedding(length, d_model, device=device, dtype=torch.float32)
            self.prefix_mlp = nn.Sequential(nn.Linear(d_model, mid_dim, device=device, dtype=torch.float32), nn.Tanh(),
                                            nn.Linear(mid_dim, out, device=device, dtype=torch.float32))
        else:
            self.prefix_embedding = nn.Embedding(length, out, device=device, dtype=torch.float32)
            self.prefix_mlp = None

    def layer_kv(self, layer: int, batch_size: int, dtype):
        """(k', v') for one layer, each (B, H_kv, l, hd). Computes only that layer's rows."""
        width = 2 * self.n_kv_heads * self.head_dim
        rows = slice(layer * width, (layer + 1) * width)
        if self.prefix_mlp is None:
            kv = self.prefix_embedding.weight[:, rows]                                   # (l, 2·d_kv)
        else:
            first, _, last = self.prefix_mlp
            h = torch.tanh(first(self.prefix_embedding.weight))                          # (l, mid)
            kv = F.linear(h, last.weight[rows], last.bias[rows])                          # (l, 2·d_kv)
        kv = kv.view(self.length, 2, self.n_kv_heads, self.head_dim).permute(1, 2, 0, 3)  # (2, Hkv, l, hd)
        kv = kv.to(dtype)[:, None].expand(2, batch_size, -1, -1, -1)
        return kv[0], kv[1]


class PrefixSlice:
    """What an attention layer calls to get its prefix: a plain object (not a Module), so the
    shared encoder's parameters appear once in the state dict, under `prefix_encoder.`."""

    def __init__(self, encoder: PrefixEncoder, layer: int):
        self.encoder, self.layer = encoder, layer

    def __call__(self, batch_size: int, dtype=torch.float32):
        return self.encoder.layer_kv(self.layer, batch_size, dtype)
