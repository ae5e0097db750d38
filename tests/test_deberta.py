"""DeBERTa-v2/v3 (Table 11): parity with transformers (logits, hidden states, parameter count), the
tokenizer, bad checkpoints, every method's count and identity at init, LMAM in the disentangled
attention against the written-out Eq. 12-13, the GLUE pipeline and the Table 11 layout."""
import glob
import os

import pytest
import torch
from torch.testing import assert_close

import eval as E
import methods
import model as M
import train as T
from checkpoint import CheckpointError, build, load, read_safetensors, write_safetensors
from conftest import SHARED
from helpers import markdown_tables, shows
from hf_deberta import (SENTENCES, batch, deberta_ckpt, deberta_v3_base_meta, edit_config, save, tiny_deberta,
                        train_deberta_spm)
from lmam import LMAM
from tokenizer import DebertaTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save(tiny_deberta(), tmp_path_factory.mktemp("deberta") / "ckpt")


# ----------------------------------------------------------------------------- the model

@pytest.mark.parametrize("variant", ["v3", "no_buckets_token_types", "regression"])
def test_logits_match_transformers(tmp_path, variant):
    """Log buckets (v3's layout); plain clamped distances with a token-type embedding; STS-B's
    one-output head. Padded rows of 9 and 5 of 13 tokens."""
    extra = {"v3": {}, "regression": dict(num_labels=1),
             "no_buckets_token_types": dict(position_buckets=-1, max_relative_positions=4, type_vocab_size=2)}[variant]
    hf = tiny_deberta(**extra)
    ours = load(save(hf, tmp_path / "d"))
    assert isinstance(ours, M.Deberta) and ours.cfg.num_labels == hf.config.num_labels
    ids, mask = batch()
    types = (torch.arange(13) >= 7).long().expand(3, 13) if variant == "no_buckets_token_types" else None
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True)
        out = ours(ids, mask, token_type_ids=types)
        assert_close(out, ref.logits, atol=1e-5, rtol=1e-5)
        hidden = hf.deberta(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        mine, probs = ours.encode(ids, mask, need_weights=True, token_type_ids=types)
        assert_close(mine[mask.bool()], hidden[mask.bool()], atol=1e-5, rtol=1e-5)
        for p, r in zip(probs, ref.attentions):            # the real queries' attention rows
            assert_close(p.transpose(1, 2)[mask.bool()], r.transpose(1, 2)[mask.bool()], atol=1e-5, rtol=1e-5)
    assert ref.logits.std() > 1e-3


def test_parameter_count_and_preset_equal_transformers():
    ours = build("deberta-v3-base")
    assert isinstance(ours, M.Deberta) and ours.cfg.name == "deberta-v3-base"
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in deberta_v3_base_meta().parameters())
    assert M.preset_name(M.DebertaConfig(num_labels=2)) == "deberta-v3-base"


def test_padding_and_fresh_head(tmp_path):
    """A row's states do not depend on the padding after it (relative positions are differences);
    an encoder checkpoint has no head until num_labels asks for a fresh one."""
    from transformers import DebertaV2Model
    hf = tiny_deberta()
    DebertaV2Model(hf.config).save_pretrained(tmp_path / "enc")
    bare = load(str(tmp_path / "enc"))
    assert bare.head is None
    with pytest.raises(ValueError, match="num_labels"):
        bare(*batch())
    ids, mask = batch()
    with torch.no_grad():
        assert_close(bare.encode(ids, mask)[2:3, :5], bare.encode(ids[2:3, :5]), atol=1e-5, rtol=1e-5)
    m = load(str(tmp_path / "enc"), num_labels=2)
    assert m.head.out_proj.weight.shape == (2, 32) and m.head.out_proj.bias.abs().sum() == 0


