"""What eval.py saves and how a rerun reuses it: predictions go to a JSON-lines file, one line per
example, as they are made (predict_resumably), so a killed evaluation resumes where it stopped; and
every prediction file and results.json entry records what produced it (evaluation_key, task_key),
so that a rerun resumes only what the same evaluation made (claim_predictions, settle_results).

Every saved prediction file (TASK.jsonl, TASK.quanta.jsonl, TASK.rank.jsonl, SPLIT.jsonl) and every
results.json entry records the base model (its fingerprint), the adapter and the data (content
hashes), the task and the settings that change a prediction. Anything else is refused, naming what
differs (--overwrite replaces it). --limit and --batch_size are not in the key: a prediction is the
same whichever of the first N examples are asked for, and the batches a resumed run forms already
differ from an uninterrupted one's (the remaining examples, sorted by length), so the batch size only
changes padding, which the attention mask takes out up to rounding (the device likewise); a resumed
evaluation is exact up to that rounding.
"""
import hashlib
import json
import os
import sys

import methods
from data import text
from runs import atomic_write, content_hash, default_precision, read_json_object


def predict_resumably(inputs: dict, predict, out_path, field: str, label: str, batch_size: int,
                      progress=True) -> dict:
    """The loop every generative evaluation shares. `inputs` {index: token ids} are predicted in
    batches of similar length by `predict(indices) -> records` (dicts with "index" and `field`),
    which go to `out_path` as JSON lines; indices already in that file are not predicted again, so
    a rerun resumes (claim_predictions, below, has checked that the same evaluation made them). A
    last line that a kill cut short is dropped; a corrupt line elsewhere is an error naming the
    file and the line. Returns {index: record[field]} for every index of `inputs`."""
    done = {}
    if out_path and os.path.exists(out_path):
        with open(out_path, "rb") as f:
            lines = f.read().split(b"\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                index, value = r["index"], r[field]
            except (ValueError, TypeError, KeyError):
                if n >= len(lines) - 1:                        # the last line, cut short by a kill
                    print(f"{out_path}: dropping its last line, cut short; that example is predicted again",
                          file=sys.stderr)
                    atomic_write(out_path, lambda f: f.write(b"\n".join(lines[:n - 1]) + b"\n" * (n > 1)))
                    break
                raise ValueError(f"{out_path}: line {n} is not a prediction record with \"index\" and "
                                 f"{field!r} (corrupt?); fix or delete that line, or delete the file") from None
            if index in inputs:                                # (a run with a larger --limit made the rest)
                done[index] = value
    todo = sorted((i for i in inputs if i not in done), key=lambda i: len(inputs[i]))   # similar lengths together
    out = open(out_path, "a") if out_path else None
    try:
        for b in range(0, len(todo), batch_size):
            for record in predict(todo[b:b + batch_size]):
                done[record["index"]] = record[field]
                if out:
                    try:
                        out.write(json.dumps(record) + "\n")
                        out.flush()
                    except OSError as e:                       # a full disk: name the file
                        raise OSError(e.errno, f"cannot write {out_path}: {e.strerror or e}") from None
            if progress:
                score = f" | accuracy {sum(done.values()) / len(done):.3f}" if field == "correct" else ""
                print(f"\r{label}: {len(done)}/{len(inputs)}{score}", end="", file=sys.stderr, flush=True)
    finally:
        if out:
            out.close()
        if progress:
            print(file=sys.stderr)
    return done



RUN_KEY_FLAGS = ("protocol", "rank_by", "prompt_layout", "lmam_off", "num_beams", "max_new_tokens", "max_source_len",
                 "split", "stride", "ppl_protocol", "context_size")   # (ppl: each --seq_len is an entry of its own)


def evaluation_key(args, model) -> dict:
    """What every prediction and result of this eval.py run shares: the base model's fingerprint
    (a digest of methods.base_fingerprint), the adapter's and the tokenizer's content hashes, the
    weights' precision and the flags that change a prediction. "model" (the path given) is kept
    for the messages only."""
    base = json.dumps(methods.base_fingerprint(model), sort_keys=True).encode()
    return {"model": args.model, "base": hashlib.sha256(base).hexdigest()[:16],
            "adapter": content_hash(args.adapter)[:16] if args.adapter else None,
            "tokenizer": content_hash(args.tokenizer)[:16] if args.tokenizer else None,
            "precision": args.precision or default_precision(args.device),
            **{k: getattr(args, k, None) for k in RUN_KEY_FLAGS}}


def task_key(key: dict, task: str, data: str | None) -> dict:
    """The key of one task's predictions and result: the run's, the task and its data's content hash."""
    return {**key, "task": task, "data": data, "data_sha256": content_hash(data)[:16] if data else None}


NAMES = {"base": "base model", "adapter": "adapter", "tokenizer": "tokenizer", "data_sha256": "data",
         "precision": "--precision"}


def key_difference(old, new: dict, only=None) -> str | None:
    """How a recorded key differs from this run's, in words (None when they match); "model" and
    "data" (paths) only name the inputs, their hashes decide. `only`: compare these fields."""
    if not isinstance(old, dict):
        return "there is no record of what produced it"
    for k in only or new:
        if k in ("model", "data") or old.get(k) == new.get(k):
            continue
        name = NAMES.get(k, f"--{k}")
        where = {"base": "model", "data_sha256": "data"}.get(k)
        there = f"{old.get(where)}, {old.get(k)}" if where and old.get(where) else old.get(k)
        here = f"{new.get(where)}, {new.get(k)}" if where and new.get(where) else new.get(k)
        return f"another {name}: {there} there, {here} here"
    return None


def refuse_or_replace(what: str, differs: str, overwrite: bool):
    """A cached result of another evaluation: refused (a ValueError saying what differs and what to
    do), or with --overwrite announced for replacement."""
    if not overwrite:
        raise ValueError(f"{what} comes from another evaluation ({differs}); evaluate into another --out_dir, or "
                         f"give --overwrite to replace what this folder holds of it")
    print(f"--overwrite: replacing {what} ({differs})", file=sys.stderr)


def claim_predictions(out_path: str, key: dict, overwrite: bool = False):
    """Before predict_resumably appends to out_path: its predictions are resumed only when
    OUT_PATH.meta.json records this very key; predictions of another evaluation (or of unknown
    origin) are refused, or with --overwrite deleted. Writes the record for this run."""
    meta = out_path + ".meta.json"
    if os.path.exists(out_path):
        recorded = text.read_json(meta)
        differs = key_difference(recorded, key)
        if differs is None:
            return
        with open(out_path, "rb") as f:
            n = f.read().count(b"\n")
        refuse_or_replace(f"{out_path} ({n} predictions)", differs, overwrite)
        os.remove(out_path)
    atomic_write(meta, lambda f: f.write(json.dumps(key, indent=2).encode()))


def read_results(path: str) -> dict:
    """results.json ({} when absent); a file that is not a JSON object is an error naming it."""
    if not os.path.exists(path):
        return {}
    return read_json_object(path, fix="move it away or delete it to evaluate again")


def settle_results(results: dict, path: str, key: dict, keys: dict, overwrite: bool = False) -> dict:
    """results.json holds one evaluation's results (one model, adapter and settings, over tasks):
    an entry of another one (by its "fingerprint"), or of this run's tasks made from other data, is
    refused, or with --overwrite dropped. `keys`: {entry name: its task_key} of this run."""
    run_fields = [k for k in key if k != "model"]
    kept = {}
    for name, entry in results.items():
        entries = entry.values() if name == "ppl" and isinstance(entry, dict) else [entry]
        differs = None
        for e in entries:
            fp = e.get("fingerprint") if isinstance(e, dict) else None
            differs = key_difference(fp, key, run_fields) or (
                key_difference(fp, keys[name], ["data_sha256"]) if name in keys else None)
            if differs:
                break
        if differs:
            refuse_or_replace(f"{path}'s {name} result", differs, overwrite)
            continue
        kept[name] = entry
    return kept


def write_results(path: str, results: dict):
    atomic_write(path, lambda f: f.write(json.dumps(results, indent=2).encode()))

