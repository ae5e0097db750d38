"""Small studies over train.py runs: several seeds (the paper's Table 12, mean ± std over 3 seeds)
and hyperparameter sweeps (Figure 4, accuracy over LMAM's h_s × r).

    python study.py seeds --seeds 1,2,3 --out_dir runs/seeds -- --model M --method lorada_la --data commonsense_170k
    python study.py sweep --grid lmam_heads=1,2,3,4,6,12 --grid lmam_rank=1,2,4 --out_dir runs/fig4 \\
        --eval "--task sst2 --data glue_data/SST-2" \\
        -- --model /ckpt/roberta-base --method lorada_a --task sst2 --data glue_data/SST-2
    python plots.py sweep runs/fig4/results.json --out fig4.png

Everything after `--` is passed to train.py as it is. Each point of the study is one train.py
process, with its own output directory and its value of the studied flags:

    python train.py <train.py args> --out_dir D/seed=1 --seed 1
    python train.py <train.py args> --out_dir D/lmam_heads=2_lmam_rank=4 --lmam_heads 2 --lmam_rank 4

one after another (--jobs N: N at a time; each train.py uses every core, so on a CPU set
OMP_NUM_THREADS too). A point's output (train.py's and eval.py's) goes to D/<point>/study.log.

A point's result:
  - without --eval: train.py's best validation score, read from D/<point>/log.jsonl (val_loss: the
    lowest; GLUE's val_<metric>: the highest), the score the saved adapter was chosen by;
  - with --eval "<eval.py args>": eval.py runs after train.py, as
        python eval.py <eval.py args> --adapter D/<point>/adapter.safetensors --out_dir D/<point>/eval
    (--model is train.py's unless the eval args name one), and the result is read from
    D/<point>/eval/results.json: --metric KEY picks one of its numbers ("boolq/accuracy"; a wrong
    name lists them), else each task's main metric (GLUE: eval.MAIN_METRIC, matched for MNLI;
    accuracy for LLaMA's tasks) averaged over the tasks evaluated (Table 4's "Avg.").
Resumable: D/<point>/result.json is written when a point is finished. A rerun skips the points that
have one, resumes a point whose training stopped (train.py --resume from its checkpoint.pt, which
train.py reads as plain data and checks against the point's settings; the lock of a killed run is
taken over), starts over a point that died before its first checkpoint (train.py --overwrite),
and runs failed points again. Ctrl-C stops the running points (train.py saves a checkpoint) and
starts no new one; rerunning the same command resumes. D/results.json holds every finished point;
the markdown table printed:
  seeds: each seed's result, and mean ± std, the sample standard deviation (numpy's ddof=1) over the
         seeds: what "± std over 3 seeds" usually means (the paper does not say which);
  sweep: the grid, rows the first --grid flag's values, columns the second's (Figure 4's layout),
         the best value in bold.
"""
import argparse
import concurrent.futures
import itertools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from runs import atomic_write, pid_alive, read_json_object, read_log

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN, EVAL = os.path.join(ROOT, "train.py"), os.path.join(ROOT, "eval.py")
COUNTS = ("total", "correct")          # numbers in eval.py's results.json that are not scores
RUN_FILES = ("checkpoint.pt", "best.safetensors", "adapter.safetensors", "log.jsonl", "args.json")   # train.py's


# ----------------------------------------------------------------------------- the points