def test_bad_checkpoints_name_the_file_and_the_key(tmp_path):
    path = save(tiny_deberta(), tmp_path / "d")
    file = os.path.join(path, "config.json")
    cases = [(dict(model_type="deberta"), "model_type 'deberta' is DeBERTa v1"),
             (dict(pos_att_type="c2p"), "pos_att_type 'c2p' is not supported"),
             (dict(pos_att_type=None), "pos_att_type None is not supported"),
             (dict(relative_attention=False), "relative_attention=False is not supported"),
             (dict(share_att_key=False), "share_att_key=False is not supported"),
             (dict(position_biased_input=True), "position_biased_input=True is not supported"),
             (dict(norm_rel_ebd="none"), "norm_rel_ebd='none' is not supported"),
             (dict(conv_kernel_size=3), "conv_kernel_size=3 is not supported"),
             (dict(embedding_size=16), "embedding_size=16 is not supported"),
             (dict(hidden_act="swish"), "hidden_act 'swish' is not supported"),
             (dict(num_attention_heads=None), "missing key 'num_attention_heads'")]
    original = open(file).read()
    for change, message in cases:
        edit_config(path, **change)
        with pytest.raises(CheckpointError, match=f"^{file}: {message}".replace("(", r"\(").replace(")", r"\)")):
            load(path)
        open(file, "w").write(original)
    with pytest.raises(CheckpointError, match="3 labels, num_labels=2"):
        load(path, num_labels=2)
    weights = os.path.join(path, "model.safetensors")
    tensors = read_safetensors(weights)
    write_safetensors({**tensors, "deberta.encoder.layer.0.attention.self.pos_key_proj.weight": torch.zeros(32, 32)},
                      weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor "
                                              r"'deberta\.encoder\.layer\.0\.attention\.self\.pos_key_proj\.weight'"):
        load(path)
    write_safetensors({k: v for k, v in tensors.items() if k != "deberta.encoder.rel_embeddings.weight"}, weights)
    with pytest.raises(CheckpointError, match=r"missing tensor 'rel_embeddings\.weight' \(expected shape \(16, 32\)\)"):
        load(path)


# ----------------------------------------------------------------------------- the tokenizer

def test_tokenizer_matches_transformers(tmp_path):
    """Ids, pairs with token types and longest-first truncation equal transformers'
    DebertaV2Tokenizer on an spm.model trained here (GLUE sentences when ../shared/data has them)."""
    import random
    from transformers import DebertaV2Tokenizer
    lines = list(SENTENCES)
    for f in sorted(glob.glob(os.path.join(SHARED, "glue", "*", "*.tsv")))[:6]:
        lines += [l.split("\t")[-1] for l in open(f, encoding="utf-8").read().splitlines()[1:120]]
    vocab = 400 if len(lines) > len(SENTENCES) else 100        # the built-in sentences alone hold ~110 pieces
    path = train_deberta_spm(lines * 3, tmp_path / "tok", vocab_size=vocab)
    ours, ref = load_tokenizer(path), DebertaV2Tokenizer.from_pretrained(path)
    assert isinstance(ours, DebertaTokenizer)
    assert (ours.pad_id, ours.cls_id, ours.sep_id, ours.unk_id, ours.mask_id) == \
        (ref.pad_token_id, ref.cls_token_id, ref.sep_token_id, ref.unk_token_id, ref.mask_token_id) == (0, 1, 2, 3, vocab)
    tricky = ["", "   ", "  two  spaces\tand a tab\nnewline ", "ﬁ ligature, Ｆｕｌｌ width", "ÜÜÜ unknowns fuse",
              "x\u00a0y", "e\u0301 combines under NFC", "trailing \u3000", " leading"]
    for text in lines + tricky:
        assert ours.encode(text) == ref(text)["input_ids"], text
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.choice(lines), rng.choice(lines + [""])
        n = rng.choice([None, 6, 9, 17, 40])
        r = ref(a, b or None, **(dict(truncation="longest_first", max_length=n) if n else {}))
        assert ours.encode_pair(a, b, n, token_types=True) == (r["input_ids"], r["token_type_ids"]), (a, b, n)
    assert ours.decode(ours.encode("The film was a joy.")) == "The film was a joy."


