"""Table 4 on a laptop: does LMAM help a real pretrained model? (docs/results.md has the answer.)

    python scripts/real_model_study.py --out_dir runs/smollm2            # the core table, then the sensitivity
    python scripts/real_model_study.py --out_dir runs/smollm2 --report   # tables only, from what is finished

SmolLM2-135M-Instruct (the GGUF in ../shared/data, or --model PATH) fine-tuned on commonsense
questions with the paper's methods at their SmolLM2 presets (presets.py), every run evaluated on the
same held-out questions. The steps, each one train.py or eval.py process:

1. The split. LLM-Adapters ships no training sets for these tasks small enough for a CPU, so the
   questions come from its *test* files (dataset/TASK/test.json): each file is shuffled with
   numpy's default_rng(--split_seed) and cut in two halves; the first --train_per_task of the first
   half train, the first --heldout_per_task of the second half are held out. These are test sets:
   the numbers here are held-out accuracies on half of each test set, not the benchmarks' test
   accuracies, and must not be compared with Table 4. The files go to OUT/data/ (train.json, the
   tasks mixed; heldout/TASK.json), with OUT/data/split.json naming the rule and each file's hash.
2. Training (train.py): one epoch over train.json, bf16 weights on the CPU, the method's
   learning rate and batch size from presets.py (LLM-Adapters' or Table 19's), warmup 10% of the
   steps (LLM-Adapters' 100 warmup steps are more than a small run has), no validation split
   (every training question trains; the adapter of the last step is evaluated), batches grouped by
   length (less padding: the same examples, in another order).
3. Evaluation (eval.py), every run on the same questions:
   - rank classification by the answer labels (--protocol rank): every held-out question, in both
     prompt layouts (LLM-Adapters' evaluation prompt, and its training prompt's layout);
   - rank classification by the options' texts (--rank_by text, lm-evaluation-harness's acc_norm):
     every held-out question of the tasks whose options have texts, in the training layout: what
     the pretrained model knows, far above chance where the labels are not;
   - generation as LLM-Adapters evaluates (4 beams, the answer by regex): the first --gen_per_task
     held-out questions of each task, in both layouts;
   - every run with LMAM a second time with its map removed (--lmam_off: Attn_s = 0, the rest
     unchanged), with each protocol and layout the run itself has.
4. The sensitivity runs, after the core table: LoRA + LMAM with LMAM's learning rate scaled
   (--lmam_lr_scale 0.1, next to the core run's 1), with the paper's literal initialisation
   (--lmam_init paper: the map barely moves at s = 1/(576·600)), and with n covering only the
   prompt's fixed header (the tokens every training prompt shares) instead of 128.

Every job runs in its own folder under OUT/runs/; a job that finished wrote OUT/runs/NAME/done.json
and is skipped on a rerun, a training that was stopped resumes from its checkpoint.pt (train.py
--resume), so the study resumes after an interruption. --jobs N runs N jobs at once, each with
cores / N threads. The report (OUT/results.md, OUT/results.json) is written at the end and by
--report: accuracy per task and averaged with 95% intervals, the chance and majority levels,
paired comparisons on the same questions (exact McNemar tests), the trainable share, the wall time
and LMAM's largest |Attn_s| per layer.
"""
import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data import llm_adapters            # noqa: E402
from data import quanta                  # noqa: E402

