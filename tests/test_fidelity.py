"""What the code teaches against the paper and the reference code (issue "Teach only what is true"):
LMAM's PE and s at the paper's scales, Houlsby's attention adapter before the block's dropout,
weight decay sparing biases and norms, SoRA's released gate threshold, LongLoRA's token stream.
Every test here takes well under a second or two on a CPU."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import methods
import model as M
from adaptive import SoRAGates, SoRALinear, released_threshold, soft_threshold
from data import text
from lmam import LMAM

LLAMA_S = 1 / (4096 * 600)        # Table 19, LLaMA-7B
ROBERTA_S = 1 / 255               # Table 16
BART_S = 1.0                      # Table 15


# ----------------------------------------------------------------------------- LMAM: PE and s

def fit_map(scale, variant="default", init="zero", steps=300, lr=1e-4, weight_decay=0.0, literal=False, seed=0):
    """LMAM alone (h_s 2, r 2, n 16) fitted to a fixed map of size ~0.1 with AdamW at the paper's lr
    (Tables 17, 19): the map before and after `steps` steps. literal: the same function stored as the
    paper's factors (W = w/√s, times s) with the learning rate multiplied by 1/√s."""
    torch.manual_seed(seed)
    m = LMAM(2, 2, 2, 16, scale, causal=False, variant=variant, init=init)
    if literal:
        with torch.no_grad():
            m.wa.div_(m.root)
            m.wb.div_(m.root)
        m.root, m.gain, lr = 1.0, m.scale, lr * scale ** -0.5
    target = 0.1 * torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay)
    start = m.attn_map().detach().clone()
    for _ in range(steps):
        loss = (m.attn_map() - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start, m.attn_map().detach()


def test_pe_and_s_are_inert_at_llamas_s_and_not_at_barts():
    """At LLaMA-7B's s the default and ¬P maps (same seed) stay within 2e-4 of each other after 300
    steps at lr 1e-4, on maps grown to ~0.08 (README: 3.6e-5 on stories260K); so do 1/s = 4096·60
    and 4096·1600. At BART's s = 1 PE is as large as wa and the ¬P map differs by > 25% of the map."""
    _, a = fit_map(LLAMA_S)
    _, b = fit_map(LLAMA_S, "no_pos")
    assert a.abs().max() > 0.05                                   # the map learned: "inert" is not vacuous
    assert (a - b).abs().max() < 2e-4, (a - b).abs().max()
    _, lo = fit_map(1 / (4096 * 60))
    _, hi = fit_map(1 / (4096 * 1600))
    assert (lo - hi).abs().max() < 3e-4, (lo - hi).abs().max()
    _, a1 = fit_map(BART_S)
    _, b1 = fit_map(BART_S, "no_pos")
    assert (a1 - b1).abs().max() > 0.25 * a1.abs().max(), ((a1 - b1).abs().max(), a1.abs().max())
    _, ar = fit_map(ROBERTA_S)                                    # RoBERTa's 1/255: in between
    _, br = fit_map(ROBERTA_S, "no_pos")
    assert 10 * (a - b).abs().max() < (ar - br).abs().max() < (a1 - b1).abs().max()


def test_literal_init_keeps_pe_but_the_map_barely_moves_at_llamas_s():
    """--lmam_init paper (the literal reading): PE shapes the map (default and ¬P differ by a third of
    the map or more), but after 300 steps at lr 1e-4 the map, ~1e-6, has moved by < 1e-6."""
    start, a = fit_map(LLAMA_S, init="paper")
    _, b = fit_map(LLAMA_S, "no_pos", init="paper")
    assert a.abs().max() < 1e-5 and (a - start).abs().max() < 1e-6
    assert (a - b).abs().max() > 0.3 * a.abs().max()


def test_lr_multiplier_matches_absorbed_s_only_without_weight_decay():
    """The absorbed default and the literal factors with an lr multiplier of 1/√s, from the same
    start: the same trajectory up to Adam's ε without weight decay (RoBERTa's s); with AdamW's
    decoupled decay (0.1, GLUE's) the multiplier decays the factors 1/√s times harder, and at
    LLaMA's s (1/√s ≈ 1600) the map it learns is a fraction of the absorbed one (README, "Why LMAM
    absorbs s")."""
    _, a = fit_map(ROBERTA_S)
    _, b = fit_map(ROBERTA_S, literal=True)
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    _, a = fit_map(LLAMA_S, weight_decay=0.1)
    _, b = fit_map(LLAMA_S, weight_decay=0.1, literal=True)
    assert b.abs().max() < 0.5 * a.abs().max(), (b.abs().max(), a.abs().max())


# ----------------------------------------------------------------------------- Houlsby's placement

class Spy(nn.Module):
    """Wraps an adapter slot's module and records what it received and returned."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x, y):
        out = self.inner(x, y)
        self.seen.append((y, out))
        return out


def tiny_roberta():
    return M.Roberta(M.RobertaConfig(dim=32, n_layers=1, n_heads=4, hidden_dim=64, vocab_size=100,
                                     max_positions=40, num_labels=2))


def tiny_bart(pre_norm=False):
    return M.Bart(M.BartConfig(dim=32, encoder_layers=1, decoder_layers=1, n_heads=4, hidden_dim=64,
                               vocab_size=100, max_positions=40, pre_norm=pre_norm, attention_dropout=0.1))


def record(module, store):
    module.register_forward_hook(lambda mod, inp, out: store.append(out[0] if isinstance(out, tuple) else out))


@pytest.mark.parametrize("family", ["roberta", "bart", "mbart"])
def test_houlsby_attention_adapter_acts_before_dropout_ffn_adapter_after(family, monkeypatch):
    """He et al.'s order, checked on the tensors themselves in training mode (dropout 0.1 active):
    every attention adapter (self, and BART's cross-attention) receives the attention's out_proj
    output itself and the block's dropout is applied to what it returns (RoBERTa: dense → adapter
    → dropout; BART: right after out_proj); the FFN adapter receives dropout(fc2 output)."""
    model = tiny_roberta() if family == "roberta" else tiny_bart(pre_norm=family == "mbart")
    methods.apply_method(model, "series", adapter_r=4, target_modules="out_proj,fc2")
    drops = []
    real_dropout = torch.nn.functional.dropout

    def dropout(x, p=0.5, training=True, inplace=False):
        out = real_dropout(x, p, training, inplace)
        drops.append((x, out))
        return out
    monkeypatch.setattr(torch.nn.functional, "dropout", dropout)
    checked = {"attention": 0, "ffn": 0}
    blocks = [b for b in model.modules() if isinstance(b, (M.MultiHeadAttention, M.FFN))]
    outputs = {}
    for b in blocks:
        b.adapter = Spy(b.adapter)
        outputs[b] = []
        record(b, outputs[b])
    model.train()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = (ids, torch.ones_like(ids)) if family == "roberta" else (ids, torch.ones_like(ids), ids)
    model(*inputs)
    for b in blocks:
        (y, out), = b.adapter.seen
        produced, = outputs[b]
        if isinstance(b, M.MultiHeadAttention):
            assert y is produced                                        # out_proj's output, no dropout yet
            assert any(x is out and p is not x for x, p in drops)       # the block's dropout on the adapter's output
            checked["attention"] += 1
        else:
            assert any(x is produced and p is y for x, p in drops)      # dropout(fc2 output) -> adapter
            assert (y == 0).any() and not (produced == 0).any()         # dropout was active
            checked["ffn"] += 1
    expected = {"roberta": (1, 1), "bart": (3, 2), "mbart": (3, 2)}[family]
    assert (checked["attention"], checked["ffn"]) == expected


# ----------------------------------------------------------------------------- weight decay

def hf_decay_names(model):
    """The Hugging Face Trainer's rule in He et al.'s, AdaLoRA's and SoRA's trainers (transformers
    4.x's create_optimizer): get_parameter_names(model, [nn.LayerNorm]) less names containing "bias"."""
    def names(module):
        out = []
        for name, child in module.named_children():
            out += [f"{name}.{n}" for n in names(child) if not isinstance(child, nn.LayerNorm)]
        return out + list(module._parameters.keys())
    return {n for n in names(model) if "bias" not in n}


@pytest.mark.parametrize("method", ["bitfit", "series", "lorada_a", "full"])
def test_weight_decay_spares_biases_and_layernorms_as_the_hf_trainer(method):
    model = tiny_roberta()
    kw = dict(adapter_r=4) if method == "series" else dict(lmam_heads=2, lmam_len=8, adapter_r=4) \
        if method == "lorada_a" else {}
    methods.apply_method(model, method, **kw)
    groups = methods.param_groups(model, 1e-3, 0.1, lmam_lr_scale=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(n for g in groups for n in map(names.get, map(id, g["params"]))) == sorted(trainable)
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == trainable & hf_decay_names(model)
    assert not any("bias" in n or "norm" in n for n in decayed)
    spared = trainable - decayed
    if method == "bitfit":
        assert spared == {n for n in trainable if n.endswith("bias")} and decayed == {"head.dense.weight",
                                                                                      "head.out_proj.weight"}
    if method == "series":
        assert any(n.endswith("adapter_norm.weight") for n in spared)     # the Houlsby adapter's LayerNorm gain
        assert any(n.endswith("adapter_down.weight") for n in decayed)
    for g in groups:
        is_map = all(".attn_map." in names[id(p)] for p in g["params"])
        assert g["lr"] == pytest.approx(5e-4 if is_map else 1e-3)
    if method == "lorada_a":                                              # LMAM's factors: own lr, decayed
        assert [g["weight_decay"] for g in groups if ".attn_map." in names[id(g["params"][0])]] == [0.1]


def test_no_weight_decay_keeps_one_group_per_learning_rate():
    model = M.Llama(M.LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=64, vocab_size=64))
    methods.apply_method(model, "longlora+lmam", lmam_heads=2, lmam_len=8, context_len=0)
    groups = methods.param_groups(model, 1e-3, 0.0, lmam_lr_scale=0.1)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.0), (pytest.approx(1e-4), 0.0)]
    spared = methods.no_decay_names(model)
    assert {"norm.weight", "layers.0.input_layernorm.weight"} <= spared      # RMSNorm counts as a norm
    assert not any("embed" in n or "lora_" in n for n in spared)