# ----------------------------------------------------------------------------- the methods

def closed_form(name, m, hp):
    """Trainable parameters of each method on DeBERTa from its formula (the docstrings of lora.py,
    adapters.py, lmam.py, quanta.py, adaptive.py), plus the GLUE head, which always trains."""
    c = m.cfg
    d, f, L, hd = c.dim, c.hidden_dim, c.n_layers, c.head_dim
    head = d * d + d + d * c.num_labels + c.num_labels
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "out_proj": (d, d), "fc1": (d, f), "fc2": (f, d)}
    targets = hp.get("target_modules", "").split(",")
    r = hp.get("adapter_r")
    if name in ("lorada_a", "lora+lmam", "dora+lmam", "series+lmam"):
        first = {"lorada_a": "adapter_ffn"}.get(name, name.split("+")[0])
        return closed_form("lmam", m, hp) + closed_form(first, m, hp) - head
    if name == "lmam":
        return L * 2 * hp["lmam_heads"] * hp["lmam_len"] * hp["lmam_rank"] + head
    if name in ("lora", "dora"):
        return L * sum(hp["lora_r"] * sum(shapes[t]) + (shapes[t][1] if name == "dora" else 0) for t in targets) + head
    if name in ("adalora", "sora"):                   # P, Λ, Q / A, g, B: r·(in + out + 1)
        rank = hp["adalora_init_r"] if name == "adalora" else hp["lora_r"]
        return L * sum(rank * (sum(shapes[t]) + 1) for t in targets) + head
    if name == "quanta":
        dims = [int(x) for x in hp["quanta_dims"].split("-")]
        return L * len(targets) * sum((dims[a] * dims[b]) ** 2 for a in range(len(dims))
                                      for b in range(a + 1, len(dims))) + head
    if name == "series":                              # Houlsby after out_proj (with a LayerNorm) and fc2
        return L * ((2 * d * r + r + d + 2 * d) + (2 * d * r + r + d)) + head
    if name == "adapter_ffn":
        return L * (2 * d * r + r + d) + head
    if name in ("prefix", "mam"):
        l, mid = hp["prefix_len"], hp["prefix_mid_dim"]
        pre = l * d + d * mid + mid + mid * L * 2 * c.n_heads * hd + L * 2 * c.n_heads * hd
        return pre + (closed_form("adapter_ffn", m, hp) - head if name == "mam" else 0) + head
    raise KeyError(name)


COUNTED = ["lora", "dora", "series", "adapter_ffn", "prefix", "mam", "lmam", "lorada_a", "lora+lmam", "dora+lmam",
           "series+lmam", "adalora", "sora", "quanta"]


@pytest.mark.parametrize("name", COUNTED)
def test_parameter_counts_match_the_formula(name):
    m = build("deberta-v3-base")
    total = sum(p.numel() for p in m.parameters())
    methods.apply_method(m, name, **({"quanta_dims": "16-8-6", "target_modules": "q_proj,v_proj"}
                                     if name == "quanta" else {}))
    trainable, everything = methods.count_parameters(m)
    head = sum(p.numel() for n, p in m.named_parameters() if n.startswith("head."))
    assert trainable == closed_form(name, m, m.peft_method["hparams"])
    assert everything == total + trainable - head


def test_bitfit_and_full_against_transformers():
    ref = deberta_v3_base_meta()
    m = methods.apply_method(build("deberta-v3-base"), "bitfit")
    biases = sum(p.numel() for n, p in ref.named_parameters() if "bias" in n)
    head_weights = sum(p.numel() for n, p in ref.named_parameters()
                       if n.startswith(("pooler.", "classifier.")) and "bias" not in n)
    assert methods.count_parameters(m)[0] == biases + head_weights
    full = methods.apply_method(build("deberta-v3-base"), "full")
    assert methods.count_parameters(full)[0] == sum(p.numel() for p in ref.parameters())


