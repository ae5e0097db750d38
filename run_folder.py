"""The run's folder (--out_dir) of train.py: what makes a run safe to stop, resume and trust.

  - the claim: train.lock holds the pid of the run that owns the folder; a second run is refused,
    a lock left by a killed run is reported (--overwrite takes it over); a folder holding another
    run's files is refused (--resume continues it, --overwrite starts over);
  - checkpoint.pt: written atomically, read back as plain data (weights_only: no code runs from
    it), checked against the run (base model, data, tokenizer, batch, schedule) before --resume
    loads it, naming what differs;
  - log.jsonl trimmed to the checkpoint's step on --resume, args.json, the adapters;
  - Ctrl-C / SIGTERM only set a flag: the loop finishes its step, saves and exits.

train.py's loop uses it through `Run`; a reader learning PEFT can skip this file.
"""
import contextlib
import json
import math
import os
import pickle
import random
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

import fsdp
import methods
from data import llm_adapters
from runs import Progress, atomic_write, content_hash, default_precision, pid_alive


def rng_state():
    """This process's RNG states as tensors and plain values (Python's is a tuple of ints), which
    torch.load(weights_only=True) reads back: checkpoint.pt holds nothing that could run code."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"].cpu())            # (map_location may have put it on the GPU)
    random.setstate(s["python"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


# Flags whose value would train nothing or fail deep inside the loop: refused before any work.
POSITIVE = ("batch_size", "micro_batch_size", "cutoff_len", "update_freq")
NON_NEGATIVE = ("num_epochs", "max_steps", "val_set_size", "eval_step", "save_step", "warmup_steps", "warmup_ratio",
                "weight_decay", "max_grad_norm", "label_smoothing", "max_target_len", "max_tokens", "s2_ratio")
# What a resumed run may change: the schedule's length and how often it validates and saves.
MAY_CHANGE_ON_RESUME = ("num_epochs", "max_steps", "eval_step", "save_step")
# The files a run writes into --out_dir (a new run refuses a folder holding any of them), its lock.
RUN_FILES = ("checkpoint.pt", "best" + methods.ADAPTER_EXT, "adapter" + methods.ADAPTER_EXT, "log.jsonl", "args.json")
LOCK = "train.lock"
_held_locks = []                       # lock files this process holds; main() removes them
_made_dirs = []                        # --out_dir folders this process made; main() removes them if still empty


def check_settings(values: dict, complete: bool = False):
    """Training settings (the command line's, or complete=True: after the presets) that would train
    nothing or fail inside the loop: a ValueError naming the flag and the value."""
    for k in POSITIVE:
        v = values.get(k)
        if v is not None and not v > 0:
            raise ValueError(f"--{k} {v}: expected a positive number")
    for k in NON_NEGATIVE:
        v = values.get(k)
        if v is not None and not v >= 0:                     # (NaN too)
            raise ValueError(f"--{k} {v}: expected 0 or more")
    if complete and values["num_epochs"] == 0 and not values["max_steps"]:
        raise ValueError("--num_epochs 0 and no --max_steps: no step to train")


def read_lock(path: str) -> dict | None:
    """A lock file's {pid, host, started}, or None when it cannot be read (written half)."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def take_lock(out_dir: str, overwrite: bool):
    """OUT_DIR/train.lock (created exclusively, holding this process's pid and host) keeps two live
    runs out of one folder. A lock whose process still runs (or runs on another host, where its pid
    cannot be checked) is never taken. One left by a process that no longer runs (killed) is
    reported, and taken over only with --overwrite."""
    path = os.path.join(out_dir, LOCK)
    host = socket.gethostname()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            who = (f"pid {holder['pid']} on {holder.get('host')}, started {holder.get('started')}" if holder
                   else "unreadable: its run was killed while taking it?")
            if holder and (holder.get("host") != host or pid_alive(holder["pid"])):
                raise ValueError(f"--out_dir {out_dir} is in use by another train.py run ({who}; {path}): wait for "
                                 f"it to finish or give another --out_dir. If no run uses the folder, delete {path}")
            if not overwrite:
                raise ValueError(f"{path}: left by a train.py run that no longer runs ({who}; killed?). If no other "
                                 f"run uses {out_dir}, delete {path} and run again, or give --overwrite to take the "
                                 f"lock over (with --resume that keeps the run and continues it)")
            print(f"--overwrite: taking over {path}, left by a run that no longer runs ({who})")
            os.remove(path)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        except OSError as e:                                     # a full disk: no half-written lock left
            os.remove(path)
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        _held_locks.append(path)
        return


def release_locks():
    """Remove the lock files this process took (only those still holding its pid), and a folder it
    made for a run that failed before writing anything."""
    while _held_locks:
        path = _held_locks.pop()
        if (read_lock(path) or {}).get("pid") == os.getpid():
            os.remove(path)
    while _made_dirs:
        d = _made_dirs.pop()
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)