MODEL = os.path.join(os.path.dirname(ROOT), "shared", "data", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")
# Four of LLM-Adapters' eight commonsense tasks (HellaSwag's test set is not in ../shared): the ones with the
# shortest prompts and the most room above chance for a small model; --tasks takes any of them.
TASKS = ["boolq", "piqa", "social_i_qa", "ARC-Easy"]
LAYOUTS = ("eval", "train")
# Rank classification by the options' texts (eval.py --rank_by text) where the options have texts
TEXT_TASKS = ["piqa", "ARC-Easy", "winogrande", "ARC-Challenge", "openbookqa"]      # (SIQA's long options: too slow here)

# The runs: name -> (train.py method, extra train.py flags). "base" is not trained.
CORE = {"base": (None, []), "lora": ("lora", []), "dora": ("dora", []), "lorada_la": ("lorada_la", []),
        "lmam": ("lmam", []), "lora+lmam": ("lora+lmam", [])}
SENSITIVITY = {"lora+lmam_lr0.1": ("lora+lmam", ["--lmam_lr_scale", "0.1"]),
               "lora+lmam_paper_init": ("lora+lmam", ["--lmam_init", "paper"]),
               "lora+lmam_n_header": ("lora+lmam", ["--lmam_len", "{header}"])}


# ----------------------------------------------------------------------------- the split

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path, obj):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def make_split(out, tasks, train_per_task, heldout_per_task, seed):
    """OUT/data/train.json and heldout/TASK.json (see the module docstring). A folder that already
    holds a split made by other settings is refused, never mixed."""
    d = os.path.join(out, "data")
    rule = {"rule": "each LLM-Adapters test file shuffled by numpy.random.default_rng(seed).permutation, "
                    "first half trains (its first train_per_task), second half held out (its first heldout_per_task)",
            "seed": seed, "tasks": tasks, "train_per_task": train_per_task, "heldout_per_task": heldout_per_task,
            "sources": {t: sha256(llm_adapters.resolve(t)) for t in tasks}}
    path = os.path.join(d, "split.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in rule} != rule:
            diff = [k for k in rule if old.get(k) != rule[k]]
            raise SystemExit(f"error: {path} was made with other settings ({', '.join(diff)} differ): "
                             f"use another --out_dir, or delete {out} to start over")
        return old
    os.makedirs(os.path.join(d, "heldout"), exist_ok=True)
    train = []
    for t in tasks:
        records = llm_adapters.load_records(llm_adapters.resolve(t), fields=("instruction", "output", "answer"))
        perm = np.random.default_rng(seed).permutation(len(records)).tolist()
        half = len(records) // 2
        train += [dict(records[i], task=t) for i in perm[:half][:train_per_task]]
        write_json(os.path.join(d, "heldout", f"{t}.json"), [records[i] for i in perm[half:][:heldout_per_task]])
    rng = np.random.default_rng(seed)
    train = [train[i] for i in rng.permutation(len(train))]        # the tasks mixed
    write_json(os.path.join(d, "train.json"), train)
    rule["files"] = {os.path.relpath(p, out): sha256(p) for p in
                     [os.path.join(d, "train.json"), *(os.path.join(d, "heldout", f"{t}.json") for t in tasks)]}
    write_json(path, rule)
    return rule


def header_tokens(tokenizer, records) -> int:
    """The number of tokens every training prompt starts with (the fixed header LMAM's first
    positions see in every example)."""
    seqs = [tokenizer.encode(llm_adapters.train_prompt(r)) for r in records]
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


# ----------------------------------------------------------------------------- the jobs

class Job:
    def __init__(self, name, cmd, folder, after=None):
        self.name, self.cmd, self.folder, self.after = name, cmd, folder, after
        self.done_path = os.path.join(folder, "done.json")

    def done(self):
        return os.path.exists(self.done_path)


def build_jobs(out, model, tasks, gen_per_task, header, stage, seed):
    data = os.path.join(out, "data")
    jobs = []
    runs = dict(CORE)
    if stage == "all":
        runs.update(SENSITIVITY)
    for name, (method, flags) in runs.items():
        run_dir = os.path.join(out, "runs", name)
        train = None
        if method:
            flags = [f.format(header=header) for f in flags]
            cmd = ["train.py", "--model", model, "--method", method, "--data", os.path.join(data, "train.json"),
                   "--task", "commonsense", "--num_epochs", "1", "--val_set_size", "0", "--warmup_ratio", "0.1",
                   "--eval_step", "0", "--save_step", "20", "--group_by_length", "--mask_prompt", "--precision", "bf16",
                   "--seed", str(seed), "--quiet", *flags]
            train = Job(f"{name}/train", cmd + ["--out_dir", run_dir], run_dir)
            jobs.append(train)
        adapter = ["--adapter", os.path.join(run_dir, "adapter.safetensors")] if method else []
        has_map = method is not None and "lmam" in method or method == "lorada_la"
        sensitivity = name in SENSITIVITY
        # What fits on 2 CPU cores: the map removed is evaluated in the training layout (by label and
        # by text); generation and the evaluation prompt only with the map; the sensitivity runs by
        # rank classification in the training layout.
        for lmam_off in ([False, True] if has_map and not sensitivity else [False]):
            for protocol in ("rank", "default"):
                if (sensitivity or lmam_off) and protocol == "default":
                    continue
                for layout in LAYOUTS:
                    if (sensitivity or lmam_off) and layout == "eval":
                        continue

                    tag = f"{protocol}_{layout}" + ("_nomap" if lmam_off else "")
                    folder = os.path.join(run_dir, "eval", tag)
                    cmd = ["eval.py", "--model", model, *adapter, "--task", ",".join(tasks), "--protocol", protocol,
                           "--prompt_layout", layout, "--precision", "bf16", "--out_dir", folder,
                           "--data_dir", os.path.join(data, "heldout"), "--batch_size", "8"]
                    if protocol == "default":
                        cmd += ["--limit", str(gen_per_task)]
                    if lmam_off:
                        cmd.append("--lmam_off")
                    jobs.append(Job(f"{name}/{tag}", cmd, folder, after=train))
            text_tasks = [t for t in tasks if t in TEXT_TASKS]
            if text_tasks:
                tag = "text_train" + ("_nomap" if lmam_off else "")
                folder = os.path.join(run_dir, "eval", tag)
                cmd = ["eval.py", "--model", model, *adapter, "--task", ",".join(text_tasks), "--protocol", "rank",
                       "--rank_by", "text", "--prompt_layout", "train", "--precision", "bf16", "--out_dir", folder,
                       "--data_dir", os.path.join(data, "heldout"), "--batch_size", "8"]
                jobs.append(Job(f"{name}/{tag}", cmd + (["--lmam_off"] if lmam_off else []), folder, after=train))
    # the order the lanes take them in: the core runs' training and rank classification, then the
    # sensitivity runs, then generation (the slowest per question, and the least precise here)
    def priority(job):
        run, what = job.name.split("/")
        return (what.startswith("default"), run in SENSITIVITY, what != "train")
    return sorted(jobs, key=priority)


def run_job(job, threads):
    """One job, its output in FOLDER/job.log; done.json when it finished (with its wall time)."""
    os.makedirs(job.folder, exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, job.cmd[0]), *job.cmd[1:]]
    if job.cmd[0] == "train.py" and not os.path.exists(os.path.join(job.folder, "adapter.safetensors")):
        if os.path.exists(os.path.join(job.folder, "checkpoint.pt")):
            cmd.append("--resume")                  # stopped before it finished: continue
            if os.path.exists(os.path.join(job.folder, "train.lock")):
                cmd.append("--overwrite")           # (the lock of the process that was stopped: take it)
        elif any(os.path.exists(os.path.join(job.folder, f)) for f in ("args.json", "log.jsonl", "train.lock")):
            cmd.append("--overwrite")               # killed before its first checkpoint: start it again
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log = os.path.join(job.folder, "job.log")
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code:
        raise RuntimeError(f"{job.name}: exited with status {code}; see {log}")
    write_json(job.done_path, {"seconds": round(time.time() - t0, 1), "threads": threads, "command": cmd})