def test_lorada_a_params_against_table_11(capsys):
    """LoRaDA-A on DeBERTaV3-base with A.5's settings (Table 16, LMAM rank 2): LMAM 2·h_s·n·r per
    layer + Adapter-FFN r = 16, without the GLUE head. Table 11 prints 0.29M, which no reading of
    the supplement reaches: the adapter alone has 304,320 parameters."""
    adapter = 12 * (2 * 768 * 16 + 16 + 768)
    for task, n in ((None, 512), ("cola", 512), ("mrpc", 256)):
        m = methods.apply_method(build("deberta-v3-base"), "lorada_a", task=task)
        hp = m.peft_method["hparams"]
        assert (hp["lmam_heads"], hp["lmam_rank"], hp["lmam_len"], hp["lmam_scale"]) == (3, 2, n, 1 / 255)
        added = sum(p.numel() for k, p in m.named_parameters() if p.requires_grad and not k.startswith("head."))
        assert added == 12 * 2 * 3 * n * 2 + adapter
        print(f"LoRaDA-A on deberta-v3-base, task {task}: # Params {added:,d} ({added / 1e6:.2f}M); Table 11: 0.29M")
    assert adapter == 304_320 and 12 * 2 * 3 * 512 * 2 + adapter == 378_048
    assert "378,048 (0.38M)" in capsys.readouterr().out


# What each init defines on DeBERTa: exactly the base model (LoRA's, AdaLoRA's Λ = 0, SoRA's B = 0,
# Adapter-FFN's W_up = 0, LMAM's Attn_s ≡ 0, QuanTA's f(T) − f(T0)), the base model up to rounding
# (DoRA's m / ‖W‖), or a change (the Houlsby adapter's N(0, 0.02) init, prefixes).
AT_INIT = {"lora": "exact", "adalora": "exact", "sora": "exact", "adapter_ffn": "exact", "lmam": "exact",
           "lorada_a": "exact", "quanta": "exact", "lora+lmam": "exact", "bitfit": "exact", "full": "exact",
           "dora": "close", "dora+lmam": "close", "series": "changed", "prefix": "changed", "mam": "changed",
           "series+lmam": "changed"}
TINY = dict(lmam_heads=2, lmam_len=8, adapter_r=4, prefix_len=3, prefix_mid_dim=8, lora_r=4, quanta_dims="4-8",
            adalora_init_r=4)


@pytest.mark.parametrize("name", list(AT_INIT))
def test_every_method_attaches_and_starts_as_defined(tiny_path, name):
    base = load(tiny_path)
    ids, mask = batch()
    takes = methods.hyperparameters(methods.METHODS[name])
    m = methods.apply_method(load(tiny_path), name, **{k: v for k, v in TINY.items() if k in takes})
    with torch.no_grad():
        ref, out = base(ids, mask), m(ids, mask)
    if AT_INIT[name] == "exact":
        assert torch.equal(out, ref)
    elif AT_INIT[name] == "close":
        assert_close(out, ref, atol=1e-6, rtol=1e-6)
    else:
        assert not torch.allclose(out, ref, atol=1e-4)
    m(ids, mask).sum().backward()                    # every trainable tensor is on the graph
    trainable = [n for n, p in m.named_parameters() if p.requires_grad and not n.startswith("head.")]
    assert trainable and all(m.get_parameter(n).grad is not None for n in trainable), name


