"""QuanTA (Chen et al. 2024, "QuanTA: Efficient High-Rank Fine-Tuning of LLMs with
Quantum-Informed Tensor Adaptation"), following quanta-fine-tuning/quanta.

The layer width is factorised d = d1·d2·…·dN and the input reshaped to (d1, …, dN), row-major
(d1 slowest). Every axis pair a < b gets a tensor T_ab of shape (d_a, d_b, d_a, d_b), ordered
(out_a, out_b, in_a, in_b), which mixes those two axes and leaves the others alone. The pairs are
applied in the reference's order, itertools.combinations(range(-1, -N-1, -1), 2): for N = 4,
(2,3), (1,3), (0,3), (1,2), (0,2), (0,1). Their product is a dense d×d operator f(T).

    y = W x + b + f(T) x − f(T0) x

T0 is a frozen copy of the initial T (a buffer), so the update f(T) − f(T0) is exactly zero at
initialisation: both terms are computed by the same operations on the same values. (The
reference subtracts f(T0) from W in bf16 instead, which is zero only up to rounding.) No scaling
factor. Parameters added: Σ_{a<b} (d_a·d_b)². The product of the dims must equal the layer's
input width; when the output width differs, f's output is cropped or zero-padded to it (the
update lives in the top-left block, as in the reference).
"""
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import AdditiveUpdate


def axis_pairs(n: int):
    """The reference's pair order as 0-based (a, b) with a < b."""
    return [(n + d2, n + d1) for d1, d2 in itertools.combinations(range(-1, -n - 1, -1), 2)]


def quanta_apply(x, tensors, dims):
    """f(T) x for x of shape (..., prod(dims))."""
    h = x.reshape(-1, *dims)                                          # (M, d1, …, dN)
    for (a, b), T in zip(axis_pairs(len(dims)), tensors):
        h = h.movedim((a + 1, b + 1), (-2, -1))                       # the pair's axes last
        h = torch.einsum("...ij,klij->...kl", h, T.to(h.dtype))
        h = h.movedim((-2, -1), (a + 1, b + 1))
    return h.reshape(*x.shape[:-1], -1)


class QuanTALinear(AdditiveUpdate):
    def __init__(self, base: nn.Linear, dims, dropout: float = 0.0):
        super().__init__()
        dims = [int(d) for d in dims]
        if len(dims) < 2 or min(dims) <= 0:
            raise ValueError(f"QuanTA needs at least two positive dims, got {'-'.join(map(str, dims))}")
        if math.prod(dims) != base.in_features:
            raise ValueError(f"QuanTA dims {'-'.join(map(str, dims))} multiply to {math.prod(dims)}, "
                             f"but the layer's input width is {base.in_features}")
        self.weight, self.bias, self.dims = base.weight, base.bias, dims
        self.in_features, self.out_features = base.in_features, base.out_features
        dev = base.weight.device
        self.quanta_T = nn.ParameterList()
        for i, (a, b) in enumerate(axis_pairs(len(dims))):
            n = dims[a] * dims[b]
            t = torch.empty(n, n, device=dev, dtype=torch.float32)
            # kaiming-uniform with nonlinearity='linear' (gain 1): U(±√(3/n)), as the reference
            nn.init.kaiming_uniform_(t, a=math.sqrt(5), nonlinearity="linear")
            t = t.view(dims[a], dims[b], dims[a], dims[b])
            self.quanta_T.append(nn.Parameter(t))
            self.register_buffer(f"quanta_T0_{i}", t.detach().clone())
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def frozen(self):
        return [getattr(self, f"quanta_T0_{i}") for i in range(len(self.quanta_T))]

    def update(self, x):
        """f(T) x − f(T0) x, cropped or padded to the output width."""
        d = quanta_apply(x, list(self.quanta_T), self.dims) - quanta_apply(x, self.frozen(), self.dims)
        return F.pad(d, (0, self.out_features - self.in_features))

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + self.update(self.dropout(x).float()).to(y.dtype)

    def delta_weight(self):
        """The dense (out, in) update f(T) − f(T0)."""
        eye = torch.eye(self.in_features, device=self.weight.device)
        return self.update(eye).T                                     # row i of update(eye) is Δ e_i

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, dims={'-'.join(map(str, self.dims))}"
