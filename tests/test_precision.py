"""The GPU recipe, checked on this CPU: bf16 frozen weights with fp32 method tensors (--precision
bf16), torch.compile with gradient checkpointing, one graph per forward, no host-device sync in a
training step, DoRA's magnitude in bf16, the GLUE head next to bf16 weights."""
import json
import shutil
import subprocess

import pytest
import torch
from torch.testing import assert_close

import eval as E
import methods
import model as M
import train as T
from checkpoint import load
from conftest import ROOT, shared
from generate import generate
from helpers import glue_dir, run_train, small_flags, tiny_bart_ckpt, tiny_roberta_ckpt
from hf_encdec import V, batch, byte_vocab_dir, save, tiny_bart, tiny_roberta
from lora import DoRALinear


# ----------------------------------------------------------------------------- the bf16 recipe, every method

@pytest.mark.parametrize("method", [m for m in methods.METHODS if m != "bitfit"])    # LLaMA has no biases
def test_bf16_recipe_trains_validates_merges_generates_llama(tiny_ckpt, tmp_path, method):
    out = tmp_path / method
    T.main(["--model", tiny_ckpt, "--method", method, "--data", "commonsense_sample", "--out_dir", str(out),
            "--device", "cpu", "--precision", "bf16", "--max_steps", "2", "--batch_size", "2",
            "--micro_batch_size", "1", "--val_set_size", "2", "--eval_step", "2", "--quiet", *small_flags(method)])
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log) and "val_loss" in log[-1]
    model, tok = E.load_for_eval(tiny_ckpt, str(out / "adapter.safetensors"), precision="bf16")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in methods.adapter_state(model)
               and not methods.trains_base(method))            # (those train base weights: fp32 + autocast)
    ids = torch.tensor([tok.encode("Please answer", bos=True)])
    if model.peft_method["hparams"].get("lmam_mode") == "tail":       # Eq. 16's map moves with each token: no cache
        assert torch.isfinite(model(ids).float()).all()
    else:
        assert generate(model, ids, max_new_tokens=3, eos_id=tok.eos_id).shape[1] > ids.shape[1]


def test_bf16_refuses_settings_that_unfreeze_base_weights_the_probe_did_not_see(tiny_ckpt, tmp_path, monkeypatch):
    """methods.trains_base probes a method with its defaults. A method whose *flag* unfreezes base
    weights (here: the norms, off by default) is loaded in bf16 by the probe's answer; train.py then
    refuses to train those bf16 weights, naming them, instead of training them in bf16."""
    def lora_maybe_norms(model, lora_r=2, lora_alpha=4.0, lora_dropout=0.0, target_modules="q_proj,v_proj",
                         train_norms=False):
        methods.lora(model, lora_r, lora_alpha, lora_dropout, target_modules)
        for name, p in model.named_parameters():
            if train_norms and name.endswith("norm.weight"):
                p.requires_grad_(True)
    monkeypatch.setitem(methods.METHODS, "lora_maybe_norms", lora_maybe_norms)
    run = ["--model", tiny_ckpt, "--method", "lora_maybe_norms", "--data", "commonsense_sample", "--device", "cpu",
           "--precision", "bf16", "--max_steps", "1", "--batch_size", "2", "--micro_batch_size", "1",
           "--val_set_size", "2", "--quiet"]
    assert not methods.trains_base("lora_maybe_norms")
    with pytest.raises(SystemExit, match=r"trains base weights.*\(layers\.0\.\w+norm\.weight.*use --precision fp32"):
        T.main(run + ["--out_dir", str(tmp_path / "bf16"), "--train_norms", "true"])
    T.main(run + ["--out_dir", str(tmp_path / "off"), "--train_norms", "false"])      # bf16, nothing unfrozen
    T.main(run + ["--out_dir", str(tmp_path / "fp32"), "--train_norms", "1", "--precision", "fp32"])
    assert (tmp_path / "fp32" / "adapter.safetensors").exists() and (tmp_path / "off" / "adapter.safetensors").exists()