def run_jobs(jobs, n_lanes, threads):
    """Run the jobs that are not done, n_lanes at a time, each after the job it needs; a line per job."""
    todo = [j for j in jobs if not j.done()]
    lock, failed = threading.Lock(), set()
    total, finished = len(todo), [0]

    def next_job():
        """A job whose dependency is done (None if none is ready); jobs whose dependency failed are dropped."""
        with lock:
            for j in list(todo):
                if j.after is not None and j.after.name in failed:
                    todo.remove(j)
                    failed.add(j.name)
                    finished[0] += 1
                    print(f"[{finished[0]}/{total}] {j.name}: skipped, {j.after.name} failed", flush=True)
                elif j.after is None or j.after.done():
                    todo.remove(j)
                    return j
            return None

    def lane():
        while True:
            with lock:
                if not todo:
                    return
            j = next_job()
            if j is None:
                time.sleep(2)
                continue
            t0 = time.time()
            print(f"start {j.name}", flush=True)
            try:
                run_job(j, threads)
                status = f"done in {time.time() - t0:.0f} s"
            except RuntimeError as e:
                failed.add(j.name)
                status = f"FAILED: {e}"
            with lock:
                finished[0] += 1
                print(f"[{finished[0]}/{total}] {j.name}: {status}", flush=True)

    lanes = [threading.Thread(target=lane) for _ in range(n_lanes)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    return failed


# ----------------------------------------------------------------------------- the report

def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(a, b):
    """Exact two-sided McNemar test of paired 0/1 outcomes: (a right & b wrong, b right & a wrong, p)."""
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n01 = sum(1 for x, y in zip(a, b) if y and not x)
    n = n10 + n01
    k = min(n10, n01)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return n10, n01, p


def read_field(folder, tasks, suffix, field):
    """{task: [each held-out question's `field` ("correct", "prediction"), by index]} from eval.py's
    per-question files; None until the evaluation has finished (its done.json), so that every run
    pairs on the same questions."""
    if not os.path.exists(os.path.join(folder, "done.json")):
        return None
    out = {}
    for t in tasks:
        path = os.path.join(folder, f"{t}{suffix}.jsonl")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            rows = {r["index"]: r[field] for r in map(json.loads, filter(str.strip, f))}
        out[t] = [rows[i] for i in sorted(rows)]
    return out


def chance_levels(out, tasks):
    """Per task: uniform chance (1 / candidates, averaged over questions) and the majority label's share."""
    levels = {}
    for t in tasks:
        with open(os.path.join(out, "data", "heldout", f"{t}.json")) as f:
            records = json.load(f)
        chance = np.mean([1 / len(quanta.answer_format(r["instruction"])) for r in records])
        labels = [r["answer"] for r in records]
        majority = max(labels.count(x) for x in set(labels)) / len(labels)
        levels[t] = (float(chance), majority)
    return levels


def run_info(run_dir):
    """(trainable share %, training seconds, LMAM's max |Attn_s| per layer at the end) of a run."""
    share = seconds = lmam = None
    log = os.path.join(run_dir, "job.log")
    if os.path.exists(log):
        for line in open(log):
            if "trainable%:" in line:
                share = float(line.rsplit("trainable%:", 1)[1])
    path = os.path.join(run_dir, "log.jsonl")
    if os.path.exists(path):              # the steps' own time (a resumed run's segments added up)
        steps = {}
        for line in open(path):
            r = json.loads(line) if line.strip() else {}
            if "tokens_per_s" in r:
                steps[r["step"]] = r["tokens"] / r["tokens_per_s"]
            lmam = r.get("lmam_max_abs", lmam)
        seconds = sum(steps.values()) if steps else None
    return share, seconds, lmam


def pct(x):
    return f"{100 * x:.1f}"


def report(out, tasks, runs):
    levels = chance_levels(out, tasks)
    chance = np.mean([levels[t][0] for t in tasks])
    majority = np.mean([levels[t][1] for t in tasks])
    lines = [f"Held-out questions per task: " + ", ".join(
        f"{t} {len(json.load(open(os.path.join(out, 'data', 'heldout', f'{t}.json'))))}" for t in tasks),
        f"Chance (uniform over the candidates), average over tasks: {pct(chance)}%; always the majority "
        f"label: {pct(majority)}%", ""]
    results = {"chance": {t: levels[t][0] for t in tasks}, "majority": {t: levels[t][1] for t in tasks}, "runs": {}}
    outcomes = {}
    for protocol, suffix, title in (("rank", ".rank", "Rank classification by the answer labels (every held-out question)"),
                                    ("text", ".rank_text", "Rank classification by the options' texts (acc_norm)"),
                                    ("default", "", "Generation, LLM-Adapters' protocol (4 beams, the answer by regex)")):
        for layout in LAYOUTS:
            if protocol == "text" and layout == "eval":
                continue
            cols = [t for t in tasks if t in TEXT_TASKS] if protocol == "text" else tasks
            head = ["run", *cols, "avg [95% CI]", "share %", "train s (steps)"]
            rows = []
            for name in runs:
                for nomap in (False, True):
                    folder = os.path.join(out, "runs", name, "eval", f"{protocol}_{layout}" + ("_nomap" if nomap else ""))
                    o = read_field(folder, cols, suffix, "correct")
                    if o is None:
                        continue
                    key = (name + (" (map removed)" if nomap else ""), protocol, layout)
                    outcomes[key] = o
                    accs = [np.mean(o[t]) for t in cols]
                    # the average's interval: a bootstrap over questions within each task (10,000 draws)
                    rng = np.random.default_rng(0)
                    boot = np.mean([[rng.choice(o[t], len(o[t])).mean() for t in cols] for _ in range(2000)], axis=1)
                    lo, hi = np.percentile(boot, [2.5, 97.5])
                    share, seconds, _ = run_info(os.path.join(out, "runs", name))
                    cells = []
                    for t in cols:
                        a, b = wilson(sum(o[t]), len(o[t]))
                        cells.append(f"{pct(np.mean(o[t]))} [{pct(a)}, {pct(b)}]")
                    rows.append([key[0], *cells, f"**{pct(np.mean(accs))}** [{pct(lo)}, {pct(hi)}]",
                                 "–" if share is None else f"{share:.3f}", "–" if seconds is None else f"{seconds:.0f}"])
                    results["runs"].setdefault(key[0], {})[f"{protocol}/{layout}"] = {
                        "per_task": dict(zip(cols, map(float, accs))), "avg": float(np.mean(accs)),
                        "avg_ci": [float(lo), float(hi)], "n": {t: len(o[t]) for t in cols}}
            if rows:
                lines += [f"### {title}, {'the evaluation prompt' if layout == 'eval' else 'the training layout'}", "",
                          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
                lines += ["", "chance: " + ", ".join(f"{t} {pct(levels[t][0])}" for t in cols)
                          + f"; avg {pct(np.mean([levels[t][0] for t in cols]))}. Majority label: avg "
                          f"{pct(np.mean([levels[t][1] for t in cols]))}.", ""]
    # paired comparisons on the same questions
    pairs = [("lorada_la", "lora"), ("lora+lmam", "lora"), ("lorada_la", "lorada_la (map removed)"),
             ("lmam", "lmam (map removed)"), ("lora+lmam", "lora+lmam (map removed)")]
    pairs += [(n, "base") for n in runs if n != "base" and n in CORE]
    pairs += [(n, "lora") for n in runs if n in SENSITIVITY]
    pairs += [(n, f"{n} (map removed)") for n in runs if n in SENSITIVITY]
    lines += ["### Paired comparisons (exact McNemar test on the same questions, all tasks pooled)", "",
              "| A | B | protocol (rank: labels, text: options' texts, default: generation), layout | A right, B wrong | B right, A wrong | A − B (points) | p |",
              "|---|---|---|---|---|---|---|"]
    results["paired"] = []
    for a, b in pairs:
        for protocol in ("rank", "text", "default"):
            for layout in LAYOUTS:
                oa, ob = outcomes.get((a, protocol, layout)), outcomes.get((b, protocol, layout))
                if oa is None or ob is None:
                    continue
                xa = [x for t in oa for x in oa[t]]
                xb = [x for t in ob for x in ob[t]]
                n10, n01, p = mcnemar(xa, xb)
                diff = 100 * (np.mean(xa) - np.mean(xb))
                lines.append(f"| {a} | {b} | {protocol}, {layout} | {n10} | {n01} | {diff:+.1f} | {p:.3g} |")
                results["paired"].append({"a": a, "b": b, "protocol": protocol, "layout": layout, "a_only": n10,
                                          "b_only": n01, "diff_points": diff, "p": p})
    # how many predictions the prompt layout changes (rank classification by label, same questions)
    lines += ["", "### Predictions that change between the two prompt layouts (rank classification by label)", "",
              "| run | changed of | questions |", "|---|---|---|"]
    for name in runs:
        for nomap in ("", "_nomap"):
            preds = [read_field(os.path.join(out, "runs", name, "eval", f"rank_{layout}{nomap}"), tasks, ".rank",
                                "prediction") for layout in LAYOUTS]
            if None in preds:
                continue
            changed = sum(a != b for t in tasks for a, b in zip(preds[0][t], preds[1][t]))
            total = sum(len(preds[0][t]) for t in tasks)
            lines.append(f"| {name}{' (map removed)' if nomap else ''} | {changed} | {total} |")
            results["runs"].setdefault(name + (" (map removed)" if nomap else ""), {})["layout_flips"] = [changed, total]
    lines += ["", "### LMAM's largest |Attn_s| per layer at the end of training", "",
              "| run | layers 0-29: max \\|Attn_s\\| |", "|---|---|"]
    for name in runs:
        _, _, lmam = run_info(os.path.join(out, "runs", name))
        if lmam:
            lines.append(f"| {name} | " + " ".join(f"{v:.2g}" for v in lmam) + " |")
            results["runs"].setdefault(name, {})["lmam_max_abs"] = lmam
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(out, "results.json"), results)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="the study's folder (data/, runs/, results.md); a rerun resumes")
    p.add_argument("--model", default=MODEL, help="SmolLM2-135M(-Instruct): a GGUF file or a checkpoint directory")
    p.add_argument("--tasks", default=",".join(TASKS), help="LLM-Adapters' commonsense tasks")
    p.add_argument("--train_per_task", type=int, default=150, help="training questions per task (from the first half)")
    p.add_argument("--heldout_per_task", type=int, default=150, help="held-out questions per task (second half)")
    p.add_argument("--gen_per_task", type=int, default=15, help="held-out questions per task evaluated by generation")
    p.add_argument("--split_seed", type=int, default=0, help="the split's seed")
    p.add_argument("--seed", type=int, default=42, help="train.py's seed (LLM-Adapters' 42)")
    p.add_argument("--stage", choices=("core", "all"), default="all",
                   help="core: the core table only; all: then the sensitivity runs")
    p.add_argument("--jobs", type=int, default=2, help="jobs at once (each with cores / jobs threads)")
    p.add_argument("--report", action="store_true", help="only write the report from what is finished")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in llm_adapters.COMMONSENSE]
    if unknown:
        raise SystemExit(f"error: --tasks {','.join(unknown)}: not an LLM-Adapters commonsense task "
                         f"({', '.join(llm_adapters.COMMONSENSE)})")
    if not os.path.exists(args.model):
        raise SystemExit(f"error: --model {args.model}: no such file or directory")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: expected at least 1")
    split = make_split(args.out_dir, tasks, args.train_per_task, args.heldout_per_task, args.split_seed)
    from tokenizer import load_tokenizer
    import hub
    tok = load_tokenizer(hub.tokenizer_source(args.model))
    with open(os.path.join(args.out_dir, "data", "train.json")) as f:
        header = header_tokens(tok, json.load(f))
    runs = list(CORE) + (list(SENSITIVITY) if args.stage == "all" else [])
    if not args.report:
        print(f"split: {split['train_per_task']} training and {split['heldout_per_task']} held-out questions per "
              f"task ({', '.join(tasks)}), seed {split['seed']}; the fixed header is {header} tokens", flush=True)
        jobs = build_jobs(args.out_dir, os.path.abspath(args.model), tasks, args.gen_per_task, header, args.stage,
                          args.seed)
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        try:
            failed = run_jobs(jobs, args.jobs, threads)
        except KeyboardInterrupt:
            raise SystemExit("interrupted: rerun the same command to resume") from None
        if failed:
            print(f"failed: {', '.join(sorted(failed))}", file=sys.stderr)
    print(report(args.out_dir, tasks, runs))
    import plots
    results, figure = os.path.join(args.out_dir, "results.json"), os.path.join(args.out_dir, "results.png")
    if plots.have_matplotlib():
        plots.plot_real_model_study(results, figure)
        print(f"plot: {figure}")
    else:
        print(f"no plot: matplotlib is not installed (pip install -r requirements-plots.txt), then "
              f"python plots.py study {results} --out {figure}")


if __name__ == "__main__":
    main()
