"""PEFT methods: identity at init, parity with peft, merge, parameter counts, adapter files, bad input."""
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import methods
import model as M
from checkpoint import build, read_safetensors
from conftest import assert_decode_equals_full, ROOT
from helpers import grads_match, pasted_methods, readme_example, readme_examples, tiny
from hf_llama import hf_positions
from quanta import QuanTALinear


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 512, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    return ids, mask


def randomize(model, names):
    """Give the method's zero-initialised tensors random values, so tests see a real update."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(s in n for s in names):
                p.add_(0.1 * torch.randn(p.shape, generator=g))


ALL = list(methods.METHODS)
TINY_OVERRIDES = {"series": dict(adapter_r=8), "parallel": dict(adapter_r=8), "adapter_ffn": dict(adapter_r=8),
                  "mam": dict(prefix_len=3, prefix_mid_dim=16, adapter_r=8), "lora": dict(lora_r=4),
                  "dora": dict(lora_r=4), "prefix": dict(prefix_len=3),
                  "quanta": dict(quanta_dims="4-4-4"), "lmam": dict(lmam_heads=2, lmam_len=6)}
# The methods made of several: their parts, for the tests' formulas (methods.py composes them)
PARTS = {"mam": ("prefix", "adapter_ffn"), "lorada_la": ("lmam", "lora", "adapter_ffn"),
         "lorada_q": ("lmam", "quanta"), "lorada_a": ("lmam", "adapter_ffn"), "lora+lmam": ("lora", "lmam"),
         "dora+lmam": ("dora", "lmam"), "series+lmam": ("series", "lmam"), "parallel+lmam": ("parallel", "lmam"),
         "longlora+lmam": ("longlora", "lmam")}
for _name, _parts in PARTS.items():               # LMAM methods on the 4-head tiny model
    if "lmam" in _parts:
        TINY_OVERRIDES[_name] = dict(TINY_OVERRIDES.get(_name.split("+")[0], {}), lmam_heads=2, lmam_len=6,
                                     **({"quanta_dims": "4-4-4"} if "quanta" in _parts else {}),
                                     **({"adapter_r": 4} if "adapter_ffn" in _parts else {}))


# ----------------------------------------------------------------------------- identity at init

# What each init defines: exactly the base model (zero B, zero W_up, f(T) − f(T0)), the base model up
# to rounding (DoRA's m / ‖W‖), or a change (the bottleneck adapters' N(0, 0.02) init, prefixes).
AT_INIT = {"lora": "exact", "dora": "close", "adapter_ffn": "exact", "quanta": "exact",
           "series": "changed", "parallel": "changed", "prefix": "changed", "mam": "changed"}


@pytest.mark.parametrize("name", list(AT_INIT))
def test_output_at_init(name):
    base, _ = tiny()
    ids, mask = batch()
    with torch.no_grad():
        ref = base(ids, attention_mask=mask)
        out = methods.apply_method(base, name, **TINY_OVERRIDES.get(name, {}))(ids, attention_mask=mask)
    if AT_INIT[name] == "exact":
        assert torch.equal(out, ref)
    elif AT_INIT[name] == "close":
        assert_close(out, ref, atol=1e-6, rtol=1e-6)
    else:
        assert not torch.allclose(out, ref, atol=1e-4)


# ----------------------------------------------------------------------------- parity with peft

def peft_key_to_ours(k):
    k = k.removeprefix("base_model.model.").removeprefix("model.")
    return (k.replace(".lora_A.default.weight", ".lora_A").replace(".lora_B.default.weight", ".lora_B")
             .replace(".lora_magnitude_vector.default.weight", ".magnitude"))


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("variant", ["mha", "gqa"])
def test_lora_and_dora_match_peft(use_dora, variant):
    from peft import LoraConfig, get_peft_model
    ours, hf = tiny(variant)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_dora=use_dora))
    methods.apply_method(ours, "dora" if use_dora else "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         target_modules=",".join(targets))
    g = torch.Generator().manual_seed(5)
    theirs = {peft_key_to_ours(n): p for n, p in pm.named_parameters() if p.requires_grad}
    mine = dict(ours.named_parameters())
    assert set(theirs) == {n for n, p in mine.items() if p.requires_grad}
    with torch.no_grad():
        for k, p in theirs.items():          # the same non-trivial values in both
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            mine[k].copy_(p)
    ids, mask = batch()
    ref = pm(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
    out = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    w = torch.randn(out[real].shape, generator=g)
    (ref[real] * w).sum().backward()
    (out[real] * w).sum().backward()
    grads_match(theirs, mine)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_matches_peft(projection):
    from peft import PrefixTuningConfig, get_peft_model
    ours, hf = tiny("mha")
    cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection,
                             encoder_hidden_size=32)
    pm = get_peft_model(hf, cfg)
    methods.apply_method(ours, "prefix", prefix_len=5, prefix_mid_dim=32 if projection else 0)
    enc = pm.prompt_encoder["default"]
    names = {"embedding.weight": "prefix_encoder.prefix_embedding.weight",
             "transform.0.weight": "prefix_encoder.prefix_mlp.0.weight", "transform.0.bias": "prefix_encoder.prefix_mlp.0.bias",
             "transform.2.weight": "prefix_encoder.prefix_mlp.2.weight", "transform.2.bias": "prefix_encoder.prefix_mlp.2.bias"}
    theirs = dict(enc.named_parameters())
    mine = dict(ours.named_parameters())
    assert {names[k] for k in theirs} == {n for n, p in mine.items() if p.requires_grad}
    with torch.no_grad():
        for k, p in theirs.items():
            mine[names[k]].copy_(p)
    # peft ignores position_ids for prefix tuning: transformers then numbers the tokens from l
    # (after the prefix "cache"), with padding counted. This project keeps token positions from 0,
    # as He et al.'s code does; here we give ours peft's positions to compare the mechanics exactly.
    ids, mask = batch()
    ids, mask = ids[:1], mask[:1]
    ref = pm(input_ids=ids, attention_mask=mask).logits
    out = ours(ids, attention_mask=mask, positions=torch.arange(5, 5 + ids.shape[1])[None])
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    grads_match(theirs, mine, key=names.get)


def test_prefix_with_kv_cache_decoding_equals_full_forward():
    ours, _ = tiny("gqa")
    methods.apply_method(ours, "prefix", prefix_len=3)
    randomize(ours, ["prefix_"])
    ids, mask = batch()
    assert_decode_equals_full(ours, ids, mask, prefill=5)


# ----------------------------------------------------------------------------- merge, QuanTA

@pytest.mark.parametrize("name", ["lora", "dora", "quanta"])
def test_merged_equals_unmerged(name):
    ours, _ = tiny("gqa")
    methods.apply_method(ours, name, **TINY_OVERRIDES.get(name, {}))
    randomize(ours, ["lora_", "magnitude", "quanta_T."])
    ids, mask = batch()
    before = [m.weight.clone() for m in ours.modules() if hasattr(m, "merge")]
    with torch.no_grad():
        ref = ours(ids, attention_mask=mask)
        for m in ours.modules():
            if hasattr(m, "merge"):
                m.merge()
        merged = ours(ids, attention_mask=mask)
        for m in ours.modules():
            if hasattr(m, "unmerge"):
                m.unmerge()
    assert_close(merged, ref, atol=1e-5, rtol=1e-5)
    after = [m.weight for m in ours.modules() if hasattr(m, "merge")]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, after))


def test_quanta_equals_the_reference_einsum_and_its_dense_matrix():
    dims = [4, 3, 3, 2]
    layer = QuanTALinear(torch.nn.Linear(72, 72, bias=False), dims)
    with torch.no_grad():
        layer.weight.zero_()
        for i in range(len(layer.quanta_T)):     # T0 := 0, so the layer computes f(T) x exactly
            getattr(layer, f"quanta_T0_{i}").zero_()
    Ts = list(layer.quanta_T)       # pairs (2,3), (1,3), (0,3), (1,2), (0,2), (0,1)
    x = torch.randn(5, 72)
    # QuanTA's own einsum for N = 4 (quanta.py of quanta-fine-tuning, train path)
    ref = torch.einsum("zabcd,ghcd,flbh,epal,jkfg,ioek,mnij->zmnop", x.view(5, *dims), *Ts).reshape(5, 72)
    with torch.no_grad():
        assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
        dense = torch.einsum("ghcd,flbh,epal,jkfg,ioek,mnij->mnopabcd", *Ts).reshape(72, 72)   # (out, in)
        assert_close(layer.delta_weight(), dense, atol=1e-5, rtol=1e-5)


def test_quanta_update_is_exactly_zero_at_init():
    layer = QuanTALinear(torch.nn.Linear(64, 32, bias=True), [4, 4, 4])     # output cropped to 32
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))   # the base layer's product
    assert torch.equal(layer.delta_weight(), torch.zeros(32, 64))


# ----------------------------------------------------------------------------- parameter counts

def closed_form(name, c, hp):
    """Each method's parameter count from its formula (docstrings of lora.py, adapters.py, quanta.py)."""
    if name != "mam" and name in PARTS:                   # LoRaDA variants and plug-in pairs: the sum
        return sum(closed_form(p, c, hp) for p in PARTS[name])
    if name == "longlora":                                # LoRA r=8 on q,k,v,o + embeddings ([PAD]: +1 row) + norms
        return closed_form("lora", c, hp) + c.vocab_size * c.dim + (2 * c.n_layers + 1) * c.dim   # (V counts [PAD])
    if name == "lmam" and hp["lmam_variant"] == "full_rank":   # FMAM: the (h, n, n) map of every head
        return c.n_layers * c.n_heads * hp["lmam_len"] ** 2
    if name == "lmam":                                    # Wa (h_s, n, r) + Wb (h_s, r, n) per layer
        return c.n_layers * 2 * hp["lmam_heads"] * hp["lmam_len"] * hp["lmam_rank"]
    d, f, L, kv = c.dim, c.hidden_dim, c.n_layers, c.n_kv_heads * c.head_dim
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}        # (in, out)
    targets = hp.get("target_modules", "").split(",")
    if name in ("lora", "dora"):
        per = sum(hp["lora_r"] * sum(shapes[t]) + (shapes[t][1] if name == "dora" else 0) for t in targets)
    elif name in ("adalora", "sora"):                     # adaptive.py: P, Λ, Q / A, g, B: r·(in + out + 1)
        r = hp["adalora_init_r"] if name == "adalora" else hp["lora_r"]
        per = sum(r * (sum(shapes[t]) + 1) for t in targets)
    elif name == "quanta":
        dims = [int(x) for x in hp["quanta_dims"].split("-")]
        per = len(targets) * sum((dims[a] * dims[b]) ** 2 for a in range(len(dims)) for b in range(a + 1, len(dims)))
    elif name in ("series", "parallel"):
        io = lambda t: ((shapes[t][0],) * 2 if t in ("gate_proj", "up_proj") else (shapes[t][1],) * 2) \
            if name == "series" else shapes[t]
        per = sum(hp["adapter_r"] * sum(io(t)) for t in targets)
    elif name == "adapter_ffn":
        per = 2 * d * hp["adapter_r"] + hp["adapter_r"] + d
    elif name == "prefix":
        return hp["prefix_len"] * L * 2 * kv
    elif name == "mam":
        l, mid, r = hp["prefix_len"], hp["prefix_mid_dim"], hp["adapter_r"]
        return l * d + d * mid + mid + mid * L * 2 * kv + L * 2 * kv + L * (2 * d * r + r + d)
    elif name == "full":
        return None
    elif name == "bitfit":
        return 0
    return per * L


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("preset", ["llama-7b", "llama2-70b", "llama3-8b", "llama-13b"])
def test_parameter_counts_match_the_formula(name, preset):
    m = build(preset)
    total = sum(p.numel() for p in m.parameters())
    with pytest.warns(UserWarning) if name == "bitfit" else _nothing():
        methods.apply_method(m, name)
    trainable, everything = methods.count_parameters(m)
    expected = closed_form(name, m.cfg, m.peft_method["hparams"])
    if name == "full":
        assert trainable == total == everything
    elif name.startswith("longlora"):                   # the embeddings were counted; [PAD] adds a row to them and the head
        assert trainable == expected
        assert everything == total + expected - m.cfg.vocab_size * m.cfg.dim - (2 * m.cfg.n_layers + 1) * m.cfg.dim \
            + 2 * m.cfg.dim
    else:
        assert trainable == expected
        assert everything == total + expected
    # only the method's own parameters train
    markers = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "magnitude"), "quanta": ("quanta_T",),
               "series": ("adapter_",), "parallel": ("adapter_",), "adapter_ffn": ("adapter_",),
               "prefix": ("prefix_",), "mam": ("prefix_", "adapter_"), "adalora": ("lora_A", "lora_E", "lora_B"),
               "sora": ("lora_A", "lora_gate", "lora_B"), "longlora": ("lora_A", "lora_B", "embed", "norm")}.get(name)
    if markers:
        for n, p in m.named_parameters():
            assert p.requires_grad == any(s in n for s in markers), n


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


