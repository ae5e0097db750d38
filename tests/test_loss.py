"""loss.py: the plain LM loss (logits, F.cross_entropy) and its fused optimisation
(LinearCrossEntropy) compute one function: the same value and gradients."""
import pytest
import torch
from torch.testing import assert_close

from loss import lm_loss, lm_loss_plain


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_fused_loss_equals_plain_loss(smoothing, chunk):
    """LinearCrossEntropy (through lm_loss, chunks of 1, of 7 that do not divide the 38 rows, one
    chunk for all) against lm_loss_plain: the summed loss and the gradients of the hidden states,
    the head's weight and the bias, with label smoothing and ignored labels (-100)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 19, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(1, 50, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (2, 19), generator=g)
    y[0, :4] = -100
    y[1, -1] = -100
    fused = lm_loss(h, w, y, bias, smoothing, chunk=chunk)
    plain = lm_loss_plain(h, w, y, bias, smoothing)
    assert fused.grad_fn is not None and "LinearCrossEntropy" in type(fused.grad_fn).__name__
    assert_close(fused, plain, atol=1e-4, rtol=1e-6)
    for a, b, name in zip(torch.autograd.grad(2 * fused, (h, w, bias)), torch.autograd.grad(2 * plain, (h, w, bias)),
                          ("hidden", "weight", "bias")):
        assert a.shape == b.shape, name
        assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    # ignored rows get no gradient, on either path
    gh = torch.autograd.grad(lm_loss(h, w, y, bias, smoothing, chunk=chunk), h)[0]
    assert torch.equal(gh[0, :4], torch.zeros(4, 16)) and gh[0, 4:].abs().sum() > 0


def test_lm_loss_under_autocast():
    """Full fine-tuning and BitFit on a GPU compute the loss under bf16 autocast: bf16 hidden
    states, an fp32 head. Same loss and gradient as autocast's logits + F.cross_entropy (CPU
    autocast here), over several chunks."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (19,), generator=g)
    for hidden_dtype in (torch.bfloat16, torch.float32):            # from a matmul, or from a norm kept in fp32
        x = torch.randn(19, 16, generator=g, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = (x @ torch.eye(16)).to(hidden_dtype)
            out = lm_loss(h, w, y, chunk=8)
            ref = torch.nn.functional.cross_entropy((h @ w.t()).float(), y, reduction="sum")
        assert_close(out, ref, atol=1e-3, rtol=1e-5)
        assert_close(torch.autograd.grad(out, x, retain_graph=True)[0], torch.autograd.grad(ref, x)[0], atol=2e-2,
                     rtol=2e-2)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("head_trains", [False, True])
def test_lm_loss_equals_cross_entropy(smoothing, head_trains):
    """The chunked linear cross-entropy against logits + F.cross_entropy: loss, dh and dW (when
    the head trains), a bias (BART's final_logits_bias), ignored labels, a chunk that does not
    divide the rows; and a PEFT-wrapped head takes the logits path."""
    g = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight.requires_grad_(head_trains)
    bias = torch.randn(1, 50, generator=g)
    h = torch.randn(2, 19, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (2, 19), generator=g)
    y[0, :4] = -100
    out = lm_loss(h, head, y, bias, smoothing, chunk=8)
    ref = torch.nn.functional.cross_entropy((head(h) + bias).flatten(0, 1), y.flatten(), ignore_index=-100,
                                            label_smoothing=smoothing, reduction="sum")
    assert_close(out, ref, atol=1e-4, rtol=1e-6)
    wanted = (h, head.weight) if head_trains else (h,)
    for a, b in zip(torch.autograd.grad(out, wanted), torch.autograd.grad(ref, wanted)):
        assert_close(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert_close(lm_loss(h, head.weight, y, bias, smoothing), ref.detach(), atol=1e-4, rtol=1e-6)
    from lora import LoRALinear
    wrapped = LoRALinear(head, 2, 4, 0.0)
    with torch.no_grad():
        wrapped.lora_B.normal_()
    ref = torch.nn.functional.cross_entropy(wrapped(h).flatten(0, 1), y.flatten(), ignore_index=-100,
                                            reduction="sum")
    assert_close(lm_loss(h, wrapped, y), ref)