def value_of(text):
    """A grid value as JSON keeps it: 2 -> int, 0.5 -> float, anything else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_grid(specs):
    """["lmam_heads=1,2", "lmam_rank=1,2,4"] -> {"lmam_heads": ["1", "2"], "lmam_rank": ["1", "2", "4"]}."""
    grid = {}
    for spec in specs:
        name, eq, values = spec.partition("=")
        name = name.strip().lstrip("-")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not name.isidentifier() or not vals:
            raise ValueError(f"--grid {spec!r}: expected NAME=V1,V2,... with NAME a train.py flag, "
                             f"e.g. lmam_rank=1,2,4")
        if name in grid:
            raise ValueError(f"--grid {name} is given twice")
        if len(set(vals)) != len(vals):
            raise ValueError(f"--grid {spec!r}: a value is repeated")
        for v in vals:                                # a value names the point's folder, D/NAME=VALUE
            if not all(c.isalnum() or c in "+-._" for c in v) or v.startswith("."):
                raise ValueError(f"--grid {spec!r}: value {v!r} cannot be part of a folder name under --out_dir "
                                 f"(letters, digits and + - . _ only, not starting with a dot)")
        grid[name] = vals
    return grid


def points(grid, out_dir):
    """Every combination of the grid's values, in order (the last flag varies fastest):
    [{"name": "lmam_heads=1_lmam_rank=2", "params": {...}, "flags": ["--lmam_heads", "1", ...], "dir": ...}]."""
    out = []
    for combo in itertools.product(*grid.values()):
        pairs = list(zip(grid, combo))
        name = "_".join(f"{k}={v}" for k, v in pairs)
        out.append({"name": name, "params": {k: value_of(v) for k, v in pairs},
                    "flags": [x for k, v in pairs for x in (f"--{k}", v)], "dir": os.path.join(out_dir, name)})
    return out


def check_train_args(train_args, grid):
    """train.py must accept every point's arguments; the study owns --out_dir, --resume and the
    studied flags. Returns train.py's parsed arguments (for --model)."""
    import train
    for owned in ["out_dir", "resume", "overwrite", *grid]:
        given = [a for a in train_args if a == f"--{owned}" or a.startswith(f"--{owned}=")]
        if given:
            also = ", --resume, --overwrite" if owned in ("resume", "overwrite") else ""
            raise ValueError(f"the train.py arguments after -- set {given[0]}, which study.py sets for each point "
                             f"(--out_dir D/<point>{also}); remove it")
    for p in points(grid, "D"):
        try:
            parsed = train.parse_args([*train_args, "--out_dir", p["dir"], *p["flags"]])
        except SystemExit:                            # argparse has printed why
            raise ValueError(f"train.py rejects the arguments of point {p['name']}: "
                             f"{shlex.join([*train_args, *p['flags']])}") from None
    return parsed


# ----------------------------------------------------------------------------- a point's result

def best_validation(run_dir):
    """(metric name, best value, higher is better) from train.py's log.jsonl: val_loss is lowest-best,
    a GLUE val_<metric> highest-best. A step logged twice (a resumed run) counts once, the later."""
    scores = {}
    for r in read_log(run_dir):
        for k, v in r.items():
            if k.startswith("val_"):
                scores.setdefault(k, []).append(v)
    if not scores:
        raise ValueError(f"{os.path.join(run_dir, 'log.jsonl')}: no validation score (train.py validates with "
                         f"--val_set_size > 0; or evaluate the points with --eval)")
    name = sorted(scores)[0]
    higher = name != "val_loss"
    return name, (max if higher else min)(scores[name]), higher


def read_json(path, what):
    """A JSON object from a file this study reads back (a point's result.json, eval.py's
    results.json); anything else is a ValueError naming the file."""
    return read_json_object(path, what, "delete it to run that part again")


def write_json(path, value):
    """Write a JSON file whole (runs.atomic_write): a reader or a crash sees all of it or none."""
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode()))


def flatten(results, prefix=""):
    """eval.py's results.json -> {"boolq/accuracy": 0.71, ...}: every number but the counts."""
    flat = {}
    for k, v in results.items():
        key = f"{prefix}{k}"
        if k == "fingerprint":                        # what produced the entry (eval.py), not a score
            continue
        if isinstance(v, dict):
            flat.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in COUNTS:
            flat[key] = v
    return flat


