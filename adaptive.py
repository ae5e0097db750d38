"""Adaptive-rank LoRA, the baselines of Table 11: AdaLoRA (Zhang et al. 2023, "Adaptive Budget
Allocation for Parameter-Efficient Fine-Tuning") and SoRA (Ding et al. 2023, "Sparse Low-rank
Adaptation of Pre-trained Language Models").

Both decide while training which ranks a layer keeps, so besides their layers they act around each
optimizer step, through an *update hook* that train.py calls (methods.update_hooks(model) lists a
model's hooks; methods.adalora / methods.sora attach them):

    before_update(model, step, total)       after backward, before clipping: add a regulariser's gradient
    after_update(model, step, total, lr)    after AdamW's step, before zero_grad (the gradients are still
                                            there): AdaLoRA's rank allocation, SoRA's gate step
    own_parameters(model)                   the parameters the hook updates itself (AdamW leaves them alone)
    summary(model) -> str                   the ranks kept, printed at the end of training

`step` counts from 1 (the step being taken), `total` is the run's number of steps, `lr` the learning
rate of this step. (AdaLoRA's schedule counts the steps done before this one, t = step − 1, from 0,
as its references do.) Their state (importance averages, the gate's Adam moments) lives in buffers of
their layers, so checkpoints and --resume carry it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import AdditiveUpdate


# ----------------------------------------------------------------------------- AdaLoRA

class AdaLoRALinear(AdditiveUpdate):
    """AdaLoRA's SVD-form update of a frozen linear layer (peft's SVDLinear, AdaLoRA's loralib):

        y = W x + b + α / (r + 1e-5) · P (Λ ⊙ Q dropout(x))       Q = lora_A (r, in), Λ = lora_E (r, 1),
                                                                    P = lora_B (out, r)

    r is the initial rank (the divisor stays r when triplets are masked; the 1e-5 is the reference's).
    Init as the reference: Λ = 0, P and Q ~ N(0, 0.02), so the layer starts as the base layer.
    Parameters: r·(in + out + 1). Buffers: the importance averages of every entry of Q, Λ, P
    (`ipt_avg_*`, sensitivity; `ipt_unc_*`, uncertainty) and `rank_mask`, the triplets the last
    allocation kept.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"AdaLoRA's initial rank must be positive, got adalora_init_r={r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias          # frozen, same keys as the base layer
        self.r = r
        self.scaling = alpha if alpha > 0 else float(r)
        self.ranknum = float(torch.tensor(float(r)) + 1e-5)      # r + 1e-5 in fp32, as the reference
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev).normal_(0, 0.02))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=dev))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=dev).normal_(0, 0.02))
        for x in "AEB":
            p = getattr(self, f"lora_{x}")
            self.register_buffer(f"ipt_avg_{x}", torch.zeros_like(p))
            self.register_buffer(f"ipt_unc_{x}", torch.zeros_like(p))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        xd = self.dropout(x).to(self.lora_A.dtype)
        return (y.float() + (xd @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / self.ranknum).to(y.dtype)

    def delta_weight(self):
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / self.ranknum      # (out, in)

    def rank(self) -> int:
        return int((self.lora_E != 0).sum())

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling}"


