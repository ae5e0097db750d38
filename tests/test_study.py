"""study.py: a sweep and a seed study on a tiny LLaMA end to end (train.py per point, resumable),
their results against the runs' logs and numpy, evaluation with eval.py, and the tables."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import plots
import study
import train as T
from conftest import ROOT, main_stopped_by_sigterm, tiny_llama_ckpt
from helpers import markdown_tables, shows

TRAIN = ["--method", "lorada_la", "--data", "commonsense_sample", "--max_steps", "2", "--batch_size", "2",
         "--micro_batch_size", "1", "--val_set_size", "2", "--eval_step", "1", "--quiet", "--lmam_len", "16",
         "--lora_r", "1", "--adapter_r", "2"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_llama_ckpt(tmp_path_factory.mktemp("study") / "llama")


def run_study(capsys, *args):
    """study.py in this process (each point's train.py and eval.py are still processes): what it printed."""
    capsys.readouterr()
    study.main(list(args))
    return capsys.readouterr().out


def best_val_loss(run_dir):
    """The lowest val_loss in a run's log.jsonl, read here independently of study.py."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return min(r["val_loss"] for r in map(json.loads, f) if "val_loss" in r)


@pytest.mark.slow
def test_sweep_runs_every_point_then_skips_and_resumes(ckpt, tmp_path, capsys):
    d = tmp_path / "sweep"
    args = ["sweep", "--grid", "lmam_heads=1,2", "--out_dir", str(d), "--", "--model", ckpt, *TRAIN]
    # a point whose training stopped (SIGTERM after its first step: a checkpoint, no adapter) resumes
    stopped = d / "lmam_heads=2"
    main_stopped_by_sigterm(T.main, ["--model", ckpt, *TRAIN, "--out_dir", str(stopped), "--lmam_heads", "2"],
                            T.PIPELINES, "llm", after=2)
    assert (stopped / "checkpoint.pt").exists() and not (stopped / "adapter.safetensors").exists()
    printed = run_study(capsys, *args)
    assert "[1/2] lmam_heads=1: done" in printed and "[2/2] lmam_heads=2: done" in printed
    assert "resumed from" in (stopped / "study.log").read_text()
    results = json.loads((d / "results.json").read_text())
    assert results["grid"] == {"lmam_heads": [1, 2]} and results["metric"] == "val_loss"
    assert [p["name"] for p in results["points"]] == ["lmam_heads=1", "lmam_heads=2"]
    for p in results["points"]:
        assert p["result"] == best_val_loss(p["dir"])
        assert json.loads((d / p["name"] / "args.json").read_text())["method"]["hparams"]["lmam_heads"] == \
            p["params"]["lmam_heads"]
    [rows] = [t for t in markdown_tables(printed) if t and list(t[0]) == ["lmam_heads", "val_loss"]]
    assert [r["lmam_heads"] for r in rows] == ["1", "2"]
    assert all(shows(r["val_loss"], p["result"]) for r, p in zip(rows, results["points"], strict=True)), rows

    # a rerun skips finished points and leaves their files alone
    files = {f: os.stat(d / "lmam_heads=1" / f).st_mtime_ns for f in os.listdir(d / "lmam_heads=1")}
    printed = run_study(capsys, *args)
    assert printed.count("skipped (finished before)") == 2
    assert {f: os.stat(d / "lmam_heads=1" / f).st_mtime_ns for f in os.listdir(d / "lmam_heads=1")} == files
    assert json.loads((d / "results.json").read_text())["points"] == results["points"]
    if plots.have_matplotlib():                              # Figure 4's picture from the real results
        plots.main(["sweep", str(d / "results.json"), "--out", str(tmp_path / "sweep.png"), "--dpi", "40"])
        assert os.path.getsize(tmp_path / "sweep.png") > 1000


@pytest.fixture(scope="module")
def seeds(ckpt, tmp_path_factory):
    """A 2-seed study: (its directory, what it printed)."""
    d = tmp_path_factory.mktemp("seeds") / "seeds"
    out = subprocess.run([sys.executable, "study.py", "seeds", "--seeds", "1,2", "--out_dir", str(d), "--",
                          "--model", ckpt, *TRAIN, "--lmam_heads", "2", "--warmup_steps", "0", "--learning_rate",
                          "1e-2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return d, out.stdout


@pytest.mark.slow
def test_seeds_mean_and_std_match_numpy(seeds, tmp_path):
    d, printed = seeds
    results = json.loads((d / "results.json").read_text())
    values = [best_val_loss(d / f"seed={s}") for s in (1, 2)]
    assert [p["result"] for p in results["points"]] == values
    assert values[0] != values[1]                            # the seed moves the initialisation and the batches
    s = results["summary"]
    assert s["n"] == 2 and s["ddof"] == 1
    assert s["mean"] == pytest.approx(np.mean(values)) and s["std"] == pytest.approx(np.std(values, ddof=1))
    last = [t for t in markdown_tables(printed) if t and "seed" in t[0]][-1][-1]
    mean, std = last["val_loss"].split(" ± ")
    assert last["seed"] == "mean ± std (n=2, ddof=1)" and shows(mean, s["mean"]) and shows(std, s["std"]), last
    if plots.have_matplotlib():                              # the runs' curves
        plots.main(["curves", str(d / "seed=1"), str(d / "seed=2"), "--out", str(tmp_path / "c.png"), "--dpi", "40"])
        assert os.path.getsize(tmp_path / "c.png") > 1000


@pytest.mark.slow
def test_a_trained_point_evaluated_with_eval_py(ckpt, seeds, tmp_path, capsys):
    """A point with an adapter but no result is not trained again; --eval scores it with eval.py."""
    d = tmp_path / "evaluated"
    shutil.copytree(seeds[0] / "seed=1", d / "seed=1")
    os.remove(d / "seed=1" / "result.json")
    data = os.path.join(ROOT, "data", "samples", "commonsense_sample.json")
    run_study(capsys, "seeds", "--seeds", "1", "--out_dir", str(d), "--metric", "boolq/accuracy",
              "--eval", f"--task boolq --data {data} --limit 2 --max_new_tokens 2 --num_beams 1",
              "--", "--model", ckpt, *TRAIN, "--lmam_heads", "2", "--warmup_steps", "0", "--learning_rate", "1e-2")
    point = json.loads((d / "seed=1" / "result.json").read_text())
    evaluated = json.loads((d / "seed=1" / "eval" / "results.json").read_text())
    assert point["metric"] == "boolq/accuracy" and point["result"] == evaluated["boolq"]["accuracy"]
    assert point["higher_is_better"] and "--adapter" in point["eval_command"]
    assert (d / "seed=1" / "study.log").read_text().count("train.py --model") == 1       # the seeds study's only
    assert np.isnan(json.loads((d / "results.json").read_text())["summary"]["std"])         # one seed


def test_eval_metric_choice_and_errors():
    glue = {"mnli-m": {"accuracy": 0.8, "total": 10}, "mnli-mm": {"accuracy": 0.7, "total": 10},
            "cola": {"matthews_correlation": 0.5, "total": 10}}
    assert study.main_eval_metric(glue) == ("mean accuracy/matthews_correlation over 2 tasks", pytest.approx(0.65))
    llama = {"boolq": {"accuracy": 0.5, "correct": 1, "total": 2}, "piqa": {"accuracy": 1.0, "correct": 2, "total": 2}}
    assert study.main_eval_metric(llama) == ("mean accuracy over 2 tasks", 0.75)
    assert study.main_eval_metric(llama, "piqa/accuracy") == ("piqa/accuracy", 1.0)
    with pytest.raises(ValueError, match="--metric boolq/f1: eval.py's results.json has boolq/accuracy, piqa/accuracy"):
        study.main_eval_metric(llama, "boolq/f1")
    with pytest.raises(ValueError, match="no accuracy for wmt16-en-ro: name the number to use with --metric"):
        study.main_eval_metric({"wmt16-en-ro": {"bleu_ro_tok": 20.0, "sacrebleu": 19.0}})


def test_argument_errors():
    with pytest.raises(ValueError, match=r"--grid 'lmam_rank': expected NAME=V1,V2"):
        study.parse_grid(["lmam_rank"])
    with pytest.raises(ValueError, match="a value is repeated"):
        study.parse_grid(["lmam_rank=1,1"])
    with pytest.raises(ValueError, match="set --out_dir, which study.py sets for each point"):
        study.check_train_args(["--out_dir", "x", "--model", "m"], {"seed": ["1"]})
    with pytest.raises(ValueError, match="set --seed, which study.py sets"):
        study.check_train_args(["--seed", "3"], {"seed": ["1"]})
    with pytest.raises(SystemExit):                          # argparse: "give train.py's arguments after --"
        study.parse_args(["seeds", "--seeds", "1", "--out_dir", "d"])


def test_tables():
    grid = {"lmam_heads": ["1", "2"], "lmam_rank": ["1", "4"]}
    records = {"lmam_heads=1_lmam_rank=1": {"result": 0.5}, "lmam_heads=2_lmam_rank=4": {"result": 0.9},
               "lmam_heads=2_lmam_rank=1": {"result": 0.7}}
    [rows] = markdown_tables(study.sweep_table(grid, records, "accuracy", True))
    assert list(rows[0]) == ["lmam_heads \\ lmam_rank", "1", "4"]      # rows: the first flag, columns: the second
    assert [r["lmam_heads \\ lmam_rank"] for r in rows] == ["1", "2"]
    assert shows(rows[0]["1"], 0.5) and rows[0]["4"] == "–"              # a point not finished
    assert shows(rows[1]["1"], 0.7) and shows(rows[1]["4"], 0.9)
    assert [c for r in rows for c in list(r.values())[1:] if c.startswith("**")] == [rows[1]["4"]]   # the best, bold
    summary = study.seeds_summary([1.0, 2.0, 4.0])
    assert summary["std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    table = study.seeds_table({"seed": ["1", "2", "3"]}, {f"seed={i}": {"result": v} for i, v in
                                                          ((1, 1.0), (2, 2.0), (3, 4.0))}, "val_loss", summary)
    last = markdown_tables(table)[0][-1]
    mean, std = last["val_loss"].split(" ± ")
    assert last["seed"] == "mean ± std (n=3, ddof=1)" and shows(mean, 7 / 3) and shows(std, summary["std"]), last