def main_eval_metric(results, metric=None):
    """(name, value) of a point's evaluation: --metric's number, else each task's main metric (GLUE:
    eval.MAIN_METRIC; LLaMA's tasks: accuracy) averaged over the tasks (Table 4's "Avg.")."""
    from eval import MAIN_METRIC
    flat = flatten(results)
    if metric is not None:
        if metric not in flat:
            raise ValueError(f"--metric {metric}: eval.py's results.json has {', '.join(flat) or 'no number'}")
        return metric, flat[metric]
    picked = {}
    for split, scores in results.items():
        if split == "mnli-mm" and "mnli-m" in results:
            continue                                  # Table 5 reports MNLI matched
        task = "mnli" if split.startswith("mnli") else split
        main = MAIN_METRIC.get(task, "accuracy")
        if not isinstance(scores, dict) or main not in scores:
            raise ValueError(f"eval.py's results.json has no {main} for {split}: name the number to use with "
                             f"--metric (one of {', '.join(flat)})")
        picked[split] = (main, scores[main])
    if not picked:
        raise ValueError("eval.py's results.json is empty")
    names = sorted({m for m, _ in picked.values()})
    name = names[0] if len(picked) == 1 else f"mean {'/'.join(names)} over {len(picked)} tasks"
    return name, float(np.mean([v for _, v in picked.values()]))


# ----------------------------------------------------------------------------- running a point

_running = set()                   # the train.py / eval.py processes running now (Ctrl-C passes to them)
_running_lock = threading.Lock()
_stopping = threading.Event()      # set on Ctrl-C: no new point starts


