"""Bad inputs and faults, by command line (train, eval, export, plots, study, hub/fetch): every case
a reliability review of the CLIs found failing (a bad flag, file or record; a full disk; a killed or
interrupted run; a stale lock; a planted pickle). Each case
asserts three things: the exit status (non-zero, a message and no traceback), the message naming
the problem (the file, flag or key and the value), and that every file that was in the folder
before is byte-identical after. The CLIs run in this process through their main(argv); only the
kill -9 and Ctrl-C trials start processes. Tiny models, one to six steps."""
import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import torch

import eval as E
import export
import methods
import plots
import study
import train as T
from checkpoint import read_safetensors, write_safetensors
from runs import atomic_write
from conftest import ROOT, tiny_llama_ckpt
from data import fetch
from data import llm_adapters

SAMPLE = llm_adapters.resolve("commonsense_sample")
TRAIN = ["--method", "lora", "--data", "commonsense_sample", "--batch_size", "2", "--micro_batch_size", "1",
         "--val_set_size", "2", "--eval_step", "1", "--save_step", "1", "--lora_r", "2", "--max_steps", "3",
         "--quiet", "--device", "cpu"]
EVAL = ["--task", "boolq", "--data", SAMPLE, "--limit", "2", "--max_new_tokens", "2", "--num_beams", "1",
        "--device", "cpu"]


# ----------------------------------------------------------------------------- helpers

def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under `folder` ({} if it does not exist)."""
    out = {}
    for d, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = fh.read()
    return out


def assert_unchanged(folder, before: dict):
    """Every file that was under `folder` is still there with the same bytes."""
    after = snapshot(folder)
    for name, data in before.items():
        assert name in after, f"{folder}/{name} was removed"
        assert after[name] == data, f"{folder}/{name} was changed"


def call(capsys, main, argv):
    """A CLI's main(argv) in this process: (exit status, stdout, stderr with sys.exit's message)."""
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    if isinstance(code, str):
        err, code = err + code + "\n", 1
    return code or 0, out, err


def refused(capsys, main, argv, *messages, folders=()):
    """main(argv) exits non-zero with one clear line (no traceback) holding every message, and the
    files that were in `folders` are byte-identical after. Returns stderr."""
    before = [snapshot(f) for f in folders]
    code, out, err = call(capsys, main, argv)
    assert code != 0, out + err
    assert "Traceback" not in err
    for m in messages:
        assert m in err, f"{m!r} not in:\n{err}"
    for f, b in zip(folders, before):
        assert_unchanged(f, b)
    return err


def succeeds(capsys, main, argv):
    code, out, err = call(capsys, main, argv)
    assert code == 0, out + err
    return out, err


def with_header(src, dst, edit):
    """Copy a .safetensors file with its JSON header changed by edit(header), the data as it is."""
    raw = open(src, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + raw[8 + n:])
    return str(dst)


def first_tensor(header):
    return header[next(k for k in header if k != "__metadata__")]


def dead_pid() -> int:
    """The pid of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


