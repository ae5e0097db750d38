"""The LLaMA pipeline: data and prompts, train.py (schedule, resume, signals, compile), eval.py."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import eval as E
import methods
import train as T
from checkpoint import load, read_safetensors
from conftest import ROOT, shared
from data import llm_adapters
from helpers import (CharTokenizer, markdown_tables, run_train, shows, sigterm_after_two_steps,
                     torchrun_stopped_and_resumed)
from tokenizer import load_tokenizer

INDENT = " " * 16


# ----------------------------------------------------------------------------- prompts and data

def test_prompts_are_byte_exact():
    r = {"instruction": "Q?", "input": "", "output": "the correct answer is true"}
    assert llm_adapters.train_prompt(r) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.  "
        "\n\n" + INDENT + "### Instruction:\n" + INDENT + "Q?\n" + INDENT + "\n" + INDENT + "### Response:\n" + INDENT
        + "the correct answer is true")
    assert llm_adapters.eval_prompt(r) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
        "\n\n" + INDENT + "### Instruction:\n" + INDENT + "Q?\n\n" + INDENT + "### Response:\n" + INDENT)
    with_input = llm_adapters.train_prompt({**r, "input": "ctx"})
    assert "paired with an input" in with_input and "### Input:\n" + INDENT + "ctx\n" + INDENT + "\n" in with_input


def test_tokenize_bos_eos_truncation_and_masking():
    tok = CharTokenizer()
    r = {"instruction": "Q?", "input": "", "output": "yes"}
    full = llm_adapters.tokenize(tok, r, cutoff_len=1000)
    assert full["input_ids"][0] == 1 and full["input_ids"][-1] == 2            # BOS, and EOS when it fits
    assert full["labels"] == full["input_ids"]                                   # train_on_inputs by default
    cut = llm_adapters.tokenize(tok, r, cutoff_len=50)
    assert len(cut["input_ids"]) == 50 and cut["input_ids"][-1] != 2             # truncated: no EOS
    masked = llm_adapters.tokenize(tok, r, cutoff_len=1000, train_on_inputs=False)
    n_prompt = len(tok.encode(llm_adapters.train_prompt({**r, "output": ""})))
    assert masked["labels"][:n_prompt] == [-100] * n_prompt
    assert masked["labels"][n_prompt:] == full["input_ids"][n_prompt:]
    batch = llm_adapters.collate([full, masked], pad_id=0)
    assert batch["labels"][1, len(masked["labels"]):].eq(-100).all()            # -100 on padding
    assert batch["attention_mask"].sum(1).tolist() == [len(full["input_ids"]), len(masked["input_ids"])]


def test_real_tokenizer_on_real_records():
    tok = load_tokenizer(shared("llama2-tokenizer", "tokenizer.model"))
    recs = llm_adapters.load_records(shared("llm_adapters", "dataset", "boolq", "train.json"))
    assert len(recs) > 1000
    e = llm_adapters.tokenize(tok, recs[0], 256)
    assert e["input_ids"][0] == 1 and e["input_ids"][-1] == 2 and len(e["input_ids"]) <= 256
    assert tok.decode(e["input_ids"][1:-1]) == llm_adapters.train_prompt(recs[0])


@pytest.mark.parametrize("task", ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Challenge", "ARC-Easy",
                                  "openbookqa", "AddSub", "MultiArith", "SingleEq", "gsm8k", "AQuA", "SVAMP", "mawps"])
def test_real_test_sets_load_and_their_gold_outputs_score_correct(task):
    recs = llm_adapters.load_records(shared("llm_adapters", "dataset", task, "test.json"), fields=("instruction", "answer"))
    # the commonsense files' outputs are "the correct answer is <answer>": extraction must find it
    if task in E.CHOICES:
        assert all(E.extract_answer(task, r["output"]) == r["answer"] for r in recs)
    else:
        for r in recs[:50]:
            assert E.is_correct(task, r["answer"], E.extract_answer(task, str(r["answer"])))


def test_length_grouped_batches_are_a_deterministic_partition():
    lengths = [(i * 37) % 101 for i in range(500)]
    a = llm_adapters.length_grouped_batches(lengths, 8, seed=3, mega=16)
    assert a == llm_adapters.length_grouped_batches(lengths, 8, seed=3, mega=16)
    assert sorted(i for b in a for i in b) == list(range(500))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    assert spread < 20                                  # random batches would spread ~70


def test_bad_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json: no such data file"):
        llm_adapters.load_records(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text('[{"instruction": "a", "output": "b"},')
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON \(line 1"):
        llm_adapters.load_records(str(tmp_path / "bad.json"))
    (tmp_path / "missing.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(ValueError, match="missing.json: record 1 has no field 'output'"):
        llm_adapters.load_records(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="unknown dataset 'commonsense_17k'"):
        llm_adapters.resolve("commonsense_17k")


# ----------------------------------------------------------------------------- answer extraction

@pytest.mark.parametrize("dataset,text,expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false, and then true", "false"),                     # the first match
    ("boolq", "I am not sure", ""),                                 # none
    ("piqa", "solution2 is better than solution1", "solution2"),
    ("ARC-Challenge", "the correct answer is answer4", "answer4"),
    ("winogrande", "option2", "option2"),
    ("hellaswag", "ending3", "ending3"),
    ("gsm8k", "He pays 1,200 dollars, then 3,450. The answer is 3,450.", 3450.0),   # commas, the last number
    ("SVAMP", "The answer is -7.", -7.0),
    ("mawps", "x = 1.8333", 1.8333),
    ("AddSub", "no number here", float("inf")),
    ("AQuA", "Each option... the answer is (C)", "E"),              # the first capital A-E, as the reference
    ("AQuA", "none", ""),
])
def test_extract_answer(dataset, text, expected):
    assert E.extract_answer(dataset, text) == expected


def test_numeric_scoring_tolerance_and_unknown_dataset():
    assert E.is_correct("gsm8k", "18.0", 18.0005) and not E.is_correct("gsm8k", "18.0", 18.01)
    assert not E.is_correct("gsm8k", "18.0", float("inf"))
    with pytest.raises(ValueError, match="unknown dataset 'trivia'"):
        E.extract_answer("trivia", "x")


# ----------------------------------------------------------------------------- train.py

def test_schedule_values():
    f = T.linear_schedule(warmup=10, total=110)
    assert [f(0), f(5), f(10), f(60), f(110)] == [0.0, 0.5, 1.0, 0.5, 0.0]


@pytest.mark.slow
def test_resume_is_bit_exact_and_sigterm_saves(tiny_ckpt, tmp_path):
    """A run stopped by SIGTERM and resumed ends with the same adapter, bit for bit, as an
    uninterrupted one (with LoRA dropout, so the RNG state matters too)."""
    subprocess.run(run_train(tiny_ckpt, tmp_path / "a2", "--lora_dropout", "0.1"), cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    b = tmp_path / "b2"
    returncode, err = sigterm_after_two_steps(run_train(tiny_ckpt, b, "--lora_dropout", "0.1"), b)
    assert returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved" in err and (b / "checkpoint.pt").exists()
    stopped_at = torch.load(b / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert 2 <= stopped_at < 12, stopped_at         # 3 train records / batch 2 = 2 steps x 4 epochs... or fewer
    out = subprocess.run(run_train(tiny_ckpt, b, "--lora_dropout", "0.1", "--resume"), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stdout
    ref = read_safetensors(str(tmp_path / "a2" / "adapter.safetensors"))
    got = read_safetensors(str(b / "adapter.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # and the logs agree step by step after the resume
    la = [json.loads(x)["loss"] for x in (tmp_path / "a2" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "log.jsonl").read_text().splitlines()]
    assert la == lb


@pytest.mark.slow
def test_outputs_of_a_run_and_the_adapter_reproduce(tiny_ckpt, tmp_path):
    out = subprocess.run(run_train(tiny_ckpt, tmp_path, "--max_steps", "4"), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "args.json", "checkpoint.pt", "log.jsonl"]
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "val_loss" in rows[1]
    assert all({"loss", "lr", "tokens_per_s", "tokens"} <= r.keys() for r in rows)
    model, tok = E.load_for_eval(tiny_ckpt, str(tmp_path / "adapter.safetensors"))
    assert model.peft_method["name"] == "lora"


@pytest.mark.slow
def test_lmam_map_size_is_logged_and_grows(tiny_ckpt, tmp_path):
    """train.py logs max |Attn_s| per layer: 0 at the start (identity), then growing, at the
    paper's lr 1e-4 (lorada_la's preset) and an s of the paper's form, 1/(d·600)."""
    out = subprocess.run(run_train(tiny_ckpt, tmp_path, "--max_steps", "4", "--warmup_steps", "0", method="lorada_la")
                         + ["--lmam_heads", "2", "--lmam_len", "16", "--lmam_scale", str(1 / (32 * 600)),
                            "--lora_r", "1", "--adapter_r", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    sizes = [r["lmam_max_abs"] for r in rows]
    assert all(len(s) == 2 for s in sizes)                          # one per layer
    assert 0 < max(sizes[0]) < max(sizes[-1]) < 0.1                 # a step of lr 1e-4 moves it by ~1e-4


def test_gradient_checkpointing_gives_the_same_gradients(tiny_ckpt):
    m = load(tiny_ckpt).train()                   # gradient checkpointing runs in training mode only
    methods.apply_method(m, "lora", lora_r=2, lora_dropout=0.0)
    ids = torch.randint(3, 200, (2, 12))
    grads = []
    for ckpt in (False, True):
        m.gradient_checkpointing = ckpt
        m.zero_grad()
        m(ids).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_checkpoint(tiny_ckpt, tmp_path):
    out = subprocess.run(run_train(tiny_ckpt, tmp_path, "--max_steps", "6", "--learning_rate", "1e30",
                                   "--max_grad_norm", "1e30"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "loss is nan" in out.stderr.lower() or "loss is inf" in out.stderr.lower(), out.stderr


@pytest.mark.slow
def test_bad_cli_input(tiny_ckpt, tmp_path):
    cases = [(["--data", str(tmp_path / "none.json")], "none.json: no such data file"),
             (["--data", "commonsense_17k"], "unknown dataset 'commonsense_17k'"),
             (["--method", "lorra"], "valid methods"),
             (["--resume"], "checkpoint.pt does not exist"),
             (["--data", os.path.join(tiny_ckpt, "config.json")], "expected a JSON list of records"),
             (["--data", shared("llm_adapters", "dataset", "mawps", "testset.json")], "record 0 has no field")]
    for extra, msg in cases:
        out = subprocess.run(run_train(tiny_ckpt, tmp_path / "x", *extra), cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode != 0 and msg in out.stderr, (extra, out.stderr[-2000:])
    # a shape preset that is not a paper name (those download their hub id: tests/test_hub.py)
    out = subprocess.run([sys.executable, "train.py", "--model", "llama-tiny", "--method", "lora"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "shape preset without weights" in out.stderr


# ----------------------------------------------------------------------------- eval.py

def test_eval_resumes_and_prints_the_table(tiny_ckpt, tmp_path):
    args = ["--model", tiny_ckpt, "--task", "boolq", "--data", llm_adapters.resolve("commonsense_sample"),
            "--out_dir", str(tmp_path), "--max_new_tokens", "4", "--num_beams", "2"]
    res = E.main(args)
    lines = (tmp_path / "boolq.jsonl").read_text().splitlines()
    assert len(lines) == 8 and res["boolq"]["total"] == 8
    # a rerun after losing the last three predictions only redoes those
    (tmp_path / "boolq.jsonl").write_text("\n".join(lines[:5]) + "\n")
    res2 = E.main(args)
    assert len((tmp_path / "boolq.jsonl").read_text().splitlines()) == 8 and res2 == res
    assert json.loads((tmp_path / "results.json").read_text())["boolq"]["total"] == 8
    [[row]] = markdown_tables(E.markdown_table({"boolq": {"accuracy": 0.5}, "piqa": {"accuracy": 1.0}}, "lora"))
    assert list(row) == ["Method", "BoolQ", "PIQA", "Avg."] and row["Method"] == "lora"
    assert shows(row["BoolQ"], 50.0) and shows(row["PIQA"], 100.0) and shows(row["Avg."], 75.0), row


@pytest.mark.slow
def test_eval_bad_input(tiny_ckpt, tmp_path):
    for extra, msg in ((["--task", "trivia"], "unknown task 'trivia'"),
                       (["--task", "boolq", "--data", str(tmp_path / "x.json")], "x.json: no such test file")):
        out = subprocess.run([sys.executable, "eval.py", "--model", tiny_ckpt, "--out_dir", str(tmp_path), *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and msg in out.stderr, out.stderr


# ----------------------------------------------------------------------------- the demo

def test_demo_pipeline_end_to_end_small(tmp_path, monkeypatch):
    import demo
    monkeypatch.setattr(demo, "CACHE", str(tmp_path))
    before, after = demo.main(base=str(tmp_path / "base"), pretrain_steps=30, finetune_steps=4, n_train=40, n_test=6)
    assert all(0 <= a <= 1 for a in before) and set(after) == {"lorada_la", "lora"}
    assert (tmp_path / "run_lorada_la" / "adapter.safetensors").exists()
    budget = {}
    for name in after:
        ck = json.loads((tmp_path / f"run_{name}" / "args.json").read_text())
        budget[name] = ck["method"]["name"]
    assert budget == {"lorada_la": "lorada_la", "lora": "lora"}


@pytest.mark.parametrize("name", [m for m in methods.METHODS if not methods.trains_base(m)])
def test_bf16_frozen_weights_with_fp32_trainable_tensors(tiny_ckpt, name):
    """The GPU recipe, checked on CPU: frozen weights in bf16, the method's tensors in fp32; forward
    and backward run and every gradient is fp32."""
    m = load(tiny_ckpt, dtype=torch.bfloat16).train()
    takes = methods.hyperparameters(methods.METHODS[name])
    kw = {"quanta_dims": "4-8"} if "quanta_dims" in takes else {}
    if "lmam_heads" in takes:
        kw.update(lmam_heads=2, lmam_len=8)
    if name in ("series", "parallel", "adapter_ffn", "mam", "lorada_la", "parallel+lmam", "series+lmam"):
        kw["adapter_r"] = 4
    if name in ("prefix", "mam"):
        kw["prefix_len"] = 3
    methods.apply_method(m, name, **kw)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters() if not p.requires_grad)
    logits = m(torch.randint(3, 200, (2, 10)), attention_mask=torch.tensor([[1] * 10, [0] * 3 + [1] * 7]))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


@pytest.mark.slow
def test_two_processes_take_the_single_process_steps(tiny_ckpt, tmp_path):
    """Data parallel over 2 CPU processes (torchrun, gloo): the same global batches with the
    gradients summed across processes give the adapter, the optimizer moments and the losses of
    one process (no dropout), up to rounding. Every second step has a single micro-batch, so
    process 1 sits it out with zero gradients. Resuming with another process count is refused."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--max_steps", "4", "--lora_dropout", "0")
    env = dict(os.environ, OMP_NUM_THREADS="1")                     # as torchrun sets for each process
    out = subprocess.run(run_train(tiny_ckpt, one, *args), cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = subprocess.run(torchrun + run_train(tiny_ckpt, two, *args)[1:], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("trainable params") == 1                # process 0 reports, logs, writes
    a = read_safetensors(str(one / "adapter.safetensors"))
    b = read_safetensors(str(two / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (one, two))
    assert len(ca["rng"]) == 1 and len(cb["rng"]) == 2
    assert not torch.equal(cb["rng"][0]["torch"], cb["rng"][1]["torch"])   # each process its own dropout stream
    moments = lambda ck: [s["exp_avg"] for s in ck["optimizer"]["state"].values()]
    for ma, mb in zip(moments(ca), moments(cb), strict=True):
        assert_close(mb, ma, rtol=1e-5, atol=1e-9)                  # ∝ the gradients: a 1/N slip shows here
    la, lb = ([json.loads(x)["loss"] for x in (d / "log.jsonl").read_text().splitlines()] for d in (one, two))
    assert len(la) == len(lb) == 4 and la == pytest.approx(lb, rel=1e-5)
    out = subprocess.run(run_train(tiny_ckpt, two, *args, "--resume"), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "written by 2 process(es)" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_two_processes_stopped_by_sigterm_resume_bit_exact(tiny_ckpt, tmp_path):
    """SIGTERM to torchrun reaches both processes: they agree to stop after the same step, save
    one checkpoint with both RNG states, and the resumed run (with dropout) ends bit for bit where
    an uninterrupted two-process run does."""
    torchrun_stopped_and_resumed(tiny_ckpt, tmp_path, "--lora_dropout", "0.1")