def run(cmd, log_path):
    """Run a command with its output appended to log_path; an error naming the log if it fails."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        with _running_lock:
            _running.add(proc)
        try:
            code = proc.wait()
        finally:
            with _running_lock:
                _running.discard(proc)
    if code != 0:
        with open(log_path) as f:
            tail = f.read()[-1500:]
        raise RuntimeError(f"{os.path.basename(cmd[1])} exited with status {code}; its output is in "
                           f"{log_path}:\n{tail}")


def run_point(point, study):
    """Train (or resume, or skip) one point, evaluate it if asked, write D/<point>/result.json.
    Returns (the result record, whether it was already done)."""
    d = point["dir"]
    done = os.path.join(d, "result.json")
    if os.path.exists(done):
        record = read_json(done, "the point's result")
        if record.get("train_args") != study["train_args"] or record.get("eval_args") != study["eval_args"]:
            print(f"warning: {done} was made with other train.py / eval.py arguments; delete {d} to run it again",
                  file=sys.stderr)
        return record, True
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "study.log")
    t0 = time.time()
    train_cmd = [sys.executable, TRAIN, *study["train_args"], "--out_dir", d, *point["flags"]]
    adapter = os.path.join(d, "adapter.safetensors")
    trained = not os.path.exists(adapter)
    if trained:                                      # train.py writes it last: the run is finished
        import run_folder
        lock = os.path.join(d, run_folder.LOCK)
        holder = run_folder.read_lock(lock) if os.path.exists(lock) else None
        killed = holder is not None and holder.get("host") == socket.gethostname() and not pid_alive(holder["pid"])
        if os.path.exists(os.path.join(d, "checkpoint.pt")):
            train_cmd.append("--resume")              # it stopped: continue where it was (train.py checks it is
            if killed:                                # the same run), taking over the lock of a killed run
                train_cmd.append("--overwrite")
        elif killed or any(os.path.exists(os.path.join(d, f)) for f in RUN_FILES):
            train_cmd.append("--overwrite")           # it died before its first checkpoint: start over
        run(train_cmd, log)
    record = {"name": point["name"], "params": point["params"], "dir": d, "train_args": study["train_args"],
              "eval_args": study["eval_args"], "train_command": train_cmd}
    if study["eval_args"] is None:
        record["metric"], record["result"], record["higher_is_better"] = best_validation(d)
        record["metrics"] = {record["metric"]: record["result"]}
    else:
        eval_dir = os.path.join(d, "eval")
        named = any(a == "--model" or a.startswith("--model=") for a in study["eval_args"])
        model = [] if named else ["--model", study["model"]]
        eval_cmd = [sys.executable, EVAL, *model, *study["eval_args"], "--adapter", adapter, "--out_dir", eval_dir]
        if trained and os.path.isdir(eval_dir):       # what it holds was made with the adapter trained before
            eval_cmd.append("--overwrite")
        run(eval_cmd, log)
        results = read_json(os.path.join(eval_dir, "results.json"), "eval.py's results")
        record["metric"], record["result"] = main_eval_metric(results, study["metric"])
        record["higher_is_better"] = True            # accuracy, correlations, ROUGE, BLEU
        record["metrics"] = flatten(results)
        record["eval_command"] = eval_cmd
    record["seconds"] = round(time.time() - t0, 1)
    write_json(done, record)                          # a result.json is always whole
    return record, False


def run_all(todo, study, jobs):
    """Run the points, `jobs` at a time, printing a line as each finishes: {name: record}, [failures]."""
    records, failures = {}, []
    _stopping.clear()

    def one(i_point):
        i, p = i_point
        if _stopping.is_set():                        # Ctrl-C: no new point
            return
        try:
            record, skipped = run_point(p, study)
        except (RuntimeError, ValueError, OSError) as e:
            if _stopping.is_set():
                print(f"[{i}/{len(todo)}] {p['name']}: stopped by Ctrl-C; its output is in "
                      f"{os.path.join(p['dir'], 'study.log')}", flush=True)
                return
            failures.append(p["name"])
            print(f"[{i}/{len(todo)}] {p['name']}: failed: {e}", flush=True)
            return
        records[p["name"]] = record
        what = "skipped (finished before)" if skipped else f"done in {record['seconds']:.0f} s"
        print(f"[{i}/{len(todo)}] {p['name']}: {what}, {record['metric']} {record['result']:.4f}", flush=True)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in [pool.submit(one, ip) for ip in enumerate(todo, 1)]:
            future.result()
    except KeyboardInterrupt:
        stop_running_points()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return records, failures


def stop_running_points():
    """Ctrl-C: start no new point, pass SIGINT to the train.py / eval.py processes still running
    (train.py saves a checkpoint and exits; a terminal's Ctrl-C has reached them already), and wait
    for them to exit."""
    _stopping.set()
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()


# ----------------------------------------------------------------------------- tables

def fmt(v):
    return "–" if v is None or not np.isfinite(v) else f"{v:.4f}"


def seeds_summary(values):
    """Table 12's mean ± std: numpy's mean and sample standard deviation (ddof=1; NaN for one seed)."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "ddof": 1, "n": len(v)}


def seeds_table(grid, records, metric, summary=None):
    """| seed | metric | per seed, then the mean ± std row: Table 12's form."""
    rows = [f"| seed | {metric} |", "|---|---|"]
    for seed in grid["seed"]:
        r = records.get(f"seed={seed}")
        rows.append(f"| {seed} | {fmt(r['result'] if r else None)} |")
    if summary:
        rows.append(f"| mean ± std (n={summary['n']}, ddof=1) | {fmt(summary['mean'])} ± {fmt(summary['std'])} |")
    return "\n".join(rows)


def sweep_table(grid, records, metric, higher_is_better):
    """The grid: Figure 4's layout for two flags (rows: the first, columns: the second), one row per
    point otherwise; the best finished value in bold."""
    done = [r["result"] for r in records.values()]
    best = (max if higher_is_better else min)(done) if done else None

    def cell(combo):
        r = records.get("_".join(f"{k}={v}" for k, v in zip(grid, combo)))
        return f"**{fmt(r['result'])}**" if r and r["result"] == best else fmt(r["result"] if r else None)
    names = list(grid)
    if len(names) == 2:
        a, b = names
        rows = [f"| {a} \\ {b} | " + " | ".join(grid[b]) + " |", "|---|" + "---|" * len(grid[b])]
        rows += [f"| {va} | " + " | ".join(cell((va, vb)) for vb in grid[b]) + " |" for va in grid[a]]
    else:
        rows = ["| " + " | ".join(names) + f" | {metric} |", "|" + "---|" * (len(names) + 1)]
        rows += ["| " + " | ".join(combo) + f" | {cell(combo)} |" for combo in itertools.product(*grid.values())]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the command line

def parse_args(argv):
    """study.py's own flags come before `--`, train.py's after it."""
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="study", required=True)
    seeds = sub.add_parser("seeds", help="the same run with several seeds: mean ± std (Table 12)")
    seeds.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 1,2,3")
    sweep = sub.add_parser("sweep", help="a grid over train.py flags (Figure 4)")
    sweep.add_argument("--grid", action="append", required=True,
                       help="NAME=V1,V2,...: a train.py flag and its values; repeat for a grid "
                            "(two: Figure 4's layout)")
    for s in (seeds, sweep):
        s.add_argument("--out_dir", required=True,
                       help="the study's directory: D/<point>/ for each point, D/results.json")
        s.add_argument("--eval", default=None,
                       help='eval.py arguments, quoted (e.g. "--task boolq --limit 200"): evaluate each point with '
                            "eval.py; without it a point's result is its best validation score from log.jsonl")
        s.add_argument("--metric", default=None, help="with --eval: which number of eval.py's results.json is the "
                                                      "result (e.g. boolq/accuracy; default: the tasks' main metric)")
        s.add_argument("--jobs", type=int, default=1, help="points run at the same time (default 1: one after another)")
    args = p.parse_args(argv[:cut])                   # (--help stops here)
    if cut == len(argv):
        p.error("give train.py's arguments after --, e.g. "
                "python study.py seeds --seeds 1,2,3 --out_dir D -- --model M --method lorada_la")
    args.train_args = argv[cut + 1:]
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return run_study(args)
    except (ValueError, OSError) as e:                # OSError: a full or read-only disk
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print(f"study.py: interrupted (Ctrl-C); finished points keep their result.json and a stopped train.py saved "
              f"its checkpoint: rerun the same command to resume {args.out_dir}", file=sys.stderr)
        sys.exit(130)