class Evil:
    """A pickle that runs code when it is loaded: it creates the file `marker`."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(path, marker):
    torch.save({"tensors": {}, "optimizer": Evil(marker), "scheduler": {}, "state": {}, "rng": [], "method": {},
                "run": {}}, path)


class Disk:
    """A full or read-only disk under `folder`, in this process: opening a file there for writing
    (after `after` such opens that `match`) raises OSError(code)."""

    def __init__(self, monkeypatch, folder, code=errno.ENOSPC, after=0, match=""):
        self.folder, self.code, self.left, self.match = os.path.abspath(folder), code, after, match
        real_open, real_os_open = open, os.open

        def blocked(path):
            p = os.path.abspath(str(path))
            if p.startswith(self.folder) and self.match in p:
                if self.left <= 0:
                    return True
                self.left -= 1
            return False

        def fake_open(path, mode="r", *a, **k):
            if isinstance(path, (str, os.PathLike)) and any(c in mode for c in "wax+") and blocked(path):
                raise OSError(self.code, os.strerror(self.code), str(path))
            return real_open(path, mode, *a, **k)

        def fake_os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
                raise OSError(self.code, os.strerror(self.code), str(path))
            return real_os_open(path, flags, *a, **k)
        monkeypatch.setattr("builtins.open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_llama_ckpt(tmp_path_factory.mktemp("faults") / "llama")


def llama_like(ckpt, path, change):
    """A copy of the tiny checkpoint (its config and tokenizer) whose tensors change(name, tensor) gives."""
    os.makedirs(path, exist_ok=True)
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(os.path.join(ckpt, f), os.path.join(path, f))
    g = torch.Generator().manual_seed(1)
    tensors = {k: change(k, t.clone(), g) for k, t in read_safetensors(os.path.join(ckpt, "model.safetensors")).items()}
    write_safetensors(tensors, os.path.join(path, "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def other_ckpt(ckpt, tmp_path_factory):
    """The same shapes and the same embeddings, other layers (the review's "same-embedding model")."""
    return llama_like(ckpt, tmp_path_factory.mktemp("other") / "llama",
                      lambda k, t, g: t if "embed_tokens" in k else t + 0.1 * torch.randn(t.shape, generator=g))


@pytest.fixture(scope="module")
def finished(ckpt, tmp_path_factory):
    """A finished LoRA run (3 steps, validated each step): copy it before changing it."""
    d = tmp_path_factory.mktemp("run") / "run"
    T.main(["--model", ckpt, *TRAIN, "--out_dir", str(d)])
    assert sorted(os.listdir(d)) == ["adapter.safetensors", "args.json", "checkpoint.pt", "log.jsonl"]
    return d


@pytest.fixture
def run(finished, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    return d


# ----------------------------------------------------------------------------- train.py

def test_train_bad_model_file_is_refused(capsys, ckpt, tmp_path):
    """A base model whose safetensors header lies (negative data offsets read the header as weights)."""
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    with_header(os.path.join(ckpt, "model.safetensors"), bad / "model.safetensors",
                lambda h: first_tensor(h).update(data_offsets=[-64, first_tensor(h)["data_offsets"][1] - 64
                                                               - first_tensor(h)["data_offsets"][0]]))
    refused(capsys, T.main, ["--model", bad, *TRAIN, "--out_dir", tmp_path / "o"],
            f"{bad / 'model.safetensors'}", "data_offsets [-64", "non-negative integers", folders=[bad])


@pytest.mark.parametrize("content, message", [
    (b"[]", "no training example"),                                                # an empty list
    (b'[{"instruction": "caf\xe9", "output": "x"}]', "not UTF-8 text"),          # Latin-1, not UTF-8
])
def test_train_bad_data_is_refused(capsys, ckpt, tmp_path, content, message):
    data = tmp_path / "data.json"
    data.write_bytes(content)
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--data", data, "--out_dir", tmp_path / "o"],
            str(data) if message == "not UTF-8 text" else "--data", message, folders=[tmp_path])


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size 0: expected a positive number"),
    (["--micro_batch_size", "0"], "--micro_batch_size 0: expected a positive number"),
    (["--batch_size", "-2"], "--batch_size -2: expected a positive number"),
    (["--max_steps", "-5"], "--max_steps -5: expected 0 or more"),
    (["--num_epochs", "-1"], "--num_epochs -1: expected 0 or more"),
    (["--cutoff_len", "0"], "--cutoff_len 0: expected a positive number"),
    (["--cutoff_len", "8", "--mask_prompt"], "--cutoff_len 8: no training example keeps a token to learn from"),
    (["--device", "tpu9"], "--device 'tpu9': not a device"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is available"),
    (["--max_steps", "0", "--num_epochs", "0"], "--num_epochs 0 and no --max_steps"),
])
def test_train_bad_flags_fail_before_any_work(capsys, ckpt, tmp_path, flags, message):
    (tmp_path / "o").mkdir()
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, *flags, "--out_dir", tmp_path / "o"], message,
            folders=[tmp_path])
    assert not os.listdir(tmp_path / "o")                                  # nothing written, no lock left


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_train_out_dir_that_is_a_file_read_only_or_full(capsys, ckpt, tmp_path, monkeypatch, code):
    f = tmp_path / "file"
    f.write_text("mine")
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", f], f"--out_dir {f}: is a file",
            folders=[tmp_path])
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", f / "run"], "Not a directory", str(f),
            folders=[tmp_path])
    ro = tmp_path / "ro"
    ro.mkdir()
    Disk(monkeypatch, ro, code)
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", ro], os.strerror(code), str(ro),
            folders=[tmp_path])