def claim_out_dir(args):
    """Make --out_dir this run's (process 0, before any work): a folder, not a file; locked; and
    without another run's files unless this run continues it (--resume) or replaces it
    (--overwrite, which deletes those files first)."""
    d = args.out_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"--out_dir {d}: is a file, not a folder")
    if not os.path.isdir(d):
        os.makedirs(d)
        _made_dirs.append(d)
    take_lock(d, args.overwrite)
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(d, f))]
    if args.resume:
        if not os.path.exists(os.path.join(d, "checkpoint.pt")):
            raise FileNotFoundError(f"--resume: {os.path.join(d, 'checkpoint.pt')} does not exist")
    elif present and not args.overwrite:
        raise ValueError(f"--out_dir {d} already holds a run ({', '.join(present)}): continue it with --resume, "
                         f"start over with --overwrite (which deletes those files first), or give another --out_dir")
    elif present:
        for f in present:
            os.remove(os.path.join(d, f))
        print(f"--overwrite: removed the previous run's {', '.join(present)} from {d}")


def read_checkpoint(path: str, device) -> dict:
    """checkpoint.pt, loaded as plain data only (torch.load weights_only: tensors, numbers,
    strings, lists, dicts), so that a planted file runs no code; anything else is a ValueError
    naming the file."""
    if os.path.isdir(path):
        raise ValueError(f"--resume: {path} is a folder, not a checkpoint")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)   # map_location: not onto GPU 0 for every rank
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():                           # torch refused a global: code, or a class
            raise ValueError(f"--resume: {path} holds Python objects other than tensors and plain values, which "
                             f"no train.py writes; it was not loaded (loading it could run code)") from None
        raise ValueError(f"--resume: {path} cannot be read as a checkpoint (not a file torch.save wrote)") from None
    except Exception as e:                                             # empty, truncated, not a torch file
        reason = (str(e).strip().splitlines() or ["empty or truncated"])[0]
        raise ValueError(f"--resume: {path} cannot be read as a checkpoint ({type(e).__name__}: {reason}; empty, "
                         f"truncated or not written by torch.save?)") from None
    need = ("tensors", "optimizer", "scheduler", "state", "rng", "method")
    if not isinstance(ck, dict) or not all(k in ck for k in need):
        raise ValueError(f"--resume: {path} is not a train.py checkpoint (expected the entries {', '.join(need)})")
    if "run" not in ck:
        raise ValueError(f"--resume: {path} was written by an older train.py, which did not record the run's base "
                         f"model, data and settings, so this run cannot be checked against it: finish it with that "
                         f"version, or start over with --overwrite")
    return ck


def data_file(args) -> str:
    """The file or folder --data names (a sample or training set name resolved as the pipelines do)."""
    if os.path.exists(args.data):
        return args.data
    return llm_adapters.resolve(args.data, split="train")


def run_record(args, model, hp: dict, kind: str, world: int) -> dict:
    """What a resumed run must share with its checkpoint's (check_resume): the base model's
    fingerprint, the data's content hash, the tokenizer and every setting but MAY_CHANGE_ON_RESUME."""
    settings = {k: v for k, v in hp.items() if k not in MAY_CHANGE_ON_RESUME}
    settings.update(pipeline=kind, task=args.task, protocol=args.protocol, mask_prompt=args.mask_prompt,
                    group_by_length=args.group_by_length, token_weighted_loss=args.token_weighted_loss,
                    s2_wrap=args.s2_wrap, text_layout=args.text_layout,
                    precision=args.precision or default_precision(args.device),
                    tokenizer=content_hash(args.tokenizer) if args.tokenizer else None)
    return {"model": args.model, "base": methods.base_fingerprint(model), "data": args.data,
            "data_sha256": content_hash(data_file(args)), "settings": settings, "processes": world}


