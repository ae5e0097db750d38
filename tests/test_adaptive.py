"""AdaLoRA and SoRA (adaptive.py, Table 11's baselines): AdaLoRA against peft's AdaLoraModel
(forward, gradients, the rank pattern after the same steps), SoRA's proximal gate step against its
formula, sparsity, pruning, and both through train.py (hooks, resume)."""

import pytest
import torch
from torch.testing import assert_close

import methods
import train as T
from adaptive import AdaLoRALinear, SoRAGates, SoRALinear, prune_sora, soft_threshold
from checkpoint import load, read_safetensors
from conftest import main_stopped_by_sigterm
from hf_deberta import batch, deberta_ckpt, save, tiny_deberta
from helpers import grads_match


def peft_to_ours(name):
    """peft's AdaLoRA names on DeBERTa -> ours."""
    k = name.removeprefix("base_model.model.deberta.encoder.").replace("layer.", "layers.")
    k = k.replace("attention.self.query_proj", "self_attn.q_proj").replace("attention.self.value_proj", "self_attn.v_proj")
    k = k.replace("intermediate.dense", "ffn.fc1")
    return k.replace(".default", "")


def adalora_pair(tmp_path, **schedule):
    """peft's AdaLoRA and ours on the same tiny DeBERTa, with the same (non-trivial) adapter values,
    on q_proj, v_proj and fc1 (query_proj, value_proj, intermediate.dense)."""
    from peft import AdaLoraConfig, get_peft_model
    hf = tiny_deberta()
    ours = load(save(hf, tmp_path / "d"))
    cfg = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, lora_dropout=0.0, orth_reg_weight=0.5, beta1=0.85,
                        beta2=0.85, target_modules=["query_proj", "value_proj", "intermediate.dense"], **schedule)
    pm = get_peft_model(hf, cfg)
    methods.apply_method(ours, "adalora", adalora_init_r=4, adalora_target_r=2, lora_alpha=8.0,
                         target_modules="q_proj,v_proj,fc1", adalora_orth_reg=0.5,
                         **{f"adalora_{k}": v for k, v in dict(tinit=schedule["tinit"], tfinal=schedule["tfinal"],
                                                                delta_t=schedule["deltaT"]).items()})
    theirs = {peft_to_ours(n): p for n, p in pm.named_parameters() if "lora_" in n}
    mine = dict(ours.named_parameters())
    assert set(theirs) == {n for n in mine if "lora_" in n} and len(theirs) == 2 * 3 * 3
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k, p in theirs.items():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
            mine[k].copy_(p)
    return pm, ours, theirs, mine


def test_adalora_forward_and_gradients_match_peft(tmp_path):
    pm, ours, theirs, mine = adalora_pair(tmp_path, tinit=1, tfinal=1, deltaT=1, total_step=4)
    ids, mask = batch()
    ref, out = pm(input_ids=ids, attention_mask=mask).logits, ours(ids, mask)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (ref * w).sum().backward()
    (out * w).sum().backward()
    grads_match(theirs, mine)
    # merged == unmerged (the SVD-form ΔW = P (Λ ⊙ Q) · α / (r + 1e-5))
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, AdaLoRALinear):
                m.merge()
        assert_close(ours(ids, mask), out, atol=1e-5, rtol=1e-5)


def test_adalora_rank_pattern_matches_peft(tmp_path):
    """Seven steps of AdamW on the same data: peft's loss (with its orthogonality regulariser) and
    update_and_allocate(global_step), global_step from 0 as in peft's examples and AdaLoRA's trainer
    (its AdaLoraModel.forward adds the regulariser; PeftModel.forward, without a task type, would
    skip it), ours through the update hook, which train.py calls with the 1-based step; the masks
    (zero Λ) agree after every step, through the cubic budget (t = 2-4), the final allocation (t = 5)
    and the fixed phase (t = 6)."""
    import torch.nn.functional as F
    total = 7
    pm, ours, theirs, mine = adalora_pair(tmp_path, tinit=1, tfinal=2, deltaT=1, total_step=total)
    hook, = methods.update_hooks(ours)
    names = sorted(theirs)
    opt_t = torch.optim.AdamW([theirs[n] for n in names], lr=0.05)
    opt_o = torch.optim.AdamW([mine[n] for n in names], lr=0.05)
    g = torch.Generator().manual_seed(9)
    ranks = []
    for step in range(1, total + 1):
        ids, mask = batch(seed=step)
        labels = torch.randint(0, 3, (3,), generator=g)
        pm.base_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt_t.step()
        pm.base_model.update_and_allocate(step - 1)
        opt_t.zero_grad()
        F.cross_entropy(ours(ids, mask), labels).backward()
        hook.before_update(ours, step, total)
        opt_o.step()
        hook.after_update(ours, step, total, 0.05)
        opt_o.zero_grad()
        for n in names:
            if n.endswith("lora_E"):
                assert torch.equal(mine[n] == 0, theirs[n] == 0), (step, n)
        ranks.append(sum(int((mine[n] != 0).sum()) for n in names if n.endswith("lora_E")))
    for n in names:
        assert_close(mine[n], theirs[n], atol=1e-4, rtol=1e-4)
    # 6 layers of initial rank 4, t = step − 1: 24 until tinit (t = 0, 1), the cubic budget
    # int(12·(1 − (t − 1)/4)³ + 12) at t = 2, 3, 4, the final 12 from t = 5 = total − tfinal
    assert ranks[:2] == [24, 24] and ranks[2:5] == [int(12 * (1 - (t - 1) / 4) ** 3 + 12) for t in (2, 3, 4)]
    assert ranks[5:] == [12, 12]
    assert "in all (target 2 per layer)" in hook.summary(ours)


