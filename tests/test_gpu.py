"""Checks that need a GPU (marked `gpu`: skipped without one; scripts/gpu_check.py runs them with
LORADA_GPU_TESTS=1). The CPU suite checks the same recipe in tests/test_precision.py."""
import pytest
import torch
from torch.testing import assert_close

import methods
import model as M
from generate import generate
from loss import lm_loss

pytestmark = pytest.mark.gpu


def tiny_llama(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = M.Llama(M.LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=688, vocab_size=1000))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return m.to(device, dtype)


@pytest.mark.parametrize("method", ["lora", "dora", "lorada_la", "lorada_q"])
def test_bf16_loss_and_gradients_agree_with_fp32(method):
    """The bf16 recipe on the GPU (bf16 frozen weights, fp32 method tensors) gives the fp32 loss and
    gradients within bf16's resolution."""
    kw = dict(lmam_heads=2, lmam_len=64) if method.startswith("lorada") else {}
    if method == "lorada_q":
        kw["quanta_dims"] = "4-8-8"
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        m = methods.apply_method(tiny_llama("cuda", dtype), method, **kw).train()
        torch.manual_seed(1)
        for p in m.parameters():
            if p.requires_grad:
                p.data.add_(0.01 * torch.randn_like(p))
        ids = torch.randint(3, 1000, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
        loss = lm_loss(m(ids, return_hidden=True)[:, :-1], m.lm_head, ids[:, 1:]) / ids[:, 1:].numel()
        loss.backward()
        results.append((float(loss), [p.grad.float() for p in m.parameters() if p.requires_grad]))
    (l32, g32), (l16, g16) = results
    assert abs(l16 - l32) < 2e-2 * abs(l32)
    for a, b in zip(g16, g32):
        assert_close(a, b, atol=5e-2 * float(b.abs().max()) + 1e-6, rtol=0)


def test_compiled_equals_eager():
    m = methods.apply_method(tiny_llama("cuda", torch.bfloat16), "lorada_la", lmam_heads=2, lmam_len=64).train()
    ids = torch.randint(3, 1000, (2, 96), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with torch.no_grad():
        eager = m(ids, attention_mask=mask, return_hidden=True).float()
        compiled = torch.compile(m)(ids, attention_mask=mask, return_hidden=True).float()
    assert_close(compiled, eager, atol=3e-2, rtol=3e-2)


def test_gpu_and_cpu_generate_the_same_tokens():
    """fp32, greedy and 4-beam, a left-padded batch: token-identical on the GPU and the CPU."""
    cpu = tiny_llama("cpu").eval()
    gpu = tiny_llama("cuda").eval()
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    torch.backends.cuda.matmul.allow_tf32 = False
    for beams in (1, 4):
        a = generate(cpu, ids, mask, max_new_tokens=12, num_beams=beams, eos_id=2)
        b = generate(gpu, ids.cuda(), mask.cuda(), max_new_tokens=12, num_beams=beams, eos_id=2)
        assert torch.equal(a, b.cpu()), beams