def test_train_disk_full_mid_run_keeps_the_last_checkpoint_and_resumes(capsys, ckpt, finished, tmp_path,
                                                                       monkeypatch):
    """The disk fills at the third checkpoint: one line naming checkpoint.pt; the second step's
    checkpoint is intact, and --resume (space freed) ends bit for bit as the uninterrupted run."""
    d = tmp_path / "run"
    with monkeypatch.context() as m:
        Disk(m, d, after=2, match="checkpoint.pt")
        err = refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", d],
                      "No space left on device", f"cannot write {d / 'checkpoint.pt'}")
    assert err.count("\n") == 1
    assert torch.load(d / "checkpoint.pt", weights_only=True)["state"]["step"] == 2
    assert not [f for f in os.listdir(d) if f.endswith(".tmp") or f == T.LOCK]
    succeeds(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", d, "--resume"])
    assert (d / "adapter.safetensors").read_bytes() == (finished / "adapter.safetensors").read_bytes()
    assert (d / "log.jsonl").read_text().count("\n") == 3


def test_train_a_used_out_dir_is_refused_and_overwrite_starts_over(capsys, ckpt, run):
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", run], f"--out_dir {run} already holds a run",
            "--resume", "--overwrite", folders=[run])
    out, _ = succeeds(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", run, "--overwrite", "--seed", "7"])
    assert "removed the previous run's checkpoint.pt" in out
    assert (run / "log.jsonl").read_text().count("\n") == 3                # one run's lines, not two runs'


def test_train_a_live_lock_keeps_a_second_run_out_and_a_stale_one_is_reported(capsys, ckpt, run):
    lock = run / T.LOCK
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", run, "--resume", "--overwrite", "--max_steps", "4"],
            f"is in use by another train.py run (pid {os.getpid()}", folders=[run])
    pid = dead_pid()
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", run, "--resume", "--max_steps", "4"],
            f"{lock}: left by a train.py run that no longer runs (pid {pid}", f"delete {lock}", "--overwrite",
            folders=[run])
    out, _ = succeeds(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", run, "--resume", "--overwrite",
                                       "--max_steps", "4"])
    assert "taking over" in out and "resumed from" in out and not lock.exists()


def test_train_lm_run_never_trains_on_another_texts_tokens(capsys, ckpt, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the grass is green. " * 200)
    b.write_text("where is the red ball? " * 200)
    lm = ["--model", ckpt, "--method", "lora", "--task", "lm", "--cutoff_len", "32", "--max_steps", "1",
          "--batch_size", "2", "--micro_batch_size", "2", "--val_set_size", "0", "--quiet", "--device", "cpu",
          "--lora_r", "2", "--out_dir", tmp_path / "run"]
    succeeds(capsys, T.main, [*lm, "--data", a])
    refused(capsys, T.main, [*lm, "--data", b], "already holds a run", folders=[tmp_path])
    _, err = succeeds(capsys, T.main, [*lm, "--data", b, "--overwrite"])
    assert "train_tokens.bin: made from other data" in err
    succeeds(capsys, T.main, [*lm[:-1], tmp_path / "fresh", "--data", b])
    tokens = lambda d: (tmp_path / d / "train_tokens.bin").read_bytes()
    assert tokens("run") == tokens("fresh")


@pytest.mark.parametrize("kind", ["empty", "truncated", "folder", "not torch"])
def test_train_resume_from_a_broken_checkpoint(capsys, ckpt, run, kind):
    path = run / "checkpoint.pt"
    data = path.read_bytes()
    if kind == "folder":
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "not torch": b"hello"}[kind])
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", run, "--resume", "--max_steps", "6"],
            f"--resume: {path}", "is a folder" if kind == "folder" else "cannot be read as a checkpoint", folders=[run])


def test_train_resume_runs_no_code_from_a_planted_checkpoint(capsys, ckpt, run, tmp_path):
    marker = tmp_path / "MARKER"
    plant_pickle(run / "checkpoint.pt", marker)
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", run, "--resume"],
            f"{run / 'checkpoint.pt'} holds Python objects other than tensors", "was not loaded", folders=[run])
    assert not marker.exists()


def other_shape(ckpt, path):
    """The tiny LLaMA with 4 key/value heads instead of 2 (its tokenizer)."""
    import demo
    import model as M
    os.makedirs(path, exist_ok=True)
    shutil.copy(os.path.join(ckpt, "tokenizer.model"), os.path.join(path, "tokenizer.model"))
    demo.save_hf(M.Llama(M.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=64, vocab_size=200)),
                 str(path))
    return str(path)