# ----------------------------------------------------------------------------- SoRA

def test_soft_threshold_is_the_l1_proximal_step():
    z = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.1, 0.5, 0.7, 2.0])
    xi = 0.5
    direct = torch.tensor([max(abs(v) - xi, 0.0) * (1 if v > 0 else -1) for v in z.tolist()])
    assert torch.equal(soft_threshold(z, xi), direct)
    # argmin_g ½(g − z)² + ξ|g|, by brute force on a grid
    grid = torch.linspace(-4, 4, 80001, dtype=torch.float64)
    best = grid[((grid[None] - z[:, None].double()) ** 2 / 2 + xi * grid.abs()[None]).argmin(1)]
    assert_close(soft_threshold(z, xi).double(), best, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prox", ["released", "soft"])
@pytest.mark.parametrize("threshold", ["fixed", "lr"])
def test_sora_gate_step_is_adam_then_soft_threshold(threshold, prox):
    """One step of the gates written out: the L1 gradient λ·sign(g)/N added, transformers' AdamW
    (bias-corrected, ε 1e-6) at the step's lr, then, ξ = λ2 or lr·λ2, g ← sign(z)·max(|z| − ξ, 0)
    (soft) or the released code's g ← 0 where |z| < 2ξ, else sign(z)·(|z| − ξ). ξ = 0.07 puts the
    third gate (|z| = 0.02 ± 0.1) in (ξ, 2ξ), where the two differ."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = SoRALinear(base, r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_gate.copy_(torch.tensor([0.5, -0.3, 0.02, 1.0]))
        layer.lora_B.normal_()
    model = torch.nn.Sequential(layer)
    lr = 0.1
    hook = SoRAGates(lam=2.0, lam2=0.07 / (lr if threshold == "lr" else 1.0), threshold=threshold, prox=prox)
    layer(torch.randn(3, 6)).pow(2).sum().backward()
    g0, grad0 = layer.lora_gate.detach().clone(), layer.lora_gate.grad.clone()
    hook.before_update(model, 1, 10)
    grad = grad0 + 2.0 * torch.sign(g0) / 4
    assert_close(layer.lora_gate.grad, grad)
    hook.after_update(model, 1, 10, lr)
    m, v = 0.1 * grad, 0.001 * grad ** 2
    z = g0 - (lr * (1 - 0.999) ** 0.5 / (1 - 0.9)) * m / (v.sqrt() + 1e-6)     # bias-corrected Adam, t = 1
    xi = 0.07
    expected = torch.sign(z) * (z.abs() - xi).clamp(min=0)
    if prox == "released":
        expected = torch.where(z.abs() < 2 * xi, 0.0, expected)
    assert (expected[2] == 0) == (prox == "released") and 0 not in (expected[0], expected[1], expected[3])
    assert_close(layer.lora_gate.detach(), expected, atol=1e-7, rtol=1e-6)
    assert layer.lora_gate.grad is None and int(layer.gate_step) == 1          # AdamW's zero_grad does not reach it


def test_sora_large_lambda_prunes_every_gate_and_prune_keeps_the_function(tmp_path):
    path = save(tiny_deberta(), tmp_path / "d")
    base = load(path)
    ids, mask = batch()
    m = methods.apply_method(load(path), "sora", lora_r=4, sora_lambda2=0.3)
    gates = [x for x in m.modules() if isinstance(x, SoRALinear)]
    assert len(gates) == 12 and methods.update_hooks(m)[0].own_parameters(m) == [x.lora_gate for x in gates]
    with torch.no_grad():
        assert torch.equal(m(ids, mask), base(ids, mask))                   # B = 0: the base model
        for x in gates:
            x.lora_B.normal_(0, 0.1)
            x.lora_gate[:2] = 0.0                                           # two ranks already off
        before = m(ids, mask)
    ranks = prune_sora(m)
    assert set(ranks.values()) == {2} and gates[0].lora_A.shape == (2, 32) and gates[0].lora_B.shape[1] == 2
    with torch.no_grad():
        assert_close(m(ids, mask), before, atol=1e-6, rtol=1e-6)
    big = methods.apply_method(load(path), "sora", lora_r=4, sora_lambda2=100.0)     # ξ far above any gate
    hook, = methods.update_hooks(big)
    big(ids, mask).sum().backward()
    hook.before_update(big, 1, 5)
    hook.after_update(big, 1, 5, 1e-3)
    assert all(x.rank() == 0 for x in big.modules() if isinstance(x, SoRALinear))
    assert set(prune_sora(big).values()) == {0} and "SoRA ranks kept" in hook.summary(big)
    with torch.no_grad():
        for x in big.modules():
            if isinstance(x, SoRALinear):
                x.lora_B.normal_()
        assert torch.equal(big(ids, mask), base(ids, mask))                 # every rank gone: the base model


@pytest.mark.parametrize("name", ["adalora", "sora"])
def test_adapter_files_round_trip_with_their_state(tmp_path, name):
    """save_adapter / load_adapter carry the adapter and its hook's state (importance averages and
    masks, the gates' Adam moments): a loaded model computes the same and would resume the same."""
    path = save(tiny_deberta(), tmp_path / "d")
    m = methods.apply_method(load(path), name, **({"adalora_init_r": 3} if name == "adalora" else {"lora_r": 3}))
    ids, mask = batch()
    hook, = methods.update_hooks(m)
    m(ids, mask).sum().backward()
    hook.before_update(m, 1, 4)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    hook.after_update(m, 1, 4, 1e-2)
    methods.save_adapter(m, str(tmp_path / "a.safetensors"))
    fresh = methods.load_adapter(load(path), str(tmp_path / "a.safetensors"))
    state, loaded = methods.adapter_state(m), methods.adapter_state(fresh)
    assert any("ipt_avg" in k or "gate_exp_avg" in k for k in state) and state.keys() == loaded.keys()
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(fresh(ids, mask), m(ids, mask))


def test_sora_lambda_schedule_phases():
    hook = SoRAGates(1.0, 1e-4, schedule="linear", max_lambda=4e-4, lambda_num=4)
    assert [round(hook.lambda2(t, 8), 8) for t in range(1, 9)] == [1e-4, 1e-4, 2e-4, 2e-4, 3e-4, 3e-4, 4e-4, 4e-4]
    with pytest.raises(ValueError, match="unknown sora_schedule 'cosine'"):
        SoRAGates(1.0, 1e-4, schedule="cosine")


# ----------------------------------------------------------------------------- through train.py

def test_train_py_runs_the_hooks_and_resumes_bit_for_bit(tmp_path, capsys):
    """AdaLoRA and SoRA on DeBERTa through train.py: the allocation reaches its target, SoRA's
    gates are stepped by the hook (not AdamW), the summary is printed, and a run stopped by SIGTERM
    after 2 of 3 steps and resumed ends with the same adapter as an uninterrupted one (the
    importance averages, masks and the gates' Adam moments are buffers: the checkpoint has them)."""
    ckpt = deberta_ckpt(tmp_path / "ckpt")
    d = tmp_path / "SST-2"
    d.mkdir()
    rows = [("a joy", 1), ("lovely film", 1), ("dull mess", 0), ("far too long", 0)] * 3
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows[:4]))
    common = ["--model", ckpt, "--task", "sst2", "--data", str(d), "--batch_size", "4", "--num_epochs", "1",
              "--learning_rate", "1e-2", "--val_set_size", "0", "--save_step", "1", "--quiet"]
    flags = {"adalora": ["--adalora_init_r", "3", "--adalora_target_r", "1", "--adalora_tinit", "0",
                         "--adalora_tfinal", "1", "--adalora_delta_t", "1"],      # over sst2's preset (6000 steps)
             "sora": ["--lora_r", "3", "--sora_lambda2", "1e-3", "--lora_dropout", "0.1"]}
    for method, extra in flags.items():
        run = ["--method", method, *common, *extra]
        T.main(run + ["--out_dir", str(tmp_path / method / "full")])
        out = capsys.readouterr().out
        final = read_safetensors(str(tmp_path / method / "full" / "adapter.safetensors"))
        if method == "adalora":
            assert "AdaLoRA ranks kept (of 3), 12 in all (target 1 per layer)" in out
            assert sum(int((v != 0).sum()) for k, v in final.items() if k.endswith("lora_E")) == 12
        else:
            assert "SoRA ranks kept (nonzero gates, of 3)" in out
            ck = torch.load(tmp_path / method / "full" / "checkpoint.pt", weights_only=False)
            n_adamw = sum(len(g["params"]) for g in ck["optimizer"]["param_groups"])
            assert n_adamw == sum(1 for k in final if k.endswith(("lora_A", "lora_B"))) + 4   # + the head's
            assert all(int(v) == 3 for k, v in final.items() if k.endswith("gate_step"))
        main_stopped_by_sigterm(T.main, run + ["--out_dir", str(tmp_path / method / "part")], T.PIPELINES, "glue",
                                after=2)
        T.main(run + ["--out_dir", str(tmp_path / method / "part"), "--resume"])
        resumed = read_safetensors(str(tmp_path / method / "part" / "adapter.safetensors"))
        assert set(resumed) == set(final) and all(torch.equal(resumed[k], final[k]) for k in final), method
