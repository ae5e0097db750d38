"""What a new user meets first (README): the demo prints the same numbers on every run, says what it
is doing, writes only into its cache and prints the command that draws its picture; the README's
example, snippet and table hold as printed; the messages say what to do. (The suite leaving `git
status` clean is conftest.py's the_suite_leaves_the_checkout_clean.)"""
import contextlib
import io
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import demo
import methods
import plots
from conftest import ROOT, shared
from data import llm_adapters
from tokenizer import load_tokenizer

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import prompt_offsets as P   # noqa: E402

SMALL = dict(pretrain_steps=10, finetune_steps=4, n_train=40, n_test=4)     # the demo, in seconds
needs_matplotlib = pytest.mark.skipif(not plots.have_matplotlib(), reason="matplotlib is not installed "
                                      "(pip install -r requirements-plots.txt)")


def readme_section(title):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = readme.index(title)
    end = readme.find("\n## ", start + len(title))
    return readme[start:end if end > 0 else None]


# ----------------------------------------------------------------------------- the demo

@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo's small configuration, run twice in one cache as a user reruns it (the second run
    reuses the pretrained model): (the cache, [{printed, adapters' bytes, accuracies}] per run)."""
    cache = tmp_path_factory.mktemp("demo_cache")
    runs, torch_settings = [], (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "CACHE", str(cache))
        for _ in range(2):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                before, after = demo.main(base=str(cache / "base"), draw=False, **SMALL)
            runs.append({"printed": printed.getvalue(), "accuracy": (before, after),
                         "adapters": {n: (cache / f"run_{n}" / "adapter.safetensors").read_bytes() for n in after}})
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == torch_settings   # restored
    return cache, runs


def test_the_demo_prints_the_same_numbers_on_every_run(demo_runs):
    """With several threads, LMAM's backward summed in a varying order and LoRaDA-LA's accuracy
    changed from run to run (0% to 33%); now the adapters are the same bytes, the numbers the same."""
    _, (first, second) = demo_runs
    assert first["adapters"] == second["adapters"]
    assert first["accuracy"] == second["accuracy"]
    table = lambda run: run["printed"][run["printed"].index("accuracy (chance"):].split("done in")[0]  # noqa: E731
    assert table(first) == table(second)


def test_the_demo_says_what_it_does(demo_runs):
    """A line for each stage (and train.py's progress line during fine-tuning), nothing about a
    commonsense task, train.py's own output in the run's train.log."""
    cache, (first, second) = demo_runs
    printed = first["printed"]
    for line in ("[1/4] pretraining", "[2/4] generated", "[3/4] fine-tuning with lorada_la, 4 steps",
                 "[3/4] fine-tuning with lora, 4 steps", "[4/4] evaluating", "step 4/4 | loss"):
        assert line in printed, printed
    assert "[1/4] reusing the pretrained demo model" in second["printed"]
    assert "commonsense" not in printed and "presets:" not in printed
    log = (cache / "run_lorada_la" / "train.log").read_text()
    assert "trainable params: 17,808 ||" in log and "presets: lorada_la" in log


def test_the_demo_tokenizer_moves_positions_as_llama2s(demo_runs):
    """The demo's tokenizer has LLaMA-2's "▁▁" piece: the evaluation prompt substitutes a token for
    the training prompt's two spaces, so the instruction keeps its positions; the response starts one
    position earlier (README's table)."""
    cache, _ = demo_runs
    tok = load_tokenizer(str(cache / "base"))
    records = [(None, r) for r in demo.task(random.Random(456), 8)]
    rows, summary = P.measure(tok, records)
    assert summary["kind"] == ["substitution"] and summary["instruction_shift"] == [0]
    assert summary["answer_shift_count"] == {-1: 8} and summary["moved_max"] == 7


def test_without_matplotlib_the_demo_prints_the_command_that_draws_its_picture(demo_runs, monkeypatch, capsys):
    """Not "install matplotlib and rerun" (both fine-tunes again): the one plots.py command that
    draws from the adapter already written, and the picture goes to the cache, not the repository."""
    cache, _ = demo_runs
    monkeypatch.setattr(demo, "CACHE", str(cache))
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    record = demo.task(random.Random(456), 1)[0]
    adapter = str(cache / "run_lorada_la" / "adapter.safetensors")
    demo.draw_lmam(str(cache / "base"), adapter, record)
    printed = capsys.readouterr().out
    assert "pip install -r requirements-plots.txt" in printed
    command = next(line.strip() for line in printed.splitlines() if line.strip().startswith("python plots.py"))
    argv = shlex.split(command)[2:]
    assert argv[0] == "attention" and argv[argv.index("--adapter") + 1] == adapter
    assert argv[argv.index("--out") + 1] == str(cache / "demo_attention.png")
    assert open(argv[argv.index("--text_file") + 1]).read() == llm_adapters.train_prompt(record)
    monkeypatch.undo()
    if plots.have_matplotlib():
        plots.main(argv)                               # the printed command, as a user runs it
        assert (cache / "demo_attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_readme_figure_is_large_enough_to_read():
    """docs/figures/demo_attention.png: a full demo run's picture with a label per token, not a
    smoke test's 1200-pixel one."""
    with open(os.path.join(ROOT, "docs", "figures", "demo_attention.png"), "rb") as f:
        head = f.read(24)
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and width >= 2500 and height >= 800, (width, height)


# ----------------------------------------------------------------------------- LLM-Adapters' two prompts

def test_prompt_offsets_of_the_papers_tokenizers():
    """README's table, on the first 21 records of each of the 14 LLM-Adapters test files: LLaMA-2
    substitutes token 21 and moves only "### Response:" and the answer (by one); LLaMA-3 substitutes
    token 19 and moves the answer only where the instruction's end merges with the newline."""
    llama2 = load_tokenizer(shared("llama2-tokenizer", "tokenizer.model"))
    llama3 = load_tokenizer(shared("llama3-tokenizer", "tokenizer.model"))
    shared("llm_adapters", "dataset", "boolq", "test.json")
    records = P.test_records(21, os.path.join(os.path.dirname(ROOT), "shared", "data", "llm_adapters", "dataset"))
    assert len(records) == 294 and len({b for b, _ in records}) == 14
    _, s2 = P.measure(llama2, records)
    assert (s2["header"], s2["first"], s2["kind"]) == ([31], [21], ["substitution"])
    assert (s2["same128_median"], s2["moved_median"], s2["moved_max"]) == (89, 7, 7)
    assert s2["instruction_shift"] == [0] and s2["answer_shift_count"] == {-1: 294}
    _, s3 = P.measure(llama3, records)
    assert (s3["header"], s3["first"], s3["kind"]) == ([25, 26], [19], ["substitution"])
    assert (s3["same128_median"], s3["moved_median"], s3["moved_max"]) == (84, 0, 5)
    assert s3["instruction_shift"] == [0] and s3["answer_shift_count"] == {-1: 127, 0: 167}
    # the README prints these rows as the script does
    printed = P.table({"LLaMA-2 (sentencepiece)": s2, "LLaMA-3 (tiktoken)": s3}).splitlines()[2:]
    section = readme_section("## Two commands")
    for row in printed:
        assert row in section, row


# ----------------------------------------------------------------------------- the README as printed

@pytest.mark.slow
def test_readme_example_works_with_train_py(tmp_path):
    """"Add your own method": pasted into methods.py as printed, `train.py --method ia3
    --target_modules k_proj,v_proj` works and --dry_run counts it (a copy of the repository)."""
    from helpers import readme_example
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".cache", "out", "tests", "docs", "__pycache__",
                                                              ".pytest_cache", "*.pyc"))
    with open(repo / "methods.py", "a") as f:
        f.write("\n\n" + readme_example())
    out = subprocess.run([sys.executable, "train.py", "--model", "llama2-7b", "--method", "ia3", "--target_modules",
                          "k_proj,v_proj", "--dry_run"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trainable params: 262,144 ||" in out.stdout, out.stdout         # 32 layers × (4096 + 4096)


@pytest.mark.slow
def test_readme_example_that_trains_base_weights_with_train_py(tmp_path, tiny_ckpt):
    """"Add your own method", the second block, pasted into methods.py as printed: `train.py --method
    lora_norms --precision bf16` trains LoRA and the norms, and the norms stay fp32 (the model is
    loaded in fp32 under bf16 autocast), as its adapter file shows; nothing else was declared."""
    from checkpoint import load, read_safetensors
    from helpers import readme_examples
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", ".cache", "out", "tests", "docs", "__pycache__",
                                                              ".pytest_cache", "*.pyc"))
    with open(repo / "methods.py", "a") as f:
        f.write("\n\n" + "\n\n".join(readme_examples()))
    out = subprocess.run([sys.executable, "train.py", "--model", tiny_ckpt, "--method", "lora_norms", "--lora_r", "2",
                          "--data", "commonsense_sample", "--out_dir", str(tmp_path / "run"), "--device", "cpu",
                          "--precision", "bf16", "--max_steps", "2", "--batch_size", "2", "--micro_batch_size", "1",
                          "--val_set_size", "2", "--eval_step", "2", "--quiet"],
                         cwd=repo, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    tensors = read_safetensors(str(tmp_path / "run" / "adapter.safetensors"))
    base = load(tiny_ckpt).state_dict()
    norms = sorted(k for k in base if k.endswith("norm.weight"))
    assert sorted(k for k in tensors if "lora_" not in k) == norms and len(norms) == 5
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert any(not torch.equal(tensors[k], base[k].float()) for k in norms)          # the norms trained


@pytest.mark.slow
def test_loading_real_checkpoints_snippet(tmp_path):
    """"Loading real checkpoints", as printed (on a tiny checkpoint, on the CPU): from the
    repository's root, and from elsewhere with the root on PYTHONPATH, as the README says."""
    from conftest import tiny_llama_ckpt
    ckpt = tiny_llama_ckpt(tmp_path / "ckpt")
    code = re.search(r"```python\n(.*?)```", readme_section("## Loading real checkpoints"), re.S).group(1)
    code = code.replace("/path/to/Llama-2-7b-hf", ckpt).replace('"cuda"', '"cpu"')
    for cwd, env in ((ROOT, {}), (str(tmp_path), {"PYTHONPATH": ROOT})):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]


# ----------------------------------------------------------------------------- messages

@pytest.mark.slow
def test_eval_checks_the_model_before_the_data(tmp_path):
    """Without huggingface_hub, `eval.py --model llama-7b` says so first, before trying to download
    any test file."""
    block = "import sys, runpy; sys.modules['huggingface_hub'] = None; "
    argv = ["eval.py", "--model", "llama-7b", "--task", "boolq", "--out_dir", str(tmp_path / "eval")]
    env = {**os.environ, "LLM_ADAPTERS_DATA": str(tmp_path / "none"), "LORADA_CACHE": str(tmp_path / "cache"),
           "LORADA_DATA_URL": "http://127.0.0.1:9/"}
    out = subprocess.run([sys.executable, "-c", block + f"sys.argv = {argv!r}; runpy.run_path('eval.py', "
                          "run_name='__main__')"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "needs huggingface_hub" in out.stderr, out.stderr
    assert "data:" not in out.stdout + out.stderr and "boolq" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_dry_run_separates_the_method_from_the_glue_head(capsys):
    """RoBERTa on GLUE: 0.8052% trains, of which LoRaDA-A's 0.33% (Table 5) and the GLUE head."""
    import train
    train.main(["--model", "roberta-base", "--method", "lorada_a", "--task", "sst2", "--dry_run"])
    printed = capsys.readouterr().out
    assert "trainable params: 1,007,042 || all params: 125,062,082 || trainable%: 0.8052" in printed
    assert "of which lorada_a: 414,912 (0.3318%" in printed and "GLUE head, which trains whole: 592,130" in printed


def test_peft_export_names_its_base_model_absolutely(tmp_path, monkeypatch):
    """adapter_config.json's base_model_name_or_path: the absolute path of a local --model (a
    relative one means nothing once the adapter is loaded from elsewhere), the Hub id of a name."""
    import export
    from hf_llama import tiny_hf_llama
    tiny_hf_llama("gqa").save_pretrained(tmp_path / "ckpt")
    m = methods.apply_method(export.load(str(tmp_path / "ckpt")), "lora", lora_r=2, target_modules="q_proj,v_proj")
    methods.save_adapter(m, str(tmp_path / "a.safetensors"))
    monkeypatch.chdir(tmp_path)
    export.main(["--model", "ckpt", "--adapter", "a.safetensors", "--format", "peft", "--out", "peft"])
    config = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    assert config["base_model_name_or_path"] == str(tmp_path / "ckpt")


@needs_matplotlib
def test_sweep_cells_are_told_apart(tmp_path, monkeypatch):
    """plots.py sweep: values that agree in four digits get as many as tell them apart, and the
    colorbar has no offset label to run into the title."""
    assert plots.distinct_format([4.28811, 4.28834, float("nan")]) == ".5g"
    assert plots.distinct_format([0.5, 0.25]) == ".4g"
    results = {"grid": {"lmam_heads": [1, 2], "lmam_rank": [1, 2]}, "metric": "val_loss",
               "points": [{"name": f"{h}{r}", "params": {"lmam_heads": h, "lmam_rank": r},
                           "result": 4.2881 + 1e-4 * h * r + 1e-5 * r} for h in (1, 2) for r in (1, 2)]}
    (tmp_path / "r.json").write_text(json.dumps(results))
    figures = []
    monkeypatch.setattr(plots, "save", lambda fig, out, dpi: figures.append(fig))
    plots.main(["sweep", str(tmp_path / "r.json"), "--out", str(tmp_path / "s.png")])
    fig = figures[0]
    fig.canvas.draw()
    cells = [t.get_text() for t in fig.axes[0].texts]
    assert len(set(cells)) == 4, cells
    assert all(ax.yaxis.get_offset_text().get_text() == "" for ax in fig.axes)