class AdaLoRAAllocator:
    """AdaLoRA's budget allocation (peft's RankAllocator and AdaLoraModel.update_and_allocate), an
    update hook (module docstring). t counts from 0, as in the references: AdaLoRA's trainer calls
    update_and_mask(model, global_step) after the optimizer step and before global_step += 1, and
    peft's examples pass the same 0-based step to update_and_allocate; so the first step is t = 0
    and the last t = total − 1. Per step t:

      - before the update: the orthogonality regulariser's gradient, of
            orth_reg · mean over every P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F
        (the reference's: the Frobenius norm itself, not its square as the paper writes it);
      - after the update, while t < total − tfinal: importance of every entry, I = |w · ∂L/∂w|, and
        its EMAs  Ī ← β1 Ī + (1 − β1) I  (sensitivity),  Ū ← β2 Ū + (1 − β2) |I − Ī|  (uncertainty);
        the score of a triplet (Pᵢ, Λᵢ, Qᵢ) is S(Λᵢ) + mean S(Qᵢ,·) + mean S(P·,ᵢ), S = Ī·Ū;
      - the budget b(t) (total rank): the initial b0 = Σ r until tinit, then the cubic schedule
            b(t) = b_T + (b0 − b_T)·(1 − (t − tinit)/(total − tfinal − tinit))³,  b_T = target_r · #layers,
        and every deltaT steps the Λᵢ of the b0 − b(t) lowest-scoring triplets are set to 0 (they can
        grow back until the next allocation);
      - at t = total − tfinal the final allocation to b_T, whose mask then holds until the end
        (with tfinal = 0 that step never comes, t ending at total − 1, as in the references).
    """

    def __init__(self, target_r: int, tinit: int, tfinal: int, delta_t: int, beta1: float, beta2: float,
                 orth_reg: float):
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"adalora_beta1 and adalora_beta2 must be in (0, 1), got {beta1} and {beta2}")
        if orth_reg < 0 or delta_t <= 0 or target_r < 0 or tinit < 0 or tfinal < 0:
            raise ValueError(f"AdaLoRA needs adalora_orth_reg >= 0, adalora_delta_t > 0, adalora_target_r, "
                             f"adalora_tinit, adalora_tfinal >= 0; got {orth_reg}, {delta_t}, {target_r}, {tinit}, "
                             f"{tfinal}")
        self.target_r, self.tinit, self.tfinal, self.delta_t = target_r, tinit, tfinal, delta_t
        self.beta1, self.beta2, self.orth_reg = beta1, beta2, orth_reg

    @staticmethod
    def layers(model):
        return [m for m in model.modules() if isinstance(m, AdaLoRALinear)]

    def own_parameters(self, model):
        return []

    def before_update(self, model, step: int, total: int):
        if self.orth_reg == 0:
            return
        layers = self.layers(model)
        with torch.enable_grad():
            reg = 0.0
            for m in layers:
                for p, cov in ((m.lora_A, m.lora_A @ m.lora_A.T), (m.lora_B, m.lora_B.T @ m.lora_B)):
                    reg = reg + torch.norm(cov - torch.eye(*cov.shape, device=cov.device), p="fro")
            params = [p for m in layers for p in (m.lora_A, m.lora_B)]
            grads = torch.autograd.grad(self.orth_reg * (reg / len(params)), params)
        for p, g in zip(params, grads):
            p.grad = g if p.grad is None else p.grad + g

    def budget(self, t: int, total: int, b0: int, bT: int) -> tuple[int, bool]:
        """(budget, whether to mask now) at the 0-based step t of the allocation phase (t < total − tfinal)."""
        if t <= self.tinit:
            return b0, False
        shrink = 1 - (t - self.tinit) / (total - self.tfinal - self.tinit)
        return int((b0 - bT) * shrink ** 3 + bT), t % self.delta_t == 0

    def update_importance(self, layers):
        with torch.no_grad():
            for m in layers:
                for x in "AEB":
                    p = getattr(m, f"lora_{x}")
                    ipt = (p * p.grad).abs()
                    avg, unc = getattr(m, f"ipt_avg_{x}"), getattr(m, f"ipt_unc_{x}")
                    avg.copy_(self.beta1 * avg + (1 - self.beta1) * ipt)
                    unc.copy_(self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs())

    def mask_to_budget(self, layers, budget: int):
        """Zero the Λ of the lowest-scoring triplets, so that `budget` of them remain (ties at the
        threshold go too, as in the reference)."""
        with torch.no_grad():
            scores = []
            for m in layers:
                s = lambda x: getattr(m, f"ipt_avg_{x}") * getattr(m, f"ipt_unc_{x}")
                qp = torch.cat([s("A").mean(dim=1, keepdim=True), s("B").mean(dim=0).view(-1, 1)], dim=1)
                scores.append(s("E").view(-1) + qp.sum(dim=1).view(-1))
            k = sum(m.r for m in layers) - budget
            threshold = torch.kthvalue(torch.cat(scores), k)[0].item() if k > 0 else -math.inf
            for m, score in zip(layers, scores):
                m.rank_mask.copy_(score > threshold)
                m.lora_E.masked_fill_(~m.rank_mask[:, None], 0.0)

    def after_update(self, model, step: int, total: int, lr: float):
        final = total - self.tfinal
        if self.tinit >= final:
            raise ValueError(f"AdaLoRA's schedule leaves no allocation phase: adalora_tinit={self.tinit} and "
                             f"adalora_tfinal={self.tfinal} for {total} steps")
        t = step - 1                                          # the references' global_step: from 0
        layers = self.layers(model)
        b0, bT = sum(m.r for m in layers), self.target_r * len(layers)
        if t < final:
            self.update_importance(layers)
            budget, now = self.budget(t, total, b0, bT)
            if now:
                self.mask_to_budget(layers, budget)
        elif t == final:                                      # the final allocation, kept from now on
            self.mask_to_budget(layers, bT)
            with torch.no_grad():
                for m in layers:
                    for x in "AEB":
                        getattr(m, f"ipt_avg_{x}").zero_()
                        getattr(m, f"ipt_unc_{x}").zero_()
        else:
            with torch.no_grad():
                for m in layers:
                    m.lora_E.masked_fill_(~m.rank_mask[:, None], 0.0)

    def summary(self, model) -> str:
        ranks = {n: m.rank() for n, m in model.named_modules() if isinstance(m, AdaLoRALinear)}
        r = next((m.r for m in self.layers(model)), 0)
        return (f"AdaLoRA ranks kept (of {r}), {sum(ranks.values())} in all (target {self.target_r} per layer): "
                + ", ".join(f"{n} {k}" for n, k in ranks.items()))