def check_resume(ck: dict, record: dict, path: str):
    """--resume continues the checkpoint's run, nothing else: another base model (by fingerprint),
    other data (by content), another tokenizer or batch, schedule or data setting is refused,
    naming the difference."""
    old = ck["run"]
    differs = methods.fingerprint_difference(old["base"], record["base"])
    if differs:
        raise ValueError(f"--resume: {path} was trained on another base model ({old['model']}) than this run's "
                         f"--model {record['model']}: {differs}")
    if old["data_sha256"] != record["data_sha256"]:
        raise ValueError(f"--resume: {path} was trained on --data {old['data']} (sha256 {old['data_sha256'][:12]}), "
                         f"this run's --data {record['data']} holds other data (sha256 {record['data_sha256'][:12]})")
    for k in sorted(set(old["settings"]) | set(record["settings"])):
        a, b = old["settings"].get(k), record["settings"].get(k)
        if a != b:
            raise ValueError(f"--resume: {path} was written with {k}={a!r}, this run has {k}={b!r}: a resumed run "
                             f"keeps its settings (only {', '.join('--' + x for x in MAY_CHANGE_ON_RESUME)} may "
                             f"change); start a new run in another --out_dir for other settings")


def trim_log(path: str, step: int):
    """Before a resumed run appends to log.jsonl: keep the records up to the checkpoint's step (the
    later ones are of steps the run redoes) and drop a last line a kill cut short. A corrupt line
    elsewhere is an error naming the file and the line."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            s = record["step"]
        except (ValueError, TypeError, KeyError):
            if n >= len(lines) - 1:                                   # the last line: a write a kill cut short
                print(f"{path}: dropped its last line, cut short ({len(line)} bytes)")
                continue
            raise ValueError(f"{path}: line {n} is not a train.py log record (corrupt?); fix or delete that "
                             f"line to resume") from None
        if s <= step:
            keep.append(line + b"\n")
    if sum(map(len, keep)) != os.path.getsize(path):
        atomic_write(path, lambda f: f.write(b"".join(keep)))


def check_schedule(args, state: dict, total: int, pipe, rank: int = 0):
    """A resumed run's schedule against its checkpoint's. A finished run (at its last step) is not
    run again and its adapter stays as it is, unless a larger --max_steps / --num_epochs extends
    it; then the best adapter so far is kept unless a later validation beats it. A schedule that
    ends before the checkpoint's step is refused."""
    d, step, before = args.out_dir, state["step"], state.get("total")
    ckpt, final = os.path.join(d, "checkpoint.pt"), os.path.join(d, "adapter" + methods.ADAPTER_EXT)
    if step > total:
        raise ValueError(f"--resume: {ckpt} is at step {step}, past this schedule's last step {total} "
                         f"(--max_steps / --num_epochs): give a schedule of at least {step} steps")
    if step == total:
        if os.path.exists(final):
            raise ValueError(f"--resume: the run in {d} finished at step {step} (its adapter: {final}); nothing to "
                             f"resume. To train longer, resume with a larger --max_steps or --num_epochs; to start "
                             f"over, --overwrite")
        if pipe.val_set and not os.path.exists(os.path.join(d, "best" + methods.ADAPTER_EXT)):
            raise ValueError(f"--resume: the run in {d} finished at step {step} but its adapter {final} is missing, "
                             f"and {ckpt} holds the last step's tensors, not the best by validation (step "
                             f"{state.get('best_step', '?')}); nothing was written. To train again, --overwrite")
        return                     # the adapter is written from the checkpoint (no validation) or best.safetensors
    if before is not None and before != total and rank == 0:
        kept = (f"; the run's best adapter so far ({final}, step {state.get('best_step', '?')}) is kept unless a "
                f"later validation beats it" if before == step and pipe.val_set and os.path.exists(final) else "")
        print(f"resume: the schedule changes from {before} to {total} steps (--max_steps / --num_epochs); the learning "
              f"rate follows the {total}-step schedule from step {step} on{kept}")