PAPER = [  # (model, method, flags, the paper's # Params (%))
    ("llama-7b", "lora", [], 0.83), ("llama-7b", "lora", ["--lora_r", "4"], 0.10),
    ("llama-7b", "quanta", [], 0.041), ("llama-13b", "quanta", [], 0.029),
    ("llama-7b", "series", [], 0.99), ("llama-7b", "parallel", [], 3.54),
    ("llama-13b", "series", [], 0.80), ("llama-13b", "parallel", [], 2.89), ("llama-7b", "dora", [], 0.84),
]


@pytest.mark.slow
def test_dry_run_reproduces_the_papers_percentages():
    for preset, name, flags, pct in PAPER:
        out = subprocess.run([sys.executable, "train.py", "--model", preset, "--method", name, "--dry-run", *flags],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        line = out.stdout.strip().splitlines()[-1]
        assert line.startswith("trainable params: ") and " || all params: " in line
        got = float(line.rsplit(" ", 1)[1])
        digits = len(str(pct).split(".")[1])
        assert round(got, digits) == pct, (preset, name, flags, line)


# ----------------------------------------------------------------------------- adapter files

@pytest.mark.parametrize("name", ALL)
def test_adapter_file_roundtrip(tmp_path, name):
    ours, _ = tiny("gqa")
    with pytest.warns(UserWarning) if name == "bitfit" else _nothing():
        methods.apply_method(ours, name, **TINY_OVERRIDES.get(name, {}))
    randomize(ours, ["lora_", "magnitude", "quanta_T.", "adapter_", "prefix_", ".wa", ".wb"])
    ids, mask = batch()
    with torch.no_grad():
        ref = ours(ids, attention_mask=mask)
    path = str(tmp_path / ("adapter" + methods.ADAPTER_EXT))
    methods.save_adapter(ours, path)
    fresh, _ = tiny("gqa")
    with pytest.warns(UserWarning) if name == "bitfit" else _nothing():
        methods.load_adapter(fresh, path)
    assert fresh.peft_method == ours.peft_method
    with torch.no_grad():
        assert torch.equal(fresh(ids, attention_mask=mask), ref)


def test_adapter_file_holds_only_the_methods_tensors(tmp_path):
    ours, _ = tiny()
    methods.apply_method(ours, "lora", lora_r=2, target_modules="q_proj")
    path = str(tmp_path / "a.safetensors")
    methods.save_adapter(ours, path)
    assert sorted(read_safetensors(path)) == [f"layers.{i}.self_attn.q_proj.lora_{x}" for i in range(2) for x in "AB"]


def test_adapter_on_the_wrong_base_or_method(tmp_path):
    ours, _ = tiny("mha")
    methods.apply_method(ours, "lora", lora_r=2)
    path = str(tmp_path / "a.safetensors")
    methods.save_adapter(ours, path)
    other_shape, _ = tiny("gqa")
    with pytest.raises(ValueError, match="n_kv_heads=4, this model has 2"):
        methods.load_adapter(other_shape, path)
    other_weights, _ = tiny("mha", seed=1)
    with pytest.raises(ValueError, match="different base model"):
        methods.load_adapter(other_weights, path)
    same, _ = tiny("mha")
    methods.apply_method(same, "dora", lora_r=2)
    with pytest.raises(ValueError, match="holds method 'lora'.*has 'dora'"):
        methods.load_adapter(same, path)


# ----------------------------------------------------------------------------- bad input

def test_bad_input_errors():
    m, _ = tiny()
    with pytest.raises(ValueError, match="unknown method 'lorra'; valid methods: full, bitfit, prefix"):
        methods.apply_method(m, "lorra")
    with pytest.raises(ValueError, match="LoRA rank must be positive, got lora_r=0"):
        methods.apply_method(m, "lora", lora_r=0)
    with pytest.raises(ValueError, match="adapter rank must be positive, got adapter_r=0"):
        methods.apply_method(m, "adapter_ffn", adapter_r=0)
    with pytest.raises(ValueError, match="prefix length must be positive, got prefix_len=-1"):
        methods.apply_method(m, "prefix", prefix_len=-1)
    with pytest.raises(ValueError, match="QuanTA dims 4-4-8 multiply to 128, but the layer's input width is 64"):
        methods.apply_method(m, "quanta", quanta_dims="4-4-8")
    with pytest.raises(ValueError, match="target module 'query' does not exist.*q_proj"):
        methods.apply_method(m, "lora", target_modules="q_proj,query")
    with pytest.raises(ValueError, match="method 'lora' has no hyperparameter 'adapter_r'"):
        methods.apply_method(m, "lora", adapter_r=4)
    m2, _ = tiny()
    methods.apply_method(m2, "lora")
    with pytest.raises(ValueError, match="already has method 'lora'"):
        methods.apply_method(m2, "dora")


@pytest.mark.slow
def test_train_cli_reports_bad_names():
    for args, msg in ((["--model", "llama-8b"], "llama-8b: no such checkpoint"),
                      (["--method", "lorra"], "valid methods: full")):
        out = subprocess.run([sys.executable, "train.py", *args, "--dry-run"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode != 0 and msg in out.stderr, out.stderr


# ----------------------------------------------------------------------------- the README's example

def learns(m, ids, mask, steps=5):
    """Whether five AdamW steps (lr 1e-2) on the next-token loss of one batch lower that loss."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        logits = m(ids, attention_mask=mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses[-1] < losses[0]


def test_readme_example(tmp_path):
    """README, "Add your own method": the (IA)³ example, pasted into methods.py as written, is a
    working method: registered, the base model at the start, its count, only its vector trains, it
    learns, and save_adapter / load_adapter store it."""
    methods = pasted_methods(readme_example())       # noqa: F811  (this test's methods.py: the pasted one)
    assert "ia3" in methods.METHODS and "target_modules" in methods.hyperparameters(methods.METHODS["ia3"])
    base, _ = tiny("gqa")
    ids, mask = batch()
    with torch.no_grad():
        ref = base(ids, attention_mask=mask)
    m = methods.apply_method(base, "ia3", target_modules="k_proj,v_proj")
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert sorted(trainable) == sorted(f"layers.{i}.self_attn.{p}.ia3_l" for i in range(2) for p in ("k_proj", "v_proj"))
    assert methods.count_parameters(m)[0] == 2 * 2 * m.cfg.n_kv_heads * m.cfg.head_dim      # out_features each
    with torch.no_grad():
        assert torch.equal(m(ids, attention_mask=mask), ref)
    assert learns(m, ids, mask)
    methods.save_adapter(m, str(tmp_path / "ia3.safetensors"))
    fresh, _ = tiny("gqa")
    methods.load_adapter(fresh, str(tmp_path / "ia3.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids, attention_mask=mask), m.eval()(ids, attention_mask=mask))


def test_readme_example_that_trains_base_weights(tmp_path):
    """README, "Add your own method", the second block (LoRA with every norm trainable), pasted into
    methods.py as written: nothing declares that it trains base weights, applying it finds out
    (trains_base, which keeps them in fp32 under bf16); LoRA's tensors and the norms train, nothing
    else; it learns, its adapter file holds the norms, and peft export refuses it, saying why."""
    import export
    methods = pasted_methods("\n\n".join(readme_examples()))      # noqa: F811
    assert methods.trains_base("lora_norms") and not methods.trains_base("ia3")
    assert methods.anatomy("lora_norms")["attached"] == {methods.LoRALinear}
    m = methods.apply_method(tiny("gqa")[0], "lora_norms", lora_r=2)
    norms = [n for n, _ in m.named_parameters() if n.endswith("norm.weight")]
    lora = [f"layers.{i}.self_attn.{p}.lora_{x}" for i in range(2) for p in ("q_proj", "v_proj") for x in "AB"]
    assert len(norms) == 5 and sorted(methods.trained_base(m)) == sorted(norms)
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == sorted(norms + lora)
    ids, mask = batch()
    before = {n: p.detach().clone() for n, p in m.named_parameters() if n in norms}
    assert learns(m.train(), ids, mask)
    assert all(not torch.equal(before[n], dict(m.named_parameters())[n]) for n in norms)
    methods.save_adapter(m, str(tmp_path / "a.safetensors"))
    assert sorted(read_safetensors(str(tmp_path / "a.safetensors"))) == sorted(norms + lora)
    with pytest.raises(ValueError, match="'lora_norms' has no peft format.*base weights: it trains 5 of the base "
                                         "model's own tensors"):
        export.export_peft(m, str(tmp_path / "peft"))


def test_what_a_method_is_made_of_is_found_by_applying_it():
    """anatomy: the modules each method attaches and whether it trains base weights, found on
    weightless twins, as the methods' docstrings say."""
    from adapters import AdapterFFN, BottleneckLinear, HoulsbyAdapter, PrefixEncoder
    from lmam import LMAM
    from lora import DoRALinear, LoRALinear
    attached = {name: methods.anatomy(name)["attached"] for name in methods.METHODS}
    assert attached["lorada_la"] == {LMAM, LoRALinear, AdapterFFN}
    assert attached["lorada_q"] == {LMAM, QuanTALinear} and attached["mam"] == {PrefixEncoder, AdapterFFN}
    assert attached["series"] == {BottleneckLinear, HoulsbyAdapter}        # LLaMA's; He et al.'s on the encoders
    assert attached["dora+lmam"] == {DoRALinear, LMAM} and attached["full"] == attached["bitfit"] == set()
    assert [n for n in methods.METHODS if methods.trains_base(n)] == ["full", "bitfit", "longlora", "longlora+lmam"]
    assert all(b.endswith("bias") for b in methods.anatomy("bitfit")["base"])
    assert methods.anatomy("quanta")["models"] == ["llama-7b"]              # 16-8-8-4 fits d = 4096 only


# ----------------------------------------------------------------------------- where each value comes from

def test_every_value_has_one_source():
    """method_hparams / train_hparams are the values of the *_sources functions, each value with the
    row it came from; every presets.py row cites its source."""
    from presets import METHOD_PRESETS, TRAIN_PRESETS
    assert all(k in METHOD_PRESETS.source for k in METHOD_PRESETS) and all(k in TRAIN_PRESETS.source for k in TRAIN_PRESETS)
    src = methods.method_hparam_sources("lorada_la", ("llama", "llama3-8b"), {"lmam_len": 64})
    assert src["lora_r"] == (2, "presets.py METHOD_PRESETS[('lorada_la', 'llama3-8b')] (Table 19)")
    assert src["lmam_len"] == (64, "command line") and src["lmam_rank"] == (2, "methods.py lmam()")
    assert src["adapter_dropout"] == (0.0, "methods.py lorada_la()")
    assert {k: v for k, (v, _) in src.items()} == methods.method_hparams("lorada_la", ("llama", "llama3-8b"),
                                                                        {"lmam_len": 64})
    tr = methods.train_hparam_sources("lorada_la", "llama-13b", "llm", "commonsense", {"micro_batch_size": 8})
    assert tr["batch_size"] == (3, "presets.py TRAIN_PRESETS[('lorada_la', 'llama-13b')] (Table 19)")
    assert tr["learning_rate"] == (1e-4, "presets.py TRAIN_PRESETS[('lorada_la', 'llm')] (Table 19)")
    assert tr["micro_batch_size"][0] == 3 and tr["seed"][1].startswith("presets.py TRAIN_DEFAULTS")


def test_dry_run_prints_each_value_and_its_row(capsys):
    """--dry_run prints every method and training value with where it comes from, the values the
    method is applied with; without --task, LLaMA's task follows --data, as in a real run (prefix
    tuning: l=30 on commonsense, LLM-Adapters' default, 0.1166% of LLaMA-7B; l=10 on math)."""
    import train
    rows = lambda out: {line.split()[0]: line.split(None, 2)[1:] for line in out.splitlines() if line.startswith("  ")}
    train.main(["--model", "llama-7b", "--method", "prefix", "--dry_run"])
    out = capsys.readouterr().out
    assert rows(out)["prefix_len"] == ["30", "presets.py METHOD_PRESETS[('prefix', 'commonsense')] "
                                             "(LLM-Adapters' finetune.py default (Table 4))"]
    assert rows(out)["learning_rate"] == ["0.03", "presets.py TRAIN_PRESETS[('prefix', 'llm')] (LLM-Adapters' "
                                                  "math command)"]
    assert "trainable params: 7,864,320 ||" in out
    train.main(["--model", "llama-7b", "--method", "prefix", "--data", "math_10k", "--dry_run"])
    assert rows(capsys.readouterr().out)["prefix_len"] == ["10", "methods.py prefix()"]
    train.main(["--model", "roberta-base", "--method", "lorada_a", "--task", "rte", "--preset", "table5-0.06",
                "--lmam_rank", "2", "--batch_size", "8", "--dry_run"])
    got = rows(capsys.readouterr().out)
    assert got["lmam_heads"] == ["1", "presets.py NAMED_PRESETS['table5-0.06']"]
    assert got["lmam_rank"] == ["2", "command line"] and got["batch_size"] == ["8", "command line"]
    assert got["lmam_len"] == ["512", "presets.py METHOD_PRESETS[('lorada_a', 'rte')] (Table 16, n per GLUE task)"]
    assert got["learning_rate"] == ["0.0007", "presets.py TRAIN_PRESETS[('lorada_a', 'rte')] (Table 16)"]
    assert got["micro_batch_size"] == ["8", "batch_size (a micro-batch is at most a batch)"]


def test_a_new_hyperparameter_gets_a_help_line(monkeypatch, capsys):
    """A method's hyperparameter that METHOD_HELP does not know gets its flag and a help line from the
    signature; no list is edited."""
    import train

    def scaled_lora(model, lora_r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules="q_proj", lora_scale_b=0.5):
        methods.lora(model, lora_r, lora_alpha, lora_dropout, target_modules)
    monkeypatch.setitem(methods.METHODS, "scaled_lora", scaled_lora)
    assert train.method_flag_help("lora_scale_b") == "hyperparameter of scaled_lora (default 0.5) (methods.py)"
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "--lora_scale_b LORA_SCALE_B" in capsys.readouterr().out
    assert train.parse_args(["--method", "scaled_lora", "--lora_scale_b", "2"]).lora_scale_b == 2.0
