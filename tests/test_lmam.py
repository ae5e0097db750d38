"""LMAM: fast path == naive Eq. 12, padding, decoding, causality, merge, s = 0, gradients, presets."""
import math
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import methods
import model as M
from conftest import assert_decode_equals_full, ROOT
from lmam import LMAM
from test_methods import tiny


def lmam_model(variant="gqa", **kw):
    ours, _ = tiny(variant)
    hp = dict(lmam_heads=2, lmam_rank=2, lmam_len=6, lmam_scale=0.05)
    hp.update(kw)
    return methods.apply_method(ours, "lmam", **hp)


def padded(T=9):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 512, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :3] = 0          # left padding
    mask[2, T - 2:] = 0      # right padding
    return ids, mask


def run_both_paths(m, ids, mask):
    """Outputs and LMAM gradients of the fast path and of the naive (materialised) path."""
    results = []
    for naive in (False, True):
        m.zero_grad()
        out = m(ids, attention_mask=mask, need_weights=naive)
        out = out[0] if naive else out
        (out[mask.bool()] * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out.detach(), [p.grad.clone() for n, p in m.named_parameters() if p.requires_grad]))
    return results


CASES = {
    "hs<h, n<N": dict(), "hs=h": dict(lmam_heads=4), "n>N": dict(lmam_len=20), "tail": dict(lmam_mode="tail"),
    "tail n>N": dict(lmam_mode="tail", lmam_len=20), "pre_softmax": dict(lmam_variant="pre_softmax"),
    "softmax_map": dict(lmam_variant="softmax_map"), "full_rank": dict(lmam_variant="full_rank"),
    "no_pos": dict(lmam_variant="no_pos"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", ["mha", "gqa"])
def test_fast_path_equals_naive_eq12(case, variant):
    m = lmam_model(variant, **CASES[case])
    ids, mask = padded()
    (fast, g_fast), (naive, g_naive) = run_both_paths(m, ids, mask)
    real = mask.bool()
    assert_close(fast[real], naive[real], atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fast, g_naive):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in g_fast)


def test_bidirectional_fast_equals_naive():
    torch.manual_seed(0)
    for kw in (dict(), dict(tail=True), dict(variant="softmax_map")):
        lm = LMAM(4, 2, 2, 5, 0.1, causal=False, **kw)
        q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
        valid = torch.ones(2, 7, dtype=torch.bool)
        valid[1, 5:] = False
        pos = M.token_positions(valid.long())
        mask = valid[:, None, None, :].expand(2, 1, 7, 7)
        fast, _ = lm.attend(q, k, v, mask, is_causal=False, positions=(pos, pos, valid))
        naive, _ = lm.attend(q, k, v, mask, is_causal=False, positions=(pos, pos, valid), need_weights=True)
        assert_close(fast, naive, atol=1e-5, rtol=1e-5)


def test_naive_map_is_eq_10_11_with_repeat():
    lm = LMAM(4, 2, 3, 5, 0.5, causal=True)
    pe = 1 / 10000 ** (2 * torch.arange(5.0) / 5)
    expected = ((lm.wa + pe[:, None]) @ (lm.wb + pe[None, :]) * 0.5).tril()      # Eq. 7-11
    assert_close(lm.attn_map(), expected)
    assert torch.equal(lm.heads_map(lm.attn_map())[3], lm.attn_map()[1])          # head 3 uses map 3 mod 2
    before = lm.wa.detach().clone()
    lm.attn_map(), lm.attn_map()
    assert torch.equal(lm.wa, before)                                             # PE never accumulates


@pytest.mark.parametrize("mode", ["head", "tail"])
def test_padding_invariance(mode):
    m = lmam_model(lmam_mode=mode)
    ids = torch.randint(3, 512, (1, 7))
    with torch.no_grad():
        alone = m(ids)
        z = torch.zeros(1, 4, dtype=torch.long)
        left = m(torch.cat([z, ids], 1), attention_mask=torch.tensor([[0] * 4 + [1] * 7]))[:, 4:]
        right = m(torch.cat([ids, z], 1), attention_mask=torch.tensor([[1] * 7 + [0] * 4]))[:, :7]
    assert_close(left, alone, atol=1e-5, rtol=1e-5)
    assert_close(right, alone, atol=1e-5, rtol=1e-5)


def test_decode_equals_full_forward_and_generation_runs():
    m = lmam_model()
    ids, mask = padded()
    ids, mask = ids[:2], mask[:2]
    assert_decode_equals_full(m, ids, mask, prefill=3)


def test_tail_mode_refuses_kv_cache_decoding():
    m = lmam_model(lmam_mode="tail")
    cache = m.new_cache(1, 4)
    m(torch.tensor([[5, 6]]), cache=cache)
    with pytest.raises(ValueError, match="tail mode .* cannot decode with a KV cache"):
        m(torch.tensor([[7]]), attention_mask=torch.ones(1, 3, dtype=torch.long), cache=cache)


def test_no_information_from_future_tokens():
    m = lmam_model(lmam_scale=1.0)
    ids = torch.randint(3, 512, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = 7
    with torch.no_grad():
        assert_close(m(ids)[:, :5], m(changed)[:, :5], atol=1e-6, rtol=1e-6)


def test_merged_equals_unmerged_and_zero_scale_is_the_base_model():
    base, _ = tiny("gqa")
    ids, mask = padded()
    with torch.no_grad():
        ref = base(ids, attention_mask=mask)
    m = lmam_model()
    with torch.no_grad():
        out = m(ids, attention_mask=mask)
        maps = [mod for mod in m.modules() if isinstance(mod, LMAM)]
        for mod in maps:
            mod.merge()
        assert len(maps) == 2 and all(mod.merged_map is not None for mod in maps)
        assert_close(m(ids, attention_mask=mask), out, atol=1e-5, rtol=1e-5)   # fp32 summation order
    real = mask.bool()
    assert not torch.allclose(out[real], ref[real], atol=1e-4)
    zero = lmam_model(lmam_scale=0.0)
    with torch.no_grad():
        assert_close(zero(ids, attention_mask=mask)[real], ref[real], atol=1e-6, rtol=1e-6)
    zero_init = lmam_model(lmam_init="zero")
    with torch.no_grad():
        assert_close(zero_init(ids, attention_mask=mask)[real], ref[real], atol=1e-6, rtol=1e-6)


def test_papers_scale_trains_the_map():
    """With 1/s = 4096·600 (LLaMA-7B) the map gets gradient and a few AdamW steps move the outputs."""
    m = lmam_model(lmam_len=8, lmam_scale=1 / (4096 * 600))
    ids, mask = padded()
    with torch.no_grad():
        before = m(ids, attention_mask=mask)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(5):
        logits = m(ids, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(p.grad.abs().max() > 0 for p in params)
        opt.step()
    with torch.no_grad():
        after = m(ids, attention_mask=mask)
    real = mask.bool()
    assert (after[real] - before[real]).abs().max() > 1e-5


def test_bad_input():
    with pytest.raises(ValueError, match="4 attention heads are not divisible by lmam_heads=3"):
        lmam_model(lmam_heads=3)
    with pytest.raises(ValueError, match="lmam_rank and lmam_len must be positive"):
        lmam_model(lmam_rank=0)
    with pytest.raises(ValueError, match="unknown lmam_variant 'fancy'"):
        lmam_model(lmam_variant="fancy")


def test_registry_pairs_apply_and_train_only_their_parameters():
    for name in ("lorada_la", "lorada_q", "lora+lmam", "dora+lmam", "parallel+lmam", "series+lmam"):
        ours, _ = tiny("gqa")
        kw = dict(lmam_heads=2, lmam_len=6)
        if "quanta" in methods.METHODS[name]["parts"]:
            kw["quanta_dims"] = "4-4-4"
        methods.apply_method(ours, name, **kw)
        names = [n for n, p in ours.named_parameters() if p.requires_grad]
        assert any(n.endswith("attn_map.wa") for n in names), name
        assert not any(n.endswith(("q_proj.weight", "embed_tokens.weight")) for n in names), name


PAPER = [("llama-7b", 0.09), ("llama2-7b", 0.08), ("llama-13b", 0.05), ("llama3-8b", 0.05), ("llama2-70b", 0.029)]


def test_dry_run_reproduces_loradas_percentages():
    def pct(model, method):
        out = subprocess.run([sys.executable, "train.py", "--model", model, "--method", method, "--dry-run"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return float(out.stdout.strip().splitlines()[-1].rsplit(" ", 1)[1])
    for model, expected in PAPER:          # Table 4, LoRaDA-LA
        assert round(pct(model, "lorada_la"), len(str(expected)) - 2) == expected, model
    # Table 4, LoRaDA-Q on LLaMA-7B: 0.0447% here; the paper prints 0.044 (truncated, as its 0.037
    # for LLaMA3-8B, 0.0375% here)
    assert math.floor(pct("llama-7b", "lorada_q") * 1000) / 1000 == 0.044