@pytest.mark.parametrize("family", ["roberta", "bart"])
def test_bf16_recipe_on_the_medium_models(tmp_path, family):
    """Every method that applies to RoBERTa (GLUE) and BART (XSum) trains and validates in bf16;
    the GLUE head is fp32 next to bf16 weights (it crashed: "mat1 and mat2 must have the same dtype")."""
    if family == "roberta":
        ckpt, task = tiny_roberta_ckpt(tmp_path / "ckpt"), ["--task", "sst2", "--data", glue_dir(tmp_path)]
    else:
        sample = shared("hf-seq2seq-samples", "xsum", "sample.json")
        data = tmp_path / "xsum"
        data.mkdir()
        for split in ("train", "val"):
            shutil.copy(sample, data / f"{split}.json")
        ckpt = tiny_bart_ckpt(tmp_path / "ckpt")
        byte_vocab_dir(ckpt)
        task = ["--task", "xsum", "--data", str(data), "--cutoff_len", "64", "--max_target_len", "16"]
    for method in ("lora", "dora", "series", "adapter_ffn", "prefix", "mam", "lmam", "lorada_a", "bitfit", "full"):
        out = tmp_path / method
        T.main(["--model", ckpt, "--method", method, *task, "--out_dir", str(out), "--device", "cpu",
                "--precision", "bf16", "--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "2",
                "--val_set_size", "4", "--eval_step", "2", "--quiet", *small_flags(method, lmam_len=32)])
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log), method
        assert any(k.startswith("val_") for k in log[-1]), method


# ----------------------------------------------------------------------------- compile, checkpointing

@pytest.mark.slow
def test_compile_with_gradient_checkpointing_padding_and_prefix_trains(tiny_ckpt, tmp_path):
    """--compile --gradient_checkpointing on padded micro-batches with prefix tuning (it crashed
    inside dynamo, prefix even without padding)."""
    cmd = run_train(tiny_ckpt, tmp_path, "--max_steps", "2", "--micro_batch_size", "2", "--batch_size", "4",
                    "--compile", "--gradient_checkpointing", "--device", "cpu", method="prefix")
    i = cmd.index("--lora_r")
    cmd[i:i + 2] = ["--prefix_len", "3"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2


def explain(model, *args, **kw):
    return torch._dynamo.explain(model)(*args, **kw)


def test_one_graph_for_a_training_forward():
    """A training forward is one graph for dynamo, padded and unpadded, LLaMA (with LoRA and LMAM)
    and BART: no graph break from a mask check or from a symbolic is_causal."""
    torch._dynamo.reset()
    llama = M.Llama(M.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=100))
    methods.apply_method(llama, "lorada_la", lmam_heads=2, lmam_len=8, adapter_r=2)
    llama.train()
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    for kw in (dict(), dict(attention_mask=mask)):
        e = explain(llama, ids, return_hidden=True, **kw)
        assert e.graph_count == 1 and e.graph_break_count == 0, (kw.keys(), e.break_reasons)
    bart = load_tiny_bart().train()
    src, src_mask = batch()
    dec = torch.randint(4, V, (3, 5))
    for m in (None, src_mask):
        e = explain(bart, src, m, dec)
        assert e.graph_count == 1 and e.graph_break_count == 0, e.break_reasons


def load_tiny_bart():
    torch.manual_seed(0)
    hf = tiny_bart("bart")
    ours = M.Bart(M.BartConfig(dim=hf.config.d_model, encoder_layers=hf.config.encoder_layers,
                               decoder_layers=hf.config.decoder_layers, n_heads=hf.config.encoder_attention_heads,
                               hidden_dim=hf.config.encoder_ffn_dim, vocab_size=hf.config.vocab_size,
                               max_positions=hf.config.max_position_embeddings))
    return ours