def test_train_resume_refuses_another_model_data_or_settings(capsys, ckpt, other_ckpt, run, tmp_path):
    more = ["--out_dir", run, "--resume", "--max_steps", "6"]
    refused(capsys, T.main, ["--model", other_ckpt, *TRAIN, *more], "was trained on another base model",
            "tensor 'layers.0.", "holds other values", folders=[run])
    refused(capsys, T.main, ["--model", other_shape(ckpt, tmp_path / "kv4"), *TRAIN, *more],
            "another base model", "n_kv_heads=2 there, n_kv_heads=4 here", folders=[run])
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, *more, "--batch_size", "3"],
            "was written with batch_size=2, this run has batch_size=3", folders=[run])
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, *more, "--learning_rate", "0.1"],
            "learning_rate=", "this run has learning_rate=0.1", folders=[run])
    other = tmp_path / "data.json"
    other.write_text(json.dumps(llm_adapters.load_records(SAMPLE)[::-1]))
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, *more, "--data", other], "--data commonsense_sample",
            f"this run's --data {other} holds other data", folders=[run])


def test_train_resume_of_a_finished_run_keeps_its_best_adapter(capsys, ckpt, run):
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", run, "--resume"],
            f"the run in {run} finished at step 3", "nothing to resume", folders=[run])
    os.remove(run / "adapter.safetensors")                 # lost: the checkpoint is not the best, nothing is made up
    refused(capsys, T.main, ["--model", ckpt, *TRAIN, "--out_dir", run, "--resume"],
            "its adapter", "is missing", "not the best by validation", folders=[run])


def test_train_extending_a_finished_run_keeps_the_best_adapter(capsys, ckpt, tmp_path):
    """Steps 4-6 of an extended run validate worse than step 2: step 2's adapter stays."""
    d = tmp_path / "run"
    steady = ["--learning_rate", "0.05", "--warmup_steps", "0", "--lr_schedule", "constant"]
    succeeds(capsys, T.main, ["--model", ckpt, *TRAIN, *steady, "--out_dir", d])
    best = (d / "adapter.safetensors").read_bytes()
    out, _ = succeeds(capsys, T.main, ["--model", ckpt, *TRAIN, *steady, "--out_dir", d, "--resume",
                                       "--max_steps", "6"])
    vals = [json.loads(x)["val_loss"] for x in (d / "log.jsonl").read_text().splitlines()]
    assert len(vals) == 6 and min(vals[3:]) > min(vals[:3])
    assert "the schedule changes from 3 to 6 steps" in out and f"is still step {vals.index(min(vals)) + 1}'s" in out
    assert (d / "adapter.safetensors").read_bytes() == best