# ----------------------------------------------------------------------------- SoRA's threshold

def reference_masks(z, xi):
    """SoRA's src/sparse_optimizer.py, SparseAdamW.step, as released."""
    p = z.clone()
    p.data[p.data > xi] -= xi
    p.data[p.data < -xi] += xi
    p.data[abs(p.data) < xi] = 0.0
    return p


def test_sora_released_threshold_is_the_reference_and_zeroes_below_two_lambda():
    xi = 0.25
    z = torch.cat([torch.linspace(-1, 1, 2001), torch.tensor([xi, -xi, 2 * xi, -2 * xi, 0.3, -0.45, 0.55])])
    assert torch.equal(released_threshold(z, xi), reference_masks(z, xi))
    r, s = released_threshold(z, xi), soft_threshold(z, xi)
    inside = z.abs() < 2 * xi
    assert torch.equal(r[inside & (z.abs() != xi)], torch.zeros_like(r[inside & (z.abs() != xi)]))
    assert torch.equal(r[~inside], s[~inside])                            # beyond 2ξ both shrink by ξ
    assert (s[inside & (z.abs() > xi)] != 0).all()                        # the paper's keeps (ξ, 2ξ)


@pytest.mark.parametrize("prox", ["released", "soft"])
def test_sora_gates_use_the_chosen_threshold(prox):
    """Through the hook: a step of (almost) zero learning rate leaves z = g; λ2 = 0.1."""
    layer = SoRALinear(torch.nn.Linear(4, 3), r=5, alpha=5.0)
    g0 = torch.tensor([0.05, 0.15, -0.15, 0.25, -0.3])
    with torch.no_grad():
        layer.lora_gate.copy_(g0)
    layer.lora_gate.grad = torch.zeros(5)
    SoRAGates(lam=0.0, lam2=0.1, prox=prox).after_update(nn.Sequential(layer), 1, 10, 0.0)
    expected = {"released": [0.0, 0.0, 0.0, 0.15, -0.2], "soft": [0.0, 0.05, -0.05, 0.15, -0.2]}[prox]
    torch.testing.assert_close(layer.lora_gate.detach(), torch.tensor(expected))


