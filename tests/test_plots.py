"""plots.py: Neg Rat on a hand-made map, the attention decomposition, every plot command writing a
picture from tiny LLaMA / RoBERTa / BART checkpoints, and matplotlib staying optional."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import methods
import plots
from checkpoint import load
from conftest import ROOT, tiny_llama_ckpt
from helpers import markdown_tables

PNG = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(not plots.have_matplotlib(), reason="matplotlib is not installed "
                                      "(pip install -r requirements-plots.txt)")


def tiny_encoder_ckpt(path, kind):
    """A tiny RoBERTa or BART checkpoint (transformers) with a byte-level GPT-2 vocabulary."""
    from hf_encdec import byte_vocab_dir, save, tiny_bart
    from transformers import RobertaConfig, RobertaModel
    torch.manual_seed(0)
    if kind == "roberta":
        hf = RobertaModel(RobertaConfig(vocab_size=261, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=130, type_vocab_size=1,
                                        pad_token_id=1))
    else:
        hf = tiny_bart("bart", max_position_embeddings=64)
        hf.resize_token_embeddings(261)
    save(hf, path)
    byte_vocab_dir(path)
    return str(path)


def lmam_adapter(ckpt, out):
    """An LMAM adapter (h_s = 2, n = 8) whose map is not zero (the default initialisation is exactly
    zero): its factors perturbed, then saved."""
    model = load(ckpt)
    methods.apply_method(model, "lmam", lmam_heads=2, lmam_rank=2, lmam_len=8, lmam_scale=1e-2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    methods.save_adapter(model, str(out))
    return str(out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{kind: (checkpoint, LMAM adapter)} for llama, roberta and bart."""
    root = tmp_path_factory.mktemp("plots")
    ckpts = {"llama": tiny_llama_ckpt(root / "llama"), "roberta": tiny_encoder_ckpt(root / "roberta", "roberta"),
             "bart": tiny_encoder_ckpt(root / "bart", "bart")}
    return {k: (c, lmam_adapter(c, root / f"{k}.safetensors")) for k, c in ckpts.items()}


def is_picture(path, kind="png"):
    data = open(path, "rb").read()
    return len(data) > 1000 and (data.startswith(PNG) if kind == "png" else b"<svg" in data[:1000])


# ----------------------------------------------------------------------------- Neg Rat

def test_negative_ratio_on_a_hand_made_map():
    a = torch.tensor([[0.5, -0.1, 0.0],
                      [-0.2, 0.3, -0.4],
                      [0.0, 0.1, -0.3]])
    assert plots.negative_ratio(a) == 4 / 9                      # -0.1, -0.2, -0.4, -0.3; zeros are not negative
    causal = torch.ones(3, 3, dtype=torch.bool).tril()          # seen: 0.5 | -0.2 0.3 | 0.0 0.1 -0.3
    assert plots.negative_ratio(a, causal) == 2 / 6
    assert plots.negative_ratio([[-1.0, 2.0]]) == 0.5            # plain lists too
    with pytest.raises(ValueError, match="selects no entry"):
        plots.negative_ratio(a, torch.zeros(3, 3, dtype=torch.bool))


def test_attention_parts_add_up_to_the_map_at_the_input_positions(checkpoints):
    """softmax + Attn_s = what the layer attends with; the softmax rows sum to 1 over the visible
    keys; Attn_s as applied is LMAM's map at the tokens' positions (head i: map i mod h_s, Eq. 17)."""
    ckpt, adapter = checkpoints["llama"]
    model, tok = plots.load_model(ckpt, adapter)
    ids = torch.tensor(tok.encode("is the sun a star?"))
    T, n = len(ids), 8
    assert T > n                                                # tokens on the map and past it
    softmax, attn_s, total = plots.attention_parts(model, ids, layer=1)
    keep = plots.visible(model, T)
    assert_close(softmax.sum(-1), torch.ones(4, T))
    assert (softmax[:, ~keep] == 0).all()
    lmam = model.layers[1].self_attn.attn_map.attn_map().detach()
    for head in range(4):
        expected = torch.zeros(T, T)
        expected[:n, :n] = lmam[head % 2]                       # positions >= n are off the map (Eq. 14-15)
        assert_close(attn_s[head], expected * keep, atol=1e-5, rtol=1e-5)
    assert_close(total, softmax + attn_s)
    assert 0 < plots.negative_ratio(attn_s[0], keep) < 1
    base, _ = plots.load_model(ckpt)                              # no adapter: Attn_s is 0
    assert plots.attention_parts(base, ids, layer=0)[1].abs().max() == 0


def test_bad_layer_head_and_adapter_errors(checkpoints):
    ckpt, adapter = checkpoints["llama"]
    model, tok = plots.load_model(ckpt, adapter)
    with pytest.raises(ValueError, match=r"--layer 5: this model has 2 self-attention layers"):
        plots.attention_parts(model, torch.tensor([1, 5]), 5)
    if plots.have_matplotlib():
        with pytest.raises(ValueError, match=r"--head 9: this model's layers have 4 attention heads"):
            plots.plot_attention(model, tok, "is the sun a star?", 0, 9, "x.png")
    with pytest.raises(ValueError, match="has no LMAM"):
        plots.learned_maps(plots.load_model(ckpt)[0])
    with pytest.raises(ValueError, match=r"--out x.jpg: expected a file name ending in .png"):
        plots.check_out("x.jpg")


