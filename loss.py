"""The language-model loss: cross-entropy of the LM head's logits against the next tokens.

`lm_loss(hidden, head, labels)` computes it from the final hidden states and the LM head without
materialising the (tokens × vocabulary) logits (LinearCrossEntropy, a custom autograd function):
train.py's loss for LLaMA and BART/mBART, and bench.py's.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Linear


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