def test_sora_default_is_released_and_unknown_prox_is_an_error():
    model = M.Llama(M.LlamaConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=32, vocab_size=32))
    assert methods.method_hparams("sora")["sora_prox"] == "released"
    with pytest.raises(ValueError, match="sora_prox"):
        methods.apply_method(model, "sora", sora_prox="hard")


# ----------------------------------------------------------------------------- LongLoRA's stream

class WordTokenizer:
    """One id per word (ids from 10), BOS 1, EOS 2; the vocabulary's size is 1000."""
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 1000

    def encode(self, s, bos=True, eos=True):
        return [self.bos_id] * bos + [10 + len(w) for w in s.split()] + [self.eos_id] * eos


def test_longlora_stream_joins_batches_of_documents_with_eos_and_pads_with_pad(tmp_path):
    """LongLoRA's fine-tune.py: datasets' map(batched=True) hands tokenize_fn 1,000 documents, which
    it joins with EOS, tokenizes with one BOS and pads at the end to a multiple of the context length
    with [PAD] (the id after the vocabulary, methods.add_pad_token's row). Here batches of 2."""
    docs = ["a bb", "ccc", "dddd ee f", "g"]
    tok = WordTokenizer()
    ours = [t for ids in text.stream(docs, tok) for t in ids]
    assert ours == [1, 11, 12, 2, 1, 13, 2, 1, 14, 12, 11, 2, 1, 11, 2]             # each between BOS and EOS
    theirs = list(text.stream(docs, tok, layout="longlora", row_len=4, batch_docs=2))
    pad = tok.vocab_size
    assert theirs == [[1, 11, 12, 2, 13, pad, pad, pad], [1, 14, 12, 11, 2, 11, pad, pad]]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(f'{{"text": "{d}"}}\n' for d in docs))
    tokens = text.token_file(str(data), tok, str(tmp_path / "t.bin"), layout="longlora", row_len=4)
    assert tokens.tolist() == [1, 11, 12, 2, 13, 2, 14, 12, 11, 2, 11, pad]         # one batch of ≤ 1,000
    rows = text.Rows(tokens, 4, pad_id=pad)
    assert len(rows) == 3 and rows[0] == {"input_ids": [1, 11, 12, 2], "labels": [1, 11, 12, 2]}
    assert rows[2] == {"input_ids": [11, 2, 11, pad], "labels": [11, 2, 11, -100]}   # no loss on [PAD]
    again = text.token_file(str(data), tok, str(tmp_path / "t.bin"))                 # the default layout: made again
    assert again.tolist() == ours and isinstance(again, np.ndarray)
    with pytest.raises(ValueError, match="row_len"):
        list(text.stream(docs, tok, layout="longlora"))