@pytest.mark.slow
def test_train_kill_9_then_resume_is_bit_exact(capsys, ckpt, tmp_path):
    """kill -9 mid-run (no checkpoint on the way out, a lock left): --resume reports the lock, and
    with --overwrite takes it over and ends bit for bit where an uninterrupted run does (with dropout:
    the RNG states come back too); the log has each step once."""
    args = ["--model", ckpt, *TRAIN, "--max_steps", "8", "--lora_dropout", "0.1", "--num_epochs", "4"]
    succeeds(capsys, T.main, [*args, "--out_dir", tmp_path / "ref"])
    d = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "train.py", *map(str, args), "--out_dir", str(d)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, deadline = d / "log.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.02)
    p.kill()
    p.wait()
    step = torch.load(d / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert 2 <= step < 8, step
    refused(capsys, T.main, [*args, "--out_dir", d, "--resume"], "left by a train.py run that no longer runs",
            folders=[d])
    succeeds(capsys, T.main, [*args, "--out_dir", d, "--resume", "--overwrite"])
    ref = read_safetensors(str(tmp_path / "ref" / "adapter.safetensors"))
    got = read_safetensors(str(d / "adapter.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [json.loads(x)["loss"] for x in log.read_text().splitlines()] == \
        [json.loads(x)["loss"] for x in (tmp_path / "ref" / "log.jsonl").read_text().splitlines()]


def test_atomic_write_cleans_up_what_a_killed_writer_left(tmp_path):
    target = tmp_path / "checkpoint.pt"
    stale, live = tmp_path / f"checkpoint.pt.{dead_pid()}.tmp", tmp_path / f"checkpoint.pt.{os.getppid()}.tmp"
    other = tmp_path / "notes.1.tmp"
    for f in (stale, live, other):
        f.write_text("x")
    atomic_write(str(target), lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and not stale.exists() and live.exists() and other.exists()


# ----------------------------------------------------------------------------- eval.py

def test_eval_never_reuses_another_evaluations_predictions(capsys, ckpt, finished, tmp_path):
    out = tmp_path / "eval"
    adapter = finished / "adapter.safetensors"
    succeeds(capsys, E.main, ["--model", ckpt, "--adapter", adapter, *EVAL, "--out_dir", out])
    refused(capsys, E.main, ["--model", ckpt, *EVAL, "--out_dir", out], "boolq result comes from another evaluation",
            "another adapter", "--overwrite", folders=[out])
    refused(capsys, E.main, ["--model", ckpt, "--adapter", adapter, *EVAL, "--out_dir", out, "--prompt_layout",
                             "train"], "another --prompt_layout: eval there, train here", folders=[out])
    os.remove(out / "results.json")                        # the predictions alone are refused as well
    refused(capsys, E.main, ["--model", ckpt, *EVAL, "--out_dir", out], f"{out / 'boolq.jsonl'} (2 predictions) comes "
            "from another evaluation", folders=[out])
    _, err = succeeds(capsys, E.main, ["--model", ckpt, *EVAL, "--out_dir", out, "--overwrite"])
    assert "--overwrite: replacing" in err
    fresh = E.main(["--model", ckpt, *EVAL, "--out_dir", str(tmp_path / "fresh")])
    assert json.loads((out / "results.json").read_text())["boolq"] == fresh["boolq"]


def test_eval_resumes_its_own_predictions_only_for_the_examples_asked(capsys, ckpt, tmp_path):
    out = tmp_path / "eval"
    succeeds(capsys, E.main, ["--model", ckpt, *EVAL, "--limit", "4", "--out_dir", out])
    lines = (out / "boolq.jsonl").read_text().splitlines()
    (out / "boolq.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])          # a kill mid-line
    _, err = succeeds(capsys, E.main, ["--model", ckpt, *EVAL, "--limit", "4", "--out_dir", out])
    assert "dropping its last line" in err and len((out / "boolq.jsonl").read_text().splitlines()) == 4
    res = E.main(["--model", ckpt, *EVAL, "--limit", "1", "--out_dir", str(out)])    # 4 saved, 1 asked: 1 counted
    assert res["boolq"]["total"] == 1 and res["boolq"]["correct"] <= 1


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size 0: expected a positive number"),
    (["--limit", "-7"], "--limit -7: expected a positive number"),
    (["--num_beams", "0"], "--num_beams 0: expected a positive number"),
    (["--device", "tpu9"], "--device 'tpu9': not a device"),
    (["--device", "cuda"], "--device cuda: no CUDA GPU is available"),
])
def test_eval_bad_flags(capsys, ckpt, tmp_path, flags, message):
    refused(capsys, E.main, ["--model", ckpt, *EVAL, "--out_dir", tmp_path / "o", *flags], message, folders=[tmp_path])


def test_eval_corrupt_files_in_out_dir(capsys, ckpt, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text('{"boolq": ')
    refused(capsys, E.main, ["--model", ckpt, *EVAL, "--out_dir", out], f"{out / 'results.json'}: not valid JSON",
            folders=[out])
    os.remove(out / "results.json")
    succeeds(capsys, E.main, ["--model", ckpt, *EVAL, "--out_dir", out])
    lines = (out / "boolq.jsonl").read_text().splitlines()
    (out / "boolq.jsonl").write_text(lines[0][:7] + "\n" + lines[1] + "\n")               # a damaged first line
    os.remove(out / "results.json")
    refused(capsys, E.main, ["--model", ckpt, *EVAL, "--out_dir", out], f"{out / 'boolq.jsonl'}: line 1 is not a "
            "prediction record", folders=[out])


def test_eval_out_dir_read_only_or_a_file(capsys, ckpt, tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("mine")
    refused(capsys, E.main, ["--model", ckpt, *EVAL, "--out_dir", f], f"--out_dir {f}: is a file", folders=[tmp_path])
    ro = tmp_path / "ro"
    ro.mkdir()
    Disk(monkeypatch, ro, errno.EROFS)
    refused(capsys, E.main, ["--model", ckpt, *EVAL, "--out_dir", ro], "Read-only file system", str(ro),
            folders=[tmp_path])


def test_eval_refuses_an_adapter_of_a_model_with_the_same_embeddings(capsys, other_ckpt, finished, tmp_path):
    refused(capsys, E.main, ["--model", other_ckpt, "--adapter", finished / "adapter.safetensors", *EVAL,
                             "--out_dir", tmp_path / "o"],
            "was trained on a different base model", "tensor 'layers.0.", folders=[tmp_path])


def test_eval_ppl_never_reports_another_texts_perplexity(capsys, ckpt, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the grass is green. " * 100)
    b.write_text("where is the red ball? " * 100)
    ppl = ["--model", ckpt, "--task", "ppl", "--seq_len", "32", "--stride", "16", "--device", "cpu"]
    out = tmp_path / "eval"
    succeeds(capsys, E.main, [*ppl, "--data", a, "--out_dir", out])
    refused(capsys, E.main, [*ppl, "--data", b, "--out_dir", out], "ppl result comes from another evaluation",
            "another data", folders=[out])
    _, err = succeeds(capsys, E.main, [*ppl, "--data", b, "--out_dir", out, "--overwrite"])
    assert "eval_tokens.bin: made from other data" in err
    fresh = E.main([*map(str, ppl), "--data", str(b), "--out_dir", str(tmp_path / "fresh")])
    assert json.loads((out / "results.json").read_text())["ppl"]["32"]["ppl"] == fresh["ppl"]["32"]["ppl"]


def lying_adapters(adapter, tmp_path):
    """Adapter files whose header or metadata lies, each with what the error must say."""
    def meta(**kw):
        def edit(h):
            h["__metadata__"].update(kw)
            for k, v in kw.items():
                if v is None:
                    del h["__metadata__"][k]
        return edit

    def entry(**kw):
        return lambda h: first_tensor(h).update(kw)
    nbytes = lambda h: first_tensor(h)["data_offsets"][1] - first_tensor(h)["data_offsets"][0]
    cases = {
        "negative offset": (lambda h: first_tensor(h).update(data_offsets=[-nbytes(h), 0]), "non-negative integers"),
        "int entry": (lambda h: h.update({next(k for k in h if k != "__metadata__"): 7}),
                      "expected an object with dtype, shape and data_offsets"),
        "negative shape": (entry(shape=[-1, 4]), "expected a list of non-negative integers"),
        "overlap": (lambda h: [t.update(data_offsets=[0, t["data_offsets"][1] - t["data_offsets"][0]])
                               for k, t in h.items() if k != "__metadata__"], "overlap"),
        "size lie": (entry(shape=[1, 1]), "needs 4 bytes"),
        "bad hparams JSON": (meta(hparams="{lora_r: 2"), "metadata 'hparams' is not valid JSON"),
        "no hparams": (meta(hparams=None), "has no 'hparams'"),
        "list base": (meta(base="[1, 2]"), "metadata 'base' is a JSON list"),
        # hyperparameters that do not fit the tensors: refused before the method is applied (no memory)
        "huge hparams": (lambda h: h["__metadata__"].update(
            hparams=json.dumps(dict(json.loads(h["__metadata__"]["hparams"]), lora_r=100_000))), "but its metadata's"),
    }
    return {name: (with_header(adapter, tmp_path / f"{name.replace(' ', '_')}.safetensors", edit), msg)
            for name, (edit, msg) in cases.items()}


def test_eval_refuses_adapters_whose_header_lies(capsys, ckpt, finished, tmp_path):
    for name, (path, message) in lying_adapters(finished / "adapter.safetensors", tmp_path).items():
        refused(capsys, E.main, ["--model", ckpt, "--adapter", path, *EVAL, "--out_dir", tmp_path / "o"], path, message,
                folders=[tmp_path])


def peft_dir(path, config):
    os.makedirs(path)
    (path / "adapter_config.json").write_text(config)
    write_safetensors({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32)},
                      str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize("config, message", [
    ('{"peft_type": "LORA", "r": ', "adapter_config.json: not valid JSON"),
    ('{"peft_type": "LORA", "lora_alpha": 4}', "adapter_config.json: has no 'r'"),
])
def test_eval_bad_peft_config(capsys, ckpt, tmp_path, config, message):
    d = peft_dir(tmp_path / "peft", config)
    refused(capsys, E.main, ["--model", ckpt, "--adapter", d, *EVAL, "--out_dir", tmp_path / "o"], message,
            folders=[tmp_path])


# ----------------------------------------------------------------------------- export.py

def test_export_never_overwrites_what_it_did_not_write(capsys, ckpt, finished, tmp_path):
    adapter = finished / "adapter.safetensors"
    out = tmp_path / "peft"
    succeeds(capsys, export.main, ["--model", ckpt, "--adapter", adapter, "--format", "peft", "--out", out])
    refused(capsys, export.main, ["--model", ckpt, "--adapter", adapter, "--format", "peft", "--out", out],
            f"--out {out} already exists", "--overwrite", folders=[tmp_path])
    succeeds(capsys, export.main, ["--model", ckpt, "--adapter", adapter, "--format", "peft", "--out", out,
                                   "--overwrite"])
    user = tmp_path / "user"                                # a folder of the user's own files
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    (user / "tokenizer.model").write_bytes(b"my tokenizer")
    refused(capsys, export.main, ["--model", ckpt, "--adapter", adapter, "--format", "hf", "--out", user],
            f"--out {user} already exists and holds config.json, tokenizer.model", folders=[tmp_path])
    f = tmp_path / "file"
    f.write_text("mine")
    refused(capsys, export.main, ["--model", ckpt, "--format", "hf", "--out", f], f"--out {f}: is a file",
            folders=[tmp_path])
    refused(capsys, export.main, ["--model", ckpt, "--format", "hf", "--out", ckpt, "--overwrite"],
            "already holds a checkpoint", folders=[ckpt])
    assert sorted(os.listdir(tmp_path)) == ["file", "peft", "user"]       # no temporary folder left


def test_export_full_or_read_only_disk_leaves_nothing(capsys, ckpt, finished, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    args = ["--model", ckpt, "--adapter", finished / "adapter.safetensors", "--format", "hf", "--out", out,
            "--max_shard_size", "20KB"]
    with monkeypatch.context() as m:
        Disk(m, tmp_path, after=2, match=".safetensors")              # the third shard does not fit
        refused(capsys, export.main, args, f"cannot write {out}", "No space left on device", "nothing was written")
    assert os.listdir(tmp_path) == []
    with monkeypatch.context() as m:
        Disk(m, tmp_path, errno.EROFS)
        refused(capsys, export.main, args, f"cannot write {out}", "Read-only file system")
    assert os.listdir(tmp_path) == []
    out_, _ = succeeds(capsys, export.main, args)                       # and then it works, nothing in the way
    assert "model.safetensors.index.json" in os.listdir(out)


def test_export_cleans_up_after_a_killed_export(capsys, ckpt, finished, tmp_path):
    out = tmp_path / "peft"
    left = tmp_path / f"peft.{dead_pid()}.tmp"
    left.mkdir()
    (left / "adapter_model.safetensors").write_bytes(b"half")
    out_, _ = succeeds(capsys, export.main, ["--model", ckpt, "--adapter", finished / "adapter.safetensors",
                                             "--format", "peft", "--out", out])
    assert f"removed {left}" in out_ and sorted(os.listdir(tmp_path)) == ["peft"]


# ----------------------------------------------------------------------------- plots.py

needs_matplotlib = pytest.mark.skipif(not plots.have_matplotlib(), reason="matplotlib is not installed")


@needs_matplotlib
def test_plots_bad_inputs(capsys, ckpt, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"loss": 1.0}\n')
    refused(capsys, plots.main, ["curves", run, "--out", tmp_path / "c.png"],
            f"{run / 'log.jsonl'}: line 1 has no step number", folders=[tmp_path])
    (tmp_path / "results.json").write_text("[1, 2]")
    refused(capsys, plots.main, ["sweep", tmp_path / "results.json", "--out", tmp_path / "s.png"],
            f"{tmp_path / 'results.json'}: not a study.py results.json", folders=[tmp_path])
    (tmp_path / "results.json").write_text('{"grid": {"a": [1]}, "points": [{"name": "x"}]}')
    refused(capsys, plots.main, ["sweep", tmp_path / "results.json", "--out", tmp_path / "s.png"],
            "a point that is not on the grid", folders=[tmp_path])
    refused(capsys, plots.main, ["map", "--model", ckpt, "--adapter", tmp_path, "--out", tmp_path / "m.png"],
            f"--adapter {tmp_path}: a folder", folders=[tmp_path])


# ----------------------------------------------------------------------------- study.py

STUDY_TRAIN = ["--method", "lora", "--data", "commonsense_sample", "--batch_size", "2", "--micro_batch_size", "1",
               "--val_set_size", "2", "--eval_step", "1", "--quiet", "--lora_r", "2", "--device", "cpu"]


def test_study_grid_values_stay_inside_out_dir(capsys, ckpt, tmp_path):
    refused(capsys, study.main, ["sweep", "--grid", "lora_r=../../x", "--out_dir", tmp_path / "s", "--", "--model",
                                 ckpt, *STUDY_TRAIN], "value '../../x' cannot be part of a folder name",
            folders=[tmp_path])
    assert not (tmp_path / "s").exists()


def test_study_out_dir_that_is_a_file(capsys, ckpt, tmp_path):
    f = tmp_path / "file"
    f.write_text("mine")
    refused(capsys, study.main, ["seeds", "--seeds", "1", "--out_dir", f, "--", "--model", ckpt, *STUDY_TRAIN],
            f"--out_dir {f}: is a file", folders=[tmp_path])


@pytest.mark.slow
def test_study_runs_no_code_from_a_copied_point(capsys, ckpt, tmp_path):
    """A point folder holding someone's checkpoint.pt: study.py resumes it, train.py refuses to load
    it, nothing runs; the point fails with train.py's message."""
    marker = tmp_path / "MARKER"
    point = tmp_path / "s" / "seed=1"
    point.mkdir(parents=True)
    plant_pickle(point / "checkpoint.pt", marker)
    refused(capsys, study.main, ["seeds", "--seeds", "1", "--out_dir", tmp_path / "s", "--", "--model", ckpt,
                                 *STUDY_TRAIN, "--max_steps", "1"],
            "1 of 1 points failed", folders=[point])
    assert not marker.exists()
    assert "holds Python objects other than tensors" in (point / "study.log").read_text()


def test_study_corrupt_files_name_their_path(capsys, ckpt, tmp_path):
    point = tmp_path / "s" / "seed=1"
    point.mkdir(parents=True)
    (point / "result.json").write_text("{")
    code, out, err = call(capsys, study.main, ["seeds", "--seeds", "1", "--out_dir", tmp_path / "s", "--", "--model",
                                               ckpt, *STUDY_TRAIN, "--max_steps", "1"])
    assert code != 0 and "Traceback" not in err
    assert f"{point / 'result.json'}: the point's result is not valid JSON" in out
    with pytest.raises(ValueError, match=r"log.jsonl: line 2 is not a train.py log record"):
        (point / "log.jsonl").write_text('{"step": 1, "val_loss": 1.0}\n{"step": \n')
        study.best_validation(str(point))


@pytest.mark.slow
def test_study_ctrl_c_stops_cleanly_and_the_rerun_resumes(capsys, ckpt, tmp_path):
    """SIGINT to study.py while a point trains: train.py saves its checkpoint, no new point starts,
    one line says how to continue (exit 130); the rerun resumes that point from its checkpoint."""
    d = tmp_path / "s"
    args = ["seeds", "--seeds", "1,2", "--out_dir", str(d), "--", "--model", ckpt, *STUDY_TRAIN, "--max_steps", "40",
            "--save_step", "1000"]
    p = subprocess.Popen([sys.executable, "study.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    log, deadline = d / "seed=1" / "log.jsonl", time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, out + err
    assert "Traceback" not in err and "interrupted (Ctrl-C)" in err and "rerun the same command" in err
    assert (d / "seed=1" / "checkpoint.pt").exists() and not (d / "seed=2").exists()
    assert "stopped by signal" in (d / "seed=1" / "study.log").read_text()
    succeeds(capsys, study.main, args)
    assert "resumed from" in (d / "seed=1" / "study.log").read_text()
    assert len(json.loads((d / "results.json").read_text())["points"]) == 2


# ----------------------------------------------------------------------------- hub / fetch

def test_fetch_full_disk_is_not_a_network_error(tmp_path, monkeypatch):
    import io

    class Response(io.BytesIO):
        def __enter__(self):
            return self

    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda url, timeout: Response(b"x" * 100))
    real_fdopen = os.fdopen

    class Full:                                           # the temporary file, on a disk that fills up
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(fetch.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    dest = tmp_path / "cache" / "x.json"
    with pytest.raises(fetch.DownloadError) as e:
        fetch.download("http://example.invalid/x.json", str(dest))
    assert "No space left on device" in str(e.value) and "no network" not in str(e.value)
    assert os.listdir(tmp_path / "cache") == []


def test_fetch_a_changed_cached_file_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("LORADA_CACHE", str(tmp_path))
    rel, sha1, _ = fetch.TEST_SET_FILES["boolq"]
    cached = tmp_path / "data" / f"LLM-Adapters-{fetch.LLM_ADAPTERS_COMMIT[:7]}" / rel
    cached.parent.mkdir(parents=True)
    cached.write_text("[]")
    with pytest.raises(fetch.DownloadError, match="changed or damaged since it was downloaded"):
        fetch.test_set_path("boolq")
    assert cached.read_text() == "[]"


# ----------------------------------------------------------------------------- checkpoint files

def test_fingerprint_matches_across_precisions_and_tells_models_apart(ckpt, other_ckpt):
    from checkpoint import load
    fp32, bf16, other = (methods.base_fingerprint(load(p, dtype=d)) for p, d in
                         ((ckpt, torch.float32), (ckpt, torch.bfloat16), (other_ckpt, torch.float32)))
    assert methods.fingerprint_difference(fp32, bf16) is None
    assert "holds other values" in methods.fingerprint_difference(fp32, other)
    old = {k: v for k, v in fp32.items() if k != "tensors"}        # an adapter written before the per-tensor one
    assert methods.fingerprint_is_partial(old) and methods.fingerprint_difference(old, fp32) is None