def run_study(args):
    """The study of parse_args' arguments: check them, run the points, write D/results.json, print
    the table."""
    if args.study == "seeds":
        try:
            grid = {"seed": [str(int(s)) for s in args.seeds.split(",") if s.strip()]}
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 1,2,3") from None
        if not grid["seed"] or len(set(grid["seed"])) != len(grid["seed"]):
            raise ValueError(f"--seeds {args.seeds!r}: expected distinct integers, e.g. 1,2,3")
    else:
        grid = parse_grid(args.grid)
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: expected 1 or more")
    if args.metric and args.eval is None:
        raise ValueError("--metric picks a number of eval.py's results: it needs --eval")
    parsed = check_train_args(args.train_args, grid)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out_dir {args.out_dir}: is a file, not a folder")
    todo = points(grid, args.out_dir)
    study = {"study": args.study, "train_args": args.train_args,
             "eval_args": None if args.eval is None else shlex.split(args.eval),
             "model": parsed.model, "metric": args.metric}
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"{args.study}: {len(todo)} points in {args.out_dir}")
    records, failures = run_all(todo, study, args.jobs)

    finished = [records[p["name"]] for p in todo if p["name"] in records]
    summary = {"study": args.study, "grid": {k: [value_of(v) for v in vs] for k, vs in grid.items()},
               "train_args": args.train_args, "eval_args": study["eval_args"],
               "metric": finished[0]["metric"] if finished else None,
               "higher_is_better": finished[0]["higher_is_better"] if finished else None,
               "points": [{k: r[k] for k in ("name", "params", "dir", "metric", "result", "metrics")}
                          for r in finished],
               "failed": failures}
    if args.study == "seeds" and finished:
        summary["summary"] = seeds_summary([r["result"] for r in finished])
    path = os.path.join(args.out_dir, "results.json")
    write_json(path, summary)
    metric = summary["metric"] or "result"
    print(seeds_table(grid, records, metric, summary.get("summary")) if args.study == "seeds"
          else sweep_table(grid, records, metric, summary["higher_is_better"]))
    print(f"results written to {path}")
    if failures:
        sys.exit(f"error: {len(failures)} of {len(todo)} points failed ({', '.join(failures)}); "
                 f"their output is in <point>/study.log; rerun the same command to retry them")
    return summary


if __name__ == "__main__":
    main()