def test_lmam_in_disentangled_attention_is_eq_12(tiny_path):
    """(softmax(disentangled scores) + Attn_s)·V on the token grid, written out from the map and the
    base model's own probabilities; ¬N (pre_softmax): softmax(log p + Attn_s)·V, the same scores
    shifted by the map."""
    ids, mask = batch()
    for variant in ("default", "pre_softmax"):
        m = methods.apply_method(load(tiny_path), "lmam", lmam_heads=2, lmam_len=8, lmam_variant=variant)
        attn = m.layers[0].self_attn
        with torch.no_grad():
            attn.attn_map.wb.add_(0.5 * torch.randn_like(attn.attn_map.wb))
            x = m.layernorm_embedding(m.embed_tokens(ids)) * mask[..., None]
            rel_idx = (M.relative_positions(13, 13, m.cfg, "cpu") + m.cfg.span).clamp(0, 2 * m.cfg.span - 1)
            rel = (m.rel_layer_norm(m.rel_embeddings.weight), rel_idx)
            tp = M.token_positions(mask)
            state = M.AttnState(M.padding_mask(mask), positions=(tp, tp, mask.bool()), rel=rel, need_weights=True)
            lmam, attn.attn_map = attn.attn_map, None
            _, p = attn(x, state)                                                  # the base probabilities
            attn.attn_map = lmam
            out, probs = attn(x, state)
            a = lmam.attn_map()                                                    # (h_s, n, n)
            grid = torch.zeros_like(p)
            for b in range(3):
                for h in range(4):
                    for i in range(int(mask[b].sum())):
                        for j in range(int(mask[b].sum())):
                            if i < 8 and j < 8:
                                grid[b, h, i, j] = a[h % 2, i, j]
            v = attn.heads(attn.v_proj(x))
            mixed = (p + grid) if variant == "default" else (p.log() + grid).softmax(-1)
            expected = attn.out_proj((mixed @ v).transpose(1, 2).reshape(3, 13, 32))
        real = mask.bool()
        assert_close(out[real], expected[real], atol=1e-5, rtol=1e-5)
        assert grid.abs().max() > 1e-2 and not torch.allclose(out[real], attn.out_proj(
            (p @ v).transpose(1, 2).reshape(3, 13, 32))[real], atol=1e-4)
        if variant == "default":
            assert_close(probs.transpose(1, 2)[real], (p + grid).transpose(1, 2)[real], atol=1e-6, rtol=1e-6)
            with torch.no_grad():                     # merged (inference) map, the same function
                before = m(ids, mask)
                for mod in m.modules():
                    if isinstance(mod, LMAM):
                        mod.merge()
                assert_close(m(ids, mask), before, atol=1e-6, rtol=1e-6)


def test_disentangled_attention_written_out_with_a_prefix(tiny_path):
    """One layer's probabilities against the formula written with plain indexing: c2p[i, j] =
    qᵢ·k_r[idx(i, j)], p2c[i, j] = kⱼ·q_r[idx(i, j)], all over √(3·hd); prefix keys (prefix
    tuning) score qᵢ·k'/√(3·hd), no position term."""
    m = methods.apply_method(load(tiny_path), "prefix", prefix_len=3, prefix_mid_dim=0)
    attn = m.layers[0].self_attn
    with torch.no_grad():
        m.prefix_encoder.prefix_embedding.weight.normal_()
        x = torch.randn(2, 11, 32)
        idx = (M.relative_positions(11, 11, m.cfg, "cpu") + m.cfg.span).clamp(0, 2 * m.cfg.span - 1)
        rel_emb = m.rel_layer_norm(m.rel_embeddings.weight)
        _, probs = attn(x, M.AttnState(rel=(rel_emb, idx), need_weights=True))
        q, k = attn.heads(attn.q_proj(x)), attn.heads(attn.k_proj(x))
        k_r, q_r = attn.heads(attn.k_proj(rel_emb[None])), attn.heads(attn.q_proj(rel_emb[None]))
        c2p = torch.einsum("bhid,bhijd->bhij", q, k_r[:, :, idx])
        p2c = torch.einsum("bhjd,bhijd->bhij", k, q_r[:, :, idx])
        pk, _ = attn.prefix(2, x.dtype)
        scores = torch.cat([q @ pk.transpose(-1, -2), q @ k.transpose(-1, -2) + c2p + p2c], -1) / (8 * 3) ** 0.5
    assert_close(probs, scores.softmax(-1), atol=1e-6, rtol=1e-5)
    assert idx.max() > idx.min() and (M.relative_positions(11, 11, m.cfg, "cpu").abs() > 4).any()   # buckets in use


