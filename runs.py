"""What every run needs besides the models: replacing a file atomically, whether a lock's pid still
runs, the hashes that identify an input in cached results, the device and precision checks,
reading a run's log.jsonl, the progress line.

Nothing here knows about PEFT or models; train.py (run_folder.py), eval.py, export.py, study.py,
plots.py, the demo and the token caches of data/text.py use it; checkpoint.py writes its files with
`atomic_write`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time


def atomic_write(path: str, write):
    """Replace the file at `path` so that a reader, or a crash, sees the old file or the new one,
    never a part of it: `write(f)` fills a temporary file (opened "wb") in the same directory,
    which is flushed to disk (fsync) and renamed over `path` (os.replace: atomic on one file
    system). The temporary file is removed if `write` fails; one left by a process that was killed
    while writing `path` is removed on the next write (remove_stale_tmp). A read-only or full disk is
    an OSError naming `path`."""
    remove_stale_tmp(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):             # the file the user knows, not the temporary one
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        raise


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                    # another user's: it exists
        return True
    return True


def remove_stale_tmp(path: str) -> list[str]:
    """Remove the PATH.<pid>.tmp files that atomic_write (and data/text.token_file) left beside
    `path` when their process was killed mid-write: only this naming, only for a pid that no longer
    runs (a live writer's file is left alone). Returns what was removed."""
    folder, name = os.path.split(path)
    pattern = re.compile(re.escape(name) + r"\.(\d+)\.tmp")
    removed = []
    try:
        entries = os.listdir(folder or ".")
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, entry))
                removed.append(os.path.join(folder, entry))
            except OSError:
                pass
    return removed


def content_hash(path: str) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (their relative paths and bytes, in sorted
    order): what identifies a data file, an adapter or a peft folder in the records that cached
    results carry (train.py's checkpoint, eval.py's predictions, the token caches). A file is read
    once per process while its size and modification time stay the same."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)
        for rel in files:
            h.update(rel.encode() + b"\0" + content_hash(os.path.join(path, rel)).encode())
        return h.hexdigest()
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


_hashes = {}          # content_hash's memo: (path, size, modification time) -> SHA-256


def check_device(device: str, flag: str = "--device") -> str:
    """A device torch can use here: cpu, cuda or cuda:N with N < the GPUs present, mps where torch
    has it. Anything else is a ValueError naming the flag and the value (before any work)."""
    import torch                               # here, so that study.py can use this file without torch
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {device!r}: not a device; expected cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: no CUDA GPU is available here (torch sees none); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{flag} {device}: MPS is not available here; use --device cpu")
    elif d.type != "cpu":
        raise ValueError(f"{flag} {device!r}: expected cpu, cuda or cuda:N")
    return device


def read_json_object(path: str, what: str | None = None, fix: str = "") -> dict:
    """A JSON object from `path`; invalid JSON or another JSON type is a ValueError naming the file,
    `what` it should hold and, after a semicolon, `fix` (what to do about it)."""
    hint, subject = (f"; {fix}" if fix else ""), (f"{what} is " if what else "")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {subject}not valid JSON ({e}){hint}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {subject or 'it is '}a JSON {type(value).__name__}, not an object{hint}")
    return value


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 arithmetic of its own (AVX512-BF16 or AMX-BF16, /proc/cpuinfo's flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_precision(device) -> str:
    """train.py's and eval.py's --precision when none is given: bf16 on a GPU and on a CPU with native
    bf16 arithmetic, where it measured faster than fp32 (docs/performance.md), else fp32. The
    environment variable LORADA_PRECISION (fp32 or bf16) overrides it: the tests set fp32, their
    reference precision."""
    chosen = os.environ.get("LORADA_PRECISION")
    if chosen:
        if chosen not in ("fp32", "bf16"):
            raise ValueError(f"LORADA_PRECISION={chosen!r}: expected fp32 or bf16")
        return chosen
    return "bf16" if str(device).startswith("cuda") or (str(device) == "cpu" and native_bf16_cpu()) else "fp32"


def json_lines(path: str, what: str):
    """(line number, value) for each non-blank line of a JSON-lines file; a line that is not JSON is
    a ValueError naming the file, the line and `what` its lines should be."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not {what} (not JSON: {e.msg})") from None


def read_log(run_dir) -> list[dict]:
    """The records of RUN_DIR/log.jsonl (train.py writes one per step), in step order: where a
    resumed run logged a step twice (the steps after its last checkpoint), the later record wins. A
    line that is not a record is a ValueError naming the file and the line."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (expected the --out_dir of a train.py run)")
    by_step = {}
    for n, r in json_lines(path, "a train.py log record"):
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            raise ValueError(f"{path}: line {n} has no step number (not a train.py log.jsonl?)")
        by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


class Progress:
    """One status line on stderr: step, loss, lr, tokens/s (real tokens), ETA."""

    def __init__(self, total, start=0, quiet=False):
        self.total, self.start, self.quiet, self.t0 = total, start, quiet, time.time()
        self.tty, self.closed = sys.stderr.isatty(), False

    def update(self, step, loss, lr, tok_s):
        if self.quiet:
            return
        done = step - self.start
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step % 10 == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.tty and not self.quiet and not self.closed:
            print(file=sys.stderr)            # end the status line
        self.closed = True
