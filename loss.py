"""The language-model loss: cross-entropy of the LM head's logits against the labels.

Two paths computing one function, the way lmam.py pairs a written-out path with a fast one:

  - `lm_loss_plain`, what the loss is: logits = head(hidden) (+ bias), then F.cross_entropy summed
    over the tokens, label -100 ignored, label smoothing ε. It holds the (tokens × vocabulary)
    logits, their log-softmax and its gradient in memory: ~0.5 GB each for 2048 tokens of a
    32000-token vocabulary.
  - `LinearCrossEntropy`, its optimisation: the same sum and the same gradients, with the head
    fused into the cross-entropy, rows in chunks, so that the logits are never materialised.

`lm_loss` takes the fused path when the head is a weight or a plain nn.Linear, the plain one when
a PEFT method has wrapped the head (its logits are whatever the wrapper computes). tests/test_loss.py
checks that both paths agree, in value and gradients. The shift is the caller's: in a decoder-only
model token t predicts token t + 1, so pipelines.py passes hidden[:, :-1] with labels[:, 1:];
BART's labels are already the decoder's next tokens (model.shift_tokens_right).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def lm_loss_plain(hidden, head, labels, bias=None, label_smoothing=0.0):
    """Summed cross-entropy of head(hidden) + bias against labels (-100: ignored), in fp32: the
    written-out loss. hidden (..., d), labels (...); `head` a module or a weight (V, d)."""
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)              # (N, d), (N,)
    logits = F.linear(h, head) if isinstance(head, torch.Tensor) else head(h)   # (N, V)
    logits = logits.float() + (0 if bias is None else bias.float())
    return F.cross_entropy(logits, y, ignore_index=-100, label_smoothing=label_smoothing, reduction="sum")


class LinearCrossEntropy(torch.autograd.Function):
    """lm_loss_plain's Σ_rows cross_entropy(h Wᵀ + b, labels), without materialising the (N, V)
    logits: rows go through in chunks, and each chunk's gradient (softmax − target) is turned into
    dh (and dW, db when W, b train) right away, so only (chunk, V) floats live at a time. Backward scales
    the saved dh, dW. With V = 32000 and N = 2048 this avoids ~0.5 GB of logits, their log-softmax
    and its gradient: 2-2.7x less peak memory per training step (bench.py). The matrix products are
    the same, so the speed is the plain path's, except where fresh memory is slow (glibc on a VM:
    bench.py). Label smoothing ε as torch's cross_entropy: (1 − ε)·NLL + ε·mean_j(−log p_j)."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, label_smoothing, chunk, needs_grad):
        N, V = h.shape[0], weight.shape[0]
        eps = float(label_smoothing)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if needs_grad else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if needs_grad and weight.requires_grad else None
        train_bias = needs_grad and bias is not None and bias.requires_grad
        db = torch.zeros(V, dtype=torch.float32, device=h.device) if train_bias else None
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
            if db is not None:
                db += g.sum(0)
            g = g.to(weight.dtype)
            dh[s:s + chunk] = g @ weight
            if dw is not None:
                dw.addmm_(g.t().float(), hc.float())
        ctx.save_for_backward(dh, dw, db)
        ctx.weight_dtype = weight.dtype
        ctx.bias_like = None if db is None else (bias.shape, bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, dw, db = ctx.saved_tensors
        dw = None if dw is None else (dw * grad).to(ctx.weight_dtype)
        db = None if db is None else (db * grad).view(ctx.bias_like[0]).to(ctx.bias_like[1])
        return dh * grad, dw, db, None, None, None, None


def lm_loss(hidden, head, labels, bias=None, label_smoothing=0.0, chunk=None):
    """lm_loss_plain's value and gradients, through LinearCrossEntropy when the head is a weight
    (V, d) (tied to the embedding: BART) or a plain bias-free nn.Linear; a head that a PEFT method
    has wrapped takes the plain path. `chunk`: rows per chunk (default: (chunk, V) fp32 of 64 MB)."""
    if not (isinstance(head, torch.Tensor) or (type(head) is nn.Linear and head.bias is None)):
        return lm_loss_plain(hidden, head, labels, bias, label_smoothing)
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    weight = head if isinstance(head, torch.Tensor) else head.weight
    chunk = chunk or max(64, 2 ** 24 // weight.shape[0])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    return LinearCrossEntropy.apply(h, weight, bias, y, label_smoothing, chunk, needs_grad)