# ----------------------------------------------------------------------------- GLUE and Table 11

def glue_dir(tmp_path):
    d = tmp_path / "SST-2"
    d.mkdir()
    good, bad = ["The film was a joy", "lovely film", "wonderful words"], ["A dull mess", "far too long", "awful"]
    rows = [(s, 1) for s in good] + [(s, 0) for s in bad]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s} .\t{y}\n" for s, y in rows * 2))
    (d / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"really {s}\t{y}\n" for s, y in rows))
    return str(d)


def test_glue_pipeline_and_table_11(tmp_path, capsys):
    """train.py fine-tunes DeBERTa with LoRaDA-A from a head-less checkpoint + spm.model; eval.py
    reproduces the validation accuracy with the adapter and prints Table 11's layout."""
    ckpt = deberta_ckpt(tmp_path / "ckpt")
    data = glue_dir(tmp_path)
    T.main(["--model", ckpt, "--method", "lorada_a", "--task", "sst2", "--data", data, "--out_dir", str(tmp_path / "a"),
            "--batch_size", "4", "--num_epochs", "2", "--learning_rate", "1e-2", "--lmam_heads", "2",
            "--lmam_len", "16", "--adapter_r", "4", "--quiet"])
    out = capsys.readouterr().out
    assert "presets: lorada_a on a Deberta of no preset shape, task sst2" in out
    res = E.main(["--model", ckpt, "--adapter", str(tmp_path / "a" / "adapter.safetensors"), "--task", "sst2",
                  "--data", data, "--out_dir", str(tmp_path / "eval")])
    [[row]] = [t for t in markdown_tables(capsys.readouterr().out) if t and "# Params" in t[0]]
    assert list(row) == ["Method", "# Params", "CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "Avg."]
    best = float(out.split("best validation accuracy ")[1].split(";")[0])
    assert res["sst2"]["accuracy"] == pytest.approx(best) and shows(row["SST-2"], 100 * best), row


def test_table_11_layout_recomputes_the_copied_rows():
    """AdaLoRA's and SoRA's rows (from Ding et al.) average exactly as table11 does."""
    rows = {"AdaLoRA": (70.86, 95.95, 90.22, 92.13, 88.41, 91.39, 90.27, 90.30, 94.28, 87.36, "88.83"),
            "SoRA": (71.48, 95.64, 91.98, 92.39, 89.87, 92.22, 90.35, 90.38, 94.28, 87.77, "89.36")}
    for name, (cola, sst2, mrpc, qqp_a, qqp_f, stsb, m, mm, qnli, rte, avg) in rows.items():
        res = {"cola": {"matthews_correlation": cola / 100}, "sst2": {"accuracy": sst2 / 100},
               "mrpc": {"accuracy": mrpc / 100}, "qqp": {"accuracy": qqp_a / 100, "f1": qqp_f / 100},
               "stsb": {"pearson": stsb / 100}, "mnli-m": {"accuracy": m / 100}, "mnli-mm": {"accuracy": mm / 100},
               "qnli": {"accuracy": qnli / 100}, "rte": {"accuracy": rte / 100}}
        [[row]] = markdown_tables(E.table11(res, name))
        assert float(row["Avg."]) == pytest.approx(float(avg), abs=0.005), row          # to the paper's 2 decimals
        assert [float(c) for c in row["QQP"].split("/")] == pytest.approx([qqp_a, qqp_f], abs=0.005), row
