"""Sharded training (train.py --fsdp, fsdp.py) with 2 CPU processes over gloo: the same losses and
adapters as one process for every kind of method, each process holding half of the frozen
weights, a bit-exact resume after SIGTERM, and clear errors for the combinations it refuses."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import train as T
from checkpoint import read_safetensors
from conftest import ROOT
from helpers import run_train, small_flags, torchrun_stopped_and_resumed

pytestmark = pytest.mark.slow  # every test here starts torchrun or train.py in a subprocess

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
METHODS = ["lora", "dora", "quanta", "series", "parallel", "adapter_ffn", "prefix", "mam", "lmam", "lorada_la",
           "lorada_q", "lorada_a", "lora+lmam", "full"]
COMMON = ["--data", "commonsense_sample", "--batch_size", "2", "--micro_batch_size", "1", "--val_set_size", "2",
          "--eval_step", "2", "--save_step", "3", "--warmup_steps", "2", "--max_steps", "3", "--device", "cpu",
          "--quiet"]


def flags(method):
    """Small sizes, and no dropout (each process has its own dropout masks)."""
    return small_flags(method, lora_dropout=0.0, adapter_dropout=0.0)


def test_sharded_runs_equal_one_process(tiny_ckpt, tmp_path):
    """Every kind of method (LoRA, DoRA, QuanTA, the adapters, prefix, LMAM, the LoRaDA variants,
    full fine-tuning), sharded over 2 processes with gradient checkpointing: the losses and the
    final adapter tensors of one unsharded process, up to fp32 rounding. Every second step has one
    micro-batch: process 1 runs it weighted 0 (its forwards gather the shards too)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [f"{m}:{','.join(flags(m))}" if flags(m) else m for m in METHODS]
    out = subprocess.run(TORCHRUN + [f"{ROOT}/tests/fsdp_driver.py", str(tmp_path / "two"), *runs, "--",
                                     "--model", tiny_ckpt, "--gradient_checkpointing", *COMMON],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    torch.set_num_threads(1)
    for method in METHODS:
        T.main(["--model", tiny_ckpt, "--method", method, "--out_dir", str(tmp_path / "one" / method), *COMMON,
                *flags(method)])
        a = read_safetensors(str(tmp_path / "one" / method / "adapter.safetensors"))
        b = read_safetensors(str(tmp_path / "two" / method / "adapter.safetensors"))
        assert a.keys() == b.keys(), method
        for k in a:
            assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{method}: {k}")
        la, lb = ([json.loads(x)["loss"] for x in (tmp_path / d / method / "log.jsonl").read_text().splitlines()]
                  for d in ("one", "two"))
        assert lb == pytest.approx(la, rel=1e-5), method
    # each process holds half of the frozen weights
    held = json.loads((tmp_path / "two" / "lora" / "args.json").read_text())["fsdp_frozen_bytes"]
    assert len(held) == 2 and all(abs(h["held"] / h["of"] - 0.5) < 0.02 for h in held), held


def test_sharded_resume_after_sigterm_is_bit_exact(tiny_ckpt, tmp_path):
    """SIGTERM to torchrun: both processes stop after the same step and save one checkpoint
    (gathered tensors and AdamW state); the resumed run ends bit for bit as an uninterrupted one.
    Resuming with another process count is refused."""
    b = torchrun_stopped_and_resumed(tiny_ckpt, tmp_path, "--fsdp", "--device", "cpu")
    out = subprocess.run(run_train(tiny_ckpt, b, "--resume", "--device", "cpu"), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "written by 2 process(es)" in out.stderr, out.stderr[-2000:]


def test_fsdp_bad_combinations(tiny_ckpt, tmp_path):
    for extra, message in ((["--fsdp"], "start it with torchrun"),):
        out = subprocess.run(run_train(tiny_ckpt, tmp_path, *extra), cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
    env = dict(os.environ, WORLD_SIZE="2")                      # as under torchrun: the checks come first
    for model, extra, message in ((tiny_ckpt, ["--compile"], "--fsdp with --compile is not supported"),
                                  ("llama-tiny", [], "shape preset without weights")):
        cmd = run_train(tiny_ckpt, tmp_path, "--fsdp", *extra)
        cmd[cmd.index("--model") + 1] = model
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