def write_args(path: str, run_info: dict, resumed_at: int | None):
    """args.json: the run's arguments and settings. A resumed run keeps the first run's and adds its
    own to "resumes" (the step it resumed at, its arguments)."""
    if resumed_at is not None and os.path.exists(path):
        try:
            with open(path) as f:
                first = json.load(f)
        except (OSError, ValueError):
            first = None
        if isinstance(first, dict):
            first.setdefault("resumes", []).append({"at_step": resumed_at, "args": run_info["args"],
                                                    "train": run_info["train"]})
            run_info = first
    atomic_write(path, lambda f: f.write(json.dumps(run_info, indent=2).encode()))


# ----------------------------------------------------------------------------- the run's folder while it trains

class Run:
    """The run's folder (--out_dir) and what training keeps there, so that train() reads as
    training: the claim (train.lock, and no other run's files), checkpoint.pt (read as plain data
    and checked on --resume, then loaded; written atomically), log.jsonl (on --resume trimmed to
    the checkpoint's step), args.json, the adapters, and Ctrl-C / SIGTERM, which only set a flag:
    the loop finishes its step, saves a checkpoint and exits, so nothing is lost.
    Process 0 writes every file; the methods that say "every process" gather from all of them."""

    def __init__(self, args, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        self.checkpoint = self.path("checkpoint.pt")
        if rank == 0:
            claim_out_dir(args)                     # locked, and no other run's files in it
        self.ck = read_checkpoint(self.checkpoint, args.device) if args.resume else None
        self.record = {}                            # run_record: what a checkpoint records of the run
        self.signal = None                          # the stop signal this process got, if any

    def path(self, name: str) -> str:
        return os.path.join(self.args.out_dir, name)

    def check(self, model, hp: dict, kind: str):
        """prepare()'s before_data: the settings after the presets; a resumed run's against its
        checkpoint's (base model, data, settings)."""
        check_settings(hp, complete=True)
        self.record = run_record(self.args, model, hp, kind, self.world)
        if self.ck is not None:
            check_resume(self.ck, self.record, self.checkpoint)

    def start(self, model, optimizer, scheduler, hp: dict, total: int, pipe) -> dict:
        """The loop's state: step 0, or the checkpoint's on --resume (every process calls it);
        args.json written."""
        if self.ck is None:
            state = {"step": 0, "best_score": None}                  # no validation score yet
        else:
            state = self.resume(model, optimizer, scheduler, total, pipe)
        state["total"] = total
        info = {"args": vars(self.args), "train": hp, "method": model.peft_method, "processes": self.world,
                "run": {k: self.record[k] for k in ("model", "data", "data_sha256")}}
        if self.args.fsdp:                          # what each process holds of the frozen weights
            info["fsdp_frozen_bytes"] = fsdp.frozen_bytes_per_process(model)
        if self.rank == 0:
            write_args(self.path("args.json"), info, state["step"] if self.ck is not None else None)
        return state

    def resume(self, model, optimizer, scheduler, total: int, pipe) -> dict:
        """The trainable tensors, AdamW's moments, the schedule's position, the step (which also
        says where in which epoch's shuffled order we are) and the RNG states, so that the resumed
        run continues bit for bit as if it had never stopped. Returns the loop's state."""
        ck, path = self.ck, self.checkpoint
        if ck["method"] != model.peft_method:
            raise ValueError(f"--resume: {path} was written for {ck['method']}, not {model.peft_method}")
        if len(ck["rng"]) != self.world:                         # one RNG state per process
            raise ValueError(f"--resume: {path} was written by {len(ck['rng'])} process(es) and this run has "
                             f"{self.world}: resume with the same number (torchrun --nproc_per_node {len(ck['rng'])})")
        current = methods.adapter_state(model)
        for k, t in ck["tensors"].items():
            if k not in current or current[k].shape != t.shape:
                raise ValueError(f"--resume: {path} holds {k} of shape {tuple(t.shape)}, this run's model has "
                                 f"{tuple(current[k].shape) if k in current else 'no such tensor'}")
        fsdp.load_full_tensors(model, ck["tensors"])             # (sharded: each process takes its chunks)
        fsdp.load_optimizer_state(model, optimizer, ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"][self.rank])
        state = ck["state"]
        if "best_val" in state:          # an older train.py's checkpoint: its best score negated unless a loss
            v = state.pop("best_val")
            state["best_score"] = None if math.isinf(v) else v if state.get("val_what", "loss") == "loss" else -v
        check_schedule(self.args, state, total, pipe, self.rank)
        if self.rank == 0:
            trim_log(self.path("log.jsonl"), state["step"])
            print(f"resumed from {path} at step {state['step']}")
        return state

    def save_adapter(self, model, name: str):
        """best.safetensors or adapter.safetensors: the method's tensors (every process calls it:
        a sharded model's are gathered), written by process 0."""
        tensors = fsdp.full_tensors(model, methods.adapter_state(model).keys())
        if self.rank == 0:
            methods.save_adapter(model, self.path(name + methods.ADAPTER_EXT), tensors)

    def save_checkpoint(self, model, optimizer, scheduler, state: dict):
        """checkpoint.pt: everything resume() loads (every process calls it: it gathers their RNG
        states, and a sharded model's tensors), written atomically: never a half-written file."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        tensors = fsdp.full_tensors(model, methods.adapter_state(model).keys())
        opt_state = fsdp.optimizer_state(model, optimizer)
        if self.rank == 0:
            snapshot = {"tensors": tensors, "optimizer": opt_state, "scheduler": scheduler.state_dict(),
                        "state": dict(state), "rng": rngs, "method": model.peft_method, "run": self.record}
            atomic_write(self.checkpoint, lambda f: torch.save(snapshot, f))

    @contextlib.contextmanager
    def open(self, state: dict):
        """While the loop runs: Ctrl-C and SIGTERM (a cluster's preemption) only set self.signal,
        log.jsonl is open for appending (process 0) and the progress line shows."""
        def on_signal(signum, frame):
            self.signal = signum
        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.progress, self.log_file = Progress(state["total"], state["step"], self.args.quiet or self.rank > 0), None
        try:
            if self.rank == 0:
                self.log_file = open(self.path("log.jsonl"), "a")
            yield self
        finally:
            self.progress.close()
            if self.log_file is not None:
                self.log_file.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)

    @property
    def stop_requested(self) -> bool:
        return self.signal is not None

    def log(self, record: dict):
        """One step's record: a line of log.jsonl (process 0), and the progress line."""
        if self.log_file is not None:
            try:
                self.log_file.write(json.dumps(record) + "\n")
                self.log_file.flush()
            except OSError as e:                                   # a full disk: name the file
                raise OSError(e.errno, f"cannot write {self.log_file.name}: {e.strerror or e}") from None
        self.progress.update(record["step"], record["loss"], record["lr"], record["tokens_per_s"])

    def stop(self, step: int):
        """Exit after a stop signal, the checkpoint saved: status 128 + the signal's number, as a
        shell reports a process a signal ended."""
        self.progress.close()
        signum = int(self.signal or signal.SIGTERM)                # (or another process got it)
        if self.rank == 0:
            print(f"stopped by signal {signum} at step {step}; checkpoint saved to {self.checkpoint}; "
                  f"continue with --resume", file=sys.stderr)
        sys.exit(128 + signum)

    def finish(self, model, pipe, state: dict, hooks):
        """adapter.safetensors, the run's result: with a validation split, the best adapter by
        validation (an extended run that never beat its best keeps that one), else the last
        step's (every process calls it)."""
        final, best = self.path("adapter" + methods.ADAPTER_EXT), self.path("best" + methods.ADAPTER_EXT)
        last = not pipe.val_set or not (os.path.exists(best) or os.path.exists(final))
        if last:
            self.save_adapter(model, "adapter")
        if self.rank > 0:
            return
        what, score = state.get("val_what", "loss"), state.get("best_score")
        shown = "(none)" if score is None else f"{score:.4f}"
        if last:
            print(f"adapter written to {final}")
        elif os.path.exists(best):
            os.replace(best, final)                                # the best validation score's
            print(f"best validation {what} {shown}; adapter written to {final}")
        else:
            print(f"best validation {what} {shown} is still step {state.get('best_step', '?')}'s; its adapter "
                  f"{final} is kept")
        for h in hooks:                                            # the ranks AdaLoRA / SoRA kept, per layer
            print(h.summary(model))