# ----------------------------------------------------------------------------- the commands

@needs_matplotlib
@pytest.mark.parametrize("kind", ["llama", "roberta", "bart"])
def test_attention_and_map_pictures(checkpoints, kind, tmp_path, capsys):
    ckpt, adapter = checkpoints[kind]
    out = tmp_path / "attention.png"
    stats = plots.main(["attention", "--model", ckpt, "--adapter", adapter, "--text", "is the sun a star?",
                        "--layer", "-1", "--head", "1", "--out", str(out), "--dpi", "40"])
    assert is_picture(out)
    printed = capsys.readouterr().out
    assert re.search(r"softmax \+ Attn_s \d+\.\d\d%, Attn_s \d+\.\d\d%", printed)
    assert 0 < stats["neg_attn_s"] < 1 and 0 <= stats["neg_sum"] <= stats["neg_attn_s"]
    svg = tmp_path / "map.svg"
    plots.main(["map", "--model", ckpt, "--adapter", adapter, "--out", str(svg), "--layers", "0,1"])
    assert is_picture(svg, "svg")
    [rows] = [t for t in markdown_tables(capsys.readouterr().out) if t and "Neg Rat" in t[0]]
    assert [(r["layer"], r["map"]) for r in rows] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert all(float(r["max abs(Attn_s)"]) > 0 and 0 < float(r["Neg Rat"].rstrip("%")) < 100 for r in rows), rows


@needs_matplotlib
def test_curves_and_sweep_pictures(tmp_path):
    for run, val in (("a", "val_loss"), ("b", "val_accuracy")):
        d = tmp_path / run
        d.mkdir()
        rows = [{"step": s, "loss": 3 - 0.1 * s, "lr": 1e-4 * (10 - s) / 10, "tokens_per_s": 900.0 + s, "tokens": 64}
                for s in range(1, 11)]
        for r in rows[1::3]:
            r[val] = 2 - 0.05 * r["step"]
        if run == "a":
            for r in rows:
                r["lmam_max_abs"] = [0.01 * r["step"], 0.02 * r["step"]]
        (d / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows + rows[-2:]) + "\n")   # a resumed tail
    plots.main(["curves", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "curves.png"),
                "--dpi", "40"])
    assert is_picture(tmp_path / "curves.png")
    assert [r["step"] for r in plots.read_log(tmp_path / "a")] == list(range(1, 11))
    results = {"study": "sweep", "grid": {"lmam_heads": [1, 2, 4], "lmam_rank": [1, 2]}, "metric": "val_loss",
               "higher_is_better": False,
               "points": [{"name": f"lmam_heads={h}_lmam_rank={r}", "params": {"lmam_heads": h, "lmam_rank": r},
                           "result": 1.0 / (h * r), "metrics": {"val_loss": 1.0 / (h * r)}}
                          for h in (1, 2, 4) for r in (1, 2) if (h, r) != (4, 2)]}            # one point unfinished
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    names, values, z, metric = plots.sweep_grid(results)
    assert names == ["lmam_heads", "lmam_rank"] and z.shape == (3, 2) and z[1, 1] == 0.25 and z[2, 1] != z[2, 1]
    plots.main(["sweep", str(path), "--out", str(tmp_path / "sweep.png"), "--dpi", "40"])
    assert is_picture(tmp_path / "sweep.png")
    with pytest.raises(SystemExit, match="log.jsonl: no such file"):
        plots.main(["curves", str(tmp_path / "nope"), "--out", str(tmp_path / "c.png")])


# ----------------------------------------------------------------------------- matplotlib stays optional

@pytest.mark.slow
def test_without_matplotlib_the_commands_say_how_to_install_it(tmp_path):
    blocked = tmp_path / "blocked" / "matplotlib"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text('raise ImportError("matplotlib is blocked for this test")\n')
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "blocked"))
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                       timeout=120)
    out = run("plots.py", "curves", str(tmp_path), "--out", str(tmp_path / "c.png"))
    assert out.returncode != 0 and "pip install -r requirements-plots.txt" in out.stderr, out.stderr
    assert not (tmp_path / "c.png").exists()
    # the module itself, and Neg Rat, work without it
    out = run("-c", "import plots; print(plots.negative_ratio([[-1.0, 1.0]]), plots.have_matplotlib())")
    assert out.returncode == 0 and out.stdout.split() == ["0.5", "False"], out.stderr


def test_no_other_module_imports_matplotlib():
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != os.path.join(ROOT, "plots.py"):
                if re.search(r"^\s*(import|from)\s+matplotlib", open(path).read(), re.M):
                    offenders.append(os.path.relpath(path, ROOT))
    assert offenders == [], f"matplotlib is an optional extra, imported only in plots.py: {offenders}"