# ----------------------------------------------------------------------------- host-device syncs

class SyncCounter:
    """Counts the Tensor methods that read a value back to the host (a GPU sync) while active."""
    NAMES = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy")

    def __enter__(self):
        self.calls, self.saved = [], {}
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            self.saved[name] = original

            def counting(t, *a, _name=name, _original=original, **k):
                self.calls.append(_name)
                return _original(t, *a, **k)
            setattr(torch.Tensor, name, counting)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def test_no_host_sync_in_a_training_step(tmp_path):
    """Forward, loss and backward of a padded micro-batch read no tensor value on the host:
    LLaMA (LoRaDA-LA, the fused LM-head loss), RoBERTa (LoRaDA-A, GLUE head), BART (LoRA)."""
    from loss import lm_loss
    llama = M.Llama(M.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=100))
    methods.apply_method(llama, "lorada_la", lmam_heads=2, lmam_len=8, adapter_r=2)
    roberta = load(save(tiny_roberta(), tmp_path / "r"), num_labels=3)
    methods.apply_method(roberta, "lorada_a", lmam_heads=2, lmam_len=8, adapter_r=2)
    bart = methods.apply_method(load_tiny_bart(), "lora", lora_r=2)
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    src, src_mask = batch()
    dec = torch.randint(4, V, (3, 5))
    for m in (llama, roberta, bart):
        m.train()
    with SyncCounter() as sync:
        lm_loss(llama(ids, attention_mask=mask, return_hidden=True)[:, :-1], llama.lm_head, ids[:, 1:]).backward()
        torch.nn.functional.cross_entropy(roberta(src, src_mask), torch.tensor([0, 1, 1])).backward()
        bart(src, src_mask, dec).float().sum().backward()
    assert sync.calls == []


def test_one_sync_per_decoding_step():
    """Greedy decoding reads one value per step (is every row done?), beam search one too."""
    llama = M.Llama(M.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=100)).eval()
    ids = torch.randint(3, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    for beams in (1, 3):
        with SyncCounter() as sync:
            out = generate(llama, ids, mask, max_new_tokens=5, num_beams=beams, eos_id=2)
        steps = out.shape[1] - ids.shape[1]
        # one check of the prompt's padding per call, one stopping test per step, and (beam search)
        # the final length
        assert len(sync.calls) <= 1 + steps + (beams > 1), sync.calls


# ----------------------------------------------------------------------------- DoRA in bf16

def test_dora_magnitude_change_shows_in_bf16():
    """A 0.1% change of DoRA's magnitude changes the bf16 output (it rounded away when m/‖W‖ ≈ 1 was
    cast to bf16), and the bf16 layer matches the fp32 one within bf16's resolution."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 64)
    layer32 = DoRALinear(base, 4, 8.0)
    layer16 = DoRALinear(torch.nn.Linear(64, 64).to(torch.bfloat16), 4, 8.0)
    with torch.no_grad():
        layer16.weight.copy_(base.weight.to(torch.bfloat16))
        layer16.bias.copy_(base.bias.to(torch.bfloat16))
        layer32.weight.copy_(layer16.weight.float())                     # the same (bf16-exact) weights
        layer32.bias.copy_(layer16.bias.float())
        for a, b in ((layer16.lora_B, layer32.lora_B), (layer16.lora_A, layer32.lora_A)):
            a.copy_(torch.randn_like(a) * 0.05)
            b.copy_(a)
        layer16.magnitude.copy_(layer32.weight_norm())
        layer32.magnitude.copy_(layer32.weight_norm())
    x = torch.randn(8, 64).to(torch.bfloat16)
    with torch.no_grad():
        before = layer16(x)
        layer16.magnitude.mul_(1.001)
        layer32.magnitude.mul_(1.001)
        after, ref = layer16(x), layer32(x.float())
    assert not torch.equal(after, before)
    assert_close(after.float(), ref, atol=2e-2, rtol=8e-3)