# ----------------------------------------------------------------------------- SoRA

class SoRALinear(AdditiveUpdate):
    """SoRA's gated LoRA (TsinghuaC3I/SoRA src/lora.py):

        y = W x + b + (α / r) · B (g ⊙ (A dropout(x)))        A: (r, in), g: (r,), B: (out, r)

    Init as the reference: A kaiming-uniform (a = √5), B = 0, g ~ N(0, 1): the base layer at the start.
    A zero gate switches its rank off; `prune_sora` removes such ranks. Parameters: r·(in + out + 1).
    Buffers: the gate's Adam moments and step count (SoRA's own optimiser, SoRAGates).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"SoRA's rank must be positive, got lora_r={r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.scaling = r, alpha / r
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        self.lora_gate = nn.Parameter(torch.randn(r, device=dev))
        self.register_buffer("gate_exp_avg", torch.zeros(r, device=dev))
        self.register_buffer("gate_exp_avg_sq", torch.zeros(r, device=dev))
        self.register_buffer("gate_step", torch.zeros((), dtype=torch.long, device=dev))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T) * self.lora_gate
        return (y.float() + (h @ self.lora_B.T) * self.scaling).to(y.dtype)

    def delta_weight(self):
        return (self.lora_B * self.lora_gate) @ self.lora_A * self.scaling

    def rank(self) -> int:
        return int((self.lora_gate != 0).sum())

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling}"


def soft_threshold(z, xi: float):
    """The proximal operator of ξ·|g|: sign(z)·max(|z| − ξ, 0) (SoRA's paper, "soft")."""
    return torch.sign(z) * (z.abs() - xi).clamp(min=0)


def released_threshold(z, xi: float):
    """SoRA's released code (src/sparse_optimizer.py, SparseAdamW.step): three in-place masks in a
    row, each on the result of the one before,

        z[z > ξ] −= ξ;   z[z < −ξ] += ξ;   z[|z| < ξ] = 0

    so a gate shifted into (−ξ, ξ) by the first two is zeroed by the third: every |z| < 2ξ goes to
    0 (|z| = ξ exactly stays, the masks being strict), the rest shrinks by ξ as the soft threshold."""
    z = z.clone()
    z[z > xi] -= xi
    z[z < -xi] += xi
    z[z.abs() < xi] = 0.0
    return z


SORA_PROX = {"released": released_threshold, "soft": soft_threshold}


LAMBDA_SCHEDULES = ("none", "linear", "log_linear", "exp_linear")


class SoRAGates:
    """SoRA's training of the gates (their run_glue.py, src/trainer.py, src/sparse_optimizer.py), an
    update hook (module docstring). The gates are not AdamW's; per step:

      - before the update: the gradient of the L1 term their trainer adds to the loss,
        sora_lambda · Σ|g| / (number of gates), so that clipping sees it as theirs does;
      - after the update: an Adam step of the gates (their SparseAdamW: transformers' AdamW with
        bias correction, β = (0.9, 0.999), ε = 1e-6, no weight decay, the run's learning rate
        schedule), then the proximal step of the L1 penalty at
        ξ = sora_lambda2 ("fixed": their sparse_optimizer.py, which run_glue.py uses) or lr·sora_lambda2
        ("lr": their sparse_optimizer_multiply_lr.py and the paper's T_{ηλ}), in one of two forms:
          sora_prox "released" (default): their code's three in-place masks in a row (g > ξ: g − ξ;
            g < −ξ: g + ξ; |g| < ξ: 0), which also zeroes the gates that were in (ξ, 2ξ) before
            the shift: g ← 0 where |z| < 2ξ, else sign(z)·(|z| − ξ) (released_threshold);
          sora_prox "soft": the paper's soft threshold g ← sign(z)·max(|z| − ξ, 0) (soft_threshold).
    The λ2 schedule (sora_schedule linear / log_linear / exp_linear from sora_lambda2 to
    sora_max_lambda in sora_lambda_num values): the run splits into sora_lambda_num equal phases,
    phase k using the k-th value (their run_glue.py instead trains sora_lambda_num − 1 more rounds
    of 15 epochs after the main run, one per value).
    """

    def __init__(self, lam: float, lam2: float, threshold: str = "fixed", schedule: str = "none",
                 max_lambda: float = 10.0, lambda_num: int = 10, betas=(0.9, 0.999), eps: float = 1e-6,
                 prox: str = "released"):
        if threshold not in ("fixed", "lr"):
            raise ValueError(f"sora_threshold must be 'fixed' or 'lr', got {threshold!r}")
        if prox not in SORA_PROX:
            raise ValueError(f"sora_prox must be one of {', '.join(SORA_PROX)}, got {prox!r}")
        self.prox = prox
        if schedule not in LAMBDA_SCHEDULES:
            raise ValueError(f"unknown sora_schedule {schedule!r}; valid: {', '.join(LAMBDA_SCHEDULES)}")
        if lam < 0 or lam2 < 0 or (schedule != "none" and lambda_num < 1):
            raise ValueError(f"SoRA needs sora_lambda, sora_lambda2 >= 0 (and sora_lambda_num >= 1 with a "
                             f"schedule); got {lam}, {lam2}, {lambda_num}")
        self.lam, self.threshold, self.betas, self.eps = lam, threshold, betas, eps
        if schedule == "none":
            self.lambdas = [lam2]
        elif schedule == "linear":
            self.lambdas = torch.linspace(lam2, max_lambda, lambda_num, dtype=torch.float64).tolist()
        elif schedule == "log_linear":
            self.lambdas = torch.linspace(math.exp(lam2), math.exp(max_lambda), lambda_num,
                                          dtype=torch.float64).log().tolist()
        else:
            self.lambdas = torch.linspace(math.log(lam2), math.log(max_lambda), lambda_num,
                                          dtype=torch.float64).exp().tolist()

    @staticmethod
    def layers(model):
        return [m for m in model.modules() if isinstance(m, SoRALinear)]

    def own_parameters(self, model):
        return [m.lora_gate for m in self.layers(model)]

    def lambda2(self, step: int, total: int) -> float:
        n = len(self.lambdas)
        return self.lambdas[min((step - 1) * n // max(total, 1), n - 1)]

    def before_update(self, model, step: int, total: int):
        gates = self.own_parameters(model)
        n = sum(g.numel() for g in gates)
        if self.lam == 0 or n == 0:
            return
        for g in gates:
            grad = self.lam * torch.sign(g.detach()) / n
            g.grad = grad if g.grad is None else g.grad + grad

    def after_update(self, model, step: int, total: int, lr: float):
        xi = self.lambda2(step, total) * (lr if self.threshold == "lr" else 1.0)
        b1, b2 = self.betas
        with torch.no_grad():
            for m in self.layers(model):
                g = m.lora_gate
                if g.grad is None:
                    continue
                m.gate_step += 1
                t = int(m.gate_step)
                m.gate_exp_avg.mul_(b1).add_(g.grad, alpha=1 - b1)
                m.gate_exp_avg_sq.mul_(b2).addcmul_(g.grad, g.grad, value=1 - b2)
                step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
                g.add_(m.gate_exp_avg / (m.gate_exp_avg_sq.sqrt() + self.eps) * -step_size)
                g.copy_(SORA_PROX[self.prox](g, xi))
                g.grad = None                   # AdamW's zero_grad does not reach the gates

    def summary(self, model) -> str:
        layers = {n: m for n, m in model.named_modules() if isinstance(m, SoRALinear)}
        kept = sum(m.rank() * (m.in_features + m.out_features + 1) for m in layers.values())
        r = next(iter(layers.values())).r if layers else 0
        return (f"SoRA ranks kept (nonzero gates, of {r}); {kept:,d} parameters after prune_sora: "
                + ", ".join(f"{n} {m.rank()}" for n, m in layers.items()))


def prune_sora(model) -> dict:
    """Remove the ranks whose gate is zero from every SoRA layer (A's rows, B's columns, the gate
    and its Adam moments), in place; returns {layer name: rank kept}. The function of the model is
    unchanged (a zero gate contributes nothing). A pruned model's adapter no longer has the shapes
    apply_method builds: prune after training or after load_adapter, for deployment."""
    ranks = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, SoRALinear):
                continue
            keep = (m.lora_gate != 0).nonzero().view(-1)
            for p in ("lora_A", "lora_gate"):
                setattr(m, p, nn.Parameter(getattr(m, p)[keep].clone(), requires_grad=getattr(m, p).requires_grad))
            m.lora_B = nn.Parameter(m.lora_B[:, keep].clone(), requires_grad=m.lora_B.requires_grad)
            for b in ("gate_exp_avg", "gate_exp_avg_sq"):
                setattr(m, b, getattr(m, b)[keep].clone())
            ranks[name] = len(keep)
    return ranks
