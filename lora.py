"""LoRA and DoRA: low-rank updates of a frozen linear layer.

Both wrap an nn.Linear and own its `weight` (and `bias`) under the same names, so a base checkpoint
loads into an adapted model unchanged (torchtune's LoRALinear does the same).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class AdditiveUpdate(nn.Module):
    """A frozen linear layer plus an update ΔW that can be folded into W for inference:
    merge() adds delta_weight() to `weight`, unmerge() takes it out (LoRA, QuanTA). Both add in fp32
    and round once to the weight's dtype: with bf16 weights the merged layer then equals the
    unmerged one up to that one rounding (as peft's merge), and unmerge() restores W up to it."""
    merged = False

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False


class LoRALinear(AdditiveUpdate):
    """LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

        y = W x + b + (alpha / r) · B A dropout(x)        A: (r, in), B: (out, r)

    Parameters added: r · (in + out). Init as in the reference (microsoft/LoRA, peft): A is
    kaiming-uniform with a = √5, B is zero, so the layer starts exactly as the base layer.
    `merge()` folds s·BA into W for inference; `unmerge()` takes it out again.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got lora_r={r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight                       # frozen, same key as the base layer
        self.bias = base.bias
        self.r, self.scaling = r, alpha / r
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def lora_term(self, x):
        """s · B A x in fp32 (the adapter's dtype) for an input that already went through the LoRA
        dropout; never builds BA."""
        return x.to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T * self.scaling

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return (y.float() + self.lora_term(self.dropout(x))).to(y.dtype)     # one rounding, as peft

    def delta_weight(self):
        return (self.lora_B @ self.lora_A) * self.scaling                 # (out, in)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling}"


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), as in peft and NVlabs/DoRA.

        W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row          y = W' x + b

    m (`magnitude`, one value per output row) starts as ‖W‖_row, so W' = W at init. The row norm is
    detached (DoRA §4.3: treated as a constant in the backward pass), computed as
        y = (m/n − 1) ⊙ W·drop(x) + W x + (m/n) ⊙ s·B A drop(x) + b,    n = ‖W + s·BA‖_row.
    Parameters added: r · (in + out) + out.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, r, alpha, dropout)
        self.magnitude = nn.Parameter(self.weight.detach().float().norm(dim=1))   # (out,)

    def weight_norm(self):
        w = self.weight.float() + self.delta_weight()
        return w.norm(dim=1).detach()                                          # (out,)

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        # In fp32 throughout, rounded once at the end, as peft does: m/n is ≈ 1, and in bf16 a
        # magnitude change below ~0.4% would round away and leave the output unchanged.
        scale = self.magnitude / self.weight_norm()                            # m / ‖W + sBA‖, fp32
        xd = self.dropout(x)                                                   # one mask for both terms
        wx = F.linear(x, self.weight).float()
        if xd is x:
            y = scale * wx                                                     # = W x + (m/n − 1) W x
        else:
            y = wx + (scale - 1) * F.linear(xd, self.weight).float()
        y = y + scale * self.lora_term(xd)
        y = y if self.bias is None else y + self.bias.float()
        return y.to(x.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            w = self.weight.float() + self.delta_weight()
            self._norm = w.norm(dim=1)                                         # kept for unmerge
            self.weight.copy_(((self.magnitude / self._norm)[:, None] * w).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.weight.float() / (self.magnitude / self._norm)[:, None] - self.delta_weight()
            self.weight.copy_(w.to(self.weight.dtype))
            self.merged = False
