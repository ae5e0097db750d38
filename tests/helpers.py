"""Test helpers that several test files share (plain functions and classes; the fixtures are in
conftest.py): tiny models and checkpoints, train.py command lines, and reading markdown tables."""
import re
import signal
import subprocess
import sys
import time

import torch
from torch.testing import assert_close

import methods
import model as M
from checkpoint import read_safetensors
from conftest import ROOT

# transformers is imported inside the helpers that need it (hf_llama, hf_encdec), so that a test file
# using only the others does not load it.


# ----------------------------------------------------------------------------- tiny models

def tiny(variant="mha", seed=0):
    """Our tiny LLaMA with the same weights as transformers' tiny_hf_llama(variant, seed): (ours, theirs)."""
    from hf_llama import tiny_hf_llama
    hf = tiny_hf_llama(variant, seed=seed)
    c = hf.config
    cfg = M.LlamaConfig(dim=64, n_layers=2, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
                        hidden_dim=176, vocab_size=512, norm_eps=1e-5, rope_theta=c.rope_parameters["rope_theta"])
    ours = M.Llama(cfg)
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return ours.eval(), hf


def grads_match(theirs_named, ours_named, key=lambda k: k):
    """Gradients equal within 1e-5 relative to each tensor's largest entry (they reach ~50 here)."""
    for k, p in theirs_named.items():
        scale = max(1.0, float(p.grad.abs().max()))
        assert_close(ours_named[key(k)].grad / scale, p.grad / scale, atol=1e-5, rtol=0)


class CharTokenizer:
    """A stand-in tokenizer: one id per character (BOS 1, EOS 2, pad 0)."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, bos=True, eos=False):
        return [1] * bos + [3 + (ord(c) % 200) for c in text] + [2] * eos

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


def tiny_roberta_ckpt(path, vocab=261):
    """A tiny random RoBERTa checkpoint (dim 32, 2 layers) with a byte-level vocabulary."""
    from hf_encdec import byte_vocab_dir, save
    from transformers import RobertaConfig, RobertaModel
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=130, type_vocab_size=1, layer_norm_eps=1e-5,
                        pad_token_id=1)
    save(RobertaModel(cfg), path)
    byte_vocab_dir(path)
    return str(path)


def tiny_bart_ckpt(path, kind="bart", vocab=261):
    """A tiny random BART (or mBART: kind="mbart") checkpoint with `vocab` token embeddings."""
    from hf_encdec import save, tiny_bart
    hf = tiny_bart(kind, max_position_embeddings=160)
    hf.resize_token_embeddings(vocab)
    save(hf, path)
    return str(path)


def glue_dir(tmp_path):
    """A tiny SST-2 (sentiment words), so that a few steps learn something."""
    d = tmp_path / "SST-2"
    d.mkdir()
    good, bad = ["great fun", "lovely film", "a joy", "wonderful"], ["dull mess", "awful plot", "a bore", "terrible"]
    rows = [(s, 1) for s in good] + [(s, 0) for s in bad]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s} .\t{y}\n" for s, y in rows * 3))
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"really {s}\t{y}\n" for s, y in rows))
    return str(d)


# ----------------------------------------------------------------------------- train.py runs

# small sizes for every hyperparameter a method may take, on the tiny models
TINY = {"lora_r": 2, "adapter_r": 4, "prefix_len": 3, "prefix_mid_dim": 8, "quanta_dims": "4-8", "lmam_heads": 2,
        "lmam_len": 16}


def small_flags(method, **extra):
    """train.py's flags for TINY's sizes (and `extra`) that `method` takes."""
    takes = methods.hyperparameters(methods.METHODS[method])
    flags = []
    for k, v in {**TINY, **extra}.items():
        if k in takes:
            flags += [f"--{k}", str(v)]
    return flags


def run_train(ckpt, out, *extra, method="lora"):
    """The command line of a short train.py run on the sample data (for subprocess, from ROOT)."""
    return [sys.executable, "train.py", "--model", ckpt, "--method", method, "--data", "commonsense_sample",
            "--out_dir", str(out), "--batch_size", "2", "--micro_batch_size", "1", "--val_set_size", "2",
            "--eval_step", "2", "--save_step", "3", "--warmup_steps", "2", "--lora_r", "2", "--num_epochs", "4",
            "--quiet", *extra]


def sigterm_after_two_steps(cmd, out_dir):
    """Start a training command, send it SIGTERM once its log has two steps: (return code, stderr)."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out_dir / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 2):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def torchrun_stopped_and_resumed(tiny_ckpt, tmp_path, *extra):
    """Two processes under torchrun, SIGTERM to torchrun after two steps, then --resume: the run
    must stop every process after the same step, save one checkpoint, and end bit for bit where an
    uninterrupted run does. Returns the stopped run's folder."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = lambda out, *more: torchrun + run_train(tiny_ckpt, out, *extra, *more)[1:]
    out = subprocess.run(cmd(tmp_path / "a"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    b = tmp_path / "b"
    returncode, err = sigterm_after_two_steps(cmd(b), b)
    assert returncode != 0 and "checkpoint saved" in err, err[-3000:]
    assert 2 <= torch.load(b / "checkpoint.pt", weights_only=True)["state"]["step"] < 8
    out = subprocess.run(cmd(b, "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "resumed from" in out.stdout, out.stderr[-3000:]
    ref = read_safetensors(str(tmp_path / "a" / "adapter.safetensors"))
    got = read_safetensors(str(b / "adapter.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    return b


# ----------------------------------------------------------------------------- the README

def readme_examples():
    """The README's "Add your own method" code blocks, as they are printed."""
    readme = open(f"{ROOT}/README.md").read()
    section = readme[readme.index("## Add your own method"):]
    return re.findall(r"```python\n(.*?)```", section[:section.index("\n## ")], re.S)


def readme_example():
    """The first of them: (IA)³."""
    return readme_examples()[0]


def pasted_methods(code):
    """methods.py with `code` pasted at its end, as the README tells a reader to: a fresh module run
    from that text alone (nothing injected), so a name the example needs and methods.py lacks fails."""
    import types

    import methods
    pasted = types.ModuleType("methods_with_example")
    pasted.__file__ = methods.__file__
    source = open(methods.__file__).read() + "\n\n" + code
    exec(compile(source, methods.__file__, "exec"), pasted.__dict__)
    return pasted


# ----------------------------------------------------------------------------- markdown tables

def cells(line):
    """The cells of a markdown table row, without the bars and spaces: "| a | b |" -> ["a", "b"]."""
    return [c.strip() for c in line.strip().removeprefix("|").removesuffix("|").split("|")]


def markdown_tables(text):
    """Every markdown table in `text` (the lines around it are skipped): a list of tables, each a
    list of its rows below the |---| rule, each row a dict {column header: cell}."""
    lines = text.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if i == 0 or not re.fullmatch(r"\|( *:?-+:? *\|)+", line.strip()):
            continue                                              # not a |---|---| rule
        head = cells(lines[i - 1])
        rows = []
        for row in lines[i + 1:]:
            if not row.strip().startswith("|"):
                break
            assert len(cells(row)) == len(head), f"a row of {len(cells(row))} cells under {head}: {row!r}"
            rows.append(dict(zip(head, cells(row))))
        tables.append(rows)
    return tables


def shows(cell, value):
    """Whether a table cell ("75.0", "**0.9000**" in bold, "12.5%") shows the number `value`,
    rounded to as many decimals as the cell has."""
    text = cell.strip("*% ")
    decimals = len(text.partition(".")[2])
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals * (1 + 1e-9)
