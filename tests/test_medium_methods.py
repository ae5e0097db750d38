"""The PEFT methods on RoBERTa, BART and mBART: parameter counts against their formulas, peft
parity for LoRA/DoRA, identity at init, merged == unmerged, where each method attaches."""
import pytest
import torch
from torch.testing import assert_close

import methods
import model as M
from checkpoint import build, load
from hf_encdec import V, batch, save, tiny_bart, tiny_roberta
from lmam import LMAM
from helpers import grads_match

MEDIUM = ("roberta-base", "bart-large", "mbart-large-cc25")


def closed_form(name, m, hp):
    """Each method's trainable parameters on a medium model from its formula (adapters.py, lora.py,
    lmam.py docstrings), plus RoBERTa's GLUE head, which always trains."""
    c = m.cfg
    d = c.dim
    roberta = isinstance(m, M.Roberta)
    head = d * d + d + d * c.num_labels + c.num_labels if roberta else 0
    L_enc, L_dec = (c.n_layers, 0) if roberta else (c.encoder_layers, c.decoder_layers)
    n_attn = L_enc + 2 * L_dec                       # attention modules: encoder self, decoder self + cross
    n_ffn = L_enc + L_dec
    r = hp.get("adapter_r")
    if name == "lorada_a":
        return closed_form("lmam", m, hp) + closed_form("adapter_ffn", m, hp) - head
    if name == "lmam":                                # encoder only (Table 15); every RoBERTa layer
        return L_enc * 2 * hp["lmam_heads"] * hp["lmam_len"] * hp["lmam_rank"] + head
    if name in ("lora", "dora"):                      # q_proj, v_proj of every attention
        per = hp["lora_r"] * 2 * d + (d if name == "dora" else 0)
        return 2 * n_attn * per + head
    if name == "series":                              # Houlsby: after out_proj (with an input LN) and fc2
        return n_attn * (2 * d * r + r + d + 2 * d) + n_ffn * (2 * d * r + r + d) + head
    if name == "adapter_ffn":
        return n_ffn * (2 * d * r + r + d) + head
    if name in ("prefix", "mam"):
        l, mid = hp["prefix_len"], hp["prefix_mid_dim"]
        sites = [L_enc] if roberta else [L_enc, L_dec, L_dec]   # He et al.'s three prefixes for BART
        pre = sum(l * d + d * mid + mid + mid * Ls * 2 * d + Ls * 2 * d for Ls in sites)
        return pre + (closed_form("adapter_ffn", m, hp) - head if name == "mam" else 0) + head
    raise KeyError(name)


@pytest.mark.parametrize("name", ["lora", "dora", "series", "adapter_ffn", "prefix", "mam", "lmam", "lorada_a"])
@pytest.mark.parametrize("preset", MEDIUM)
def test_parameter_counts_match_the_formula(name, preset):
    m = build(preset)
    total = sum(p.numel() for p in m.parameters())
    methods.apply_method(m, name)
    trainable, everything = methods.count_parameters(m)
    expected = closed_form(name, m, m.peft_method["hparams"])
    head = sum(p.numel() for n, p in m.named_parameters() if n.startswith("head."))
    assert trainable == expected
    assert everything == total + expected - head


def test_bitfit_trains_every_bias_and_the_head():
    """BitFit's count against transformers' own biases (He et al.: every parameter named *bias*)."""
    from transformers import BartConfig, BartForConditionalGeneration, RobertaConfig, RobertaForSequenceClassification
    with torch.device("meta"):
        refs = {"roberta-base": RobertaForSequenceClassification(RobertaConfig(
                    vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)),
                "bart-large": BartForConditionalGeneration(BartConfig(
                    vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                    decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096))}
    for name, ref in refs.items():
        m = methods.apply_method(build(name), "bitfit")
        biases = sum(p.numel() for n, p in ref.named_parameters() if "bias" in n)
        head_weights = sum(p.numel() for n, p in ref.named_parameters() if n.startswith("classifier.") and "bias" not in n)
        assert methods.count_parameters(m)[0] == biases + head_weights


@pytest.mark.parametrize("preset,percent", [("bart-large", 6.7), ("mbart-large-cc25", 6.6)])
def test_lorada_a_share_as_table_10(preset, percent):
    """Table 10 lists LoRaDA-A at 6.7% of BART-large, the MAM budget (peft's trainable% line)."""
    m = methods.apply_method(build(preset), "lorada_a")
    t, a = methods.count_parameters(m)
    assert int(1000 * t / a) / 10 == percent


def test_where_the_methods_attach():
    m = methods.apply_method(build("bart-large"), "lorada_a")
    assert all(l.self_attn.attn_map is not None for l in m.encoder.layers)
    assert all(l.self_attn.attn_map is None and l.encoder_attn.attn_map is None for l in m.decoder.layers)
    assert all(l.ffn.adapter is not None for l in [*m.encoder.layers, *m.decoder.layers])
    m = methods.apply_method(build("bart-large"), "prefix")
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == \
        {"prefix_encoder", "prefix_decoder", "prefix_cross"}
    assert all(l.encoder_attn.prefix is not None for l in m.decoder.layers)
    with pytest.raises(ValueError, match="'up_proj' does not exist in this model; its linear layers are: "
                                         "fc1, fc2, k_proj, out_proj, q_proj, v_proj"):
        methods.apply_method(build("roberta-base"), "lora", target_modules="q_proj,up_proj")


def peft_name(k):
    for prefix in ("base_model.model.model.", "base_model.model.roberta.encoder.", "base_model.model.roberta.",
                   "base_model.model."):
        k = k.removeprefix(prefix)
    k = k.replace("layer.", "layers.").replace("attention.self.query", "self_attn.q_proj")
    k = k.replace("attention.self.value", "self_attn.v_proj").replace("classifier.modules_to_save.default.", "head.")
    return (k.replace(".lora_A.default.weight", ".lora_A").replace(".lora_B.default.weight", ".lora_B")
             .replace(".lora_magnitude_vector.default.weight", ".magnitude"))


@pytest.mark.parametrize("kind", ["roberta", "bart", "mbart"])
@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_and_dora_match_peft(tmp_path, kind, use_dora):
    from peft import LoraConfig, get_peft_model
    hf = tiny_roberta() if kind == "roberta" else tiny_bart(kind)
    ours = load(save(hf, tmp_path / kind)).eval()
    targets = ["query", "value"] if kind == "roberta" else ["q_proj", "v_proj"]
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_dora=use_dora,
                     modules_to_save=["classifier"] if kind == "roberta" else None)
    pm = get_peft_model(hf, cfg).eval()
    methods.apply_method(ours, "dora" if use_dora else "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         target_modules="q_proj,v_proj")
    theirs = {peft_name(n): p for n, p in pm.named_parameters() if p.requires_grad}
    mine = dict(ours.named_parameters())
    assert set(theirs) == {n for n, p in mine.items() if p.requires_grad}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k, p in theirs.items():                      # the same non-trivial values in both
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            mine[k].copy_(p)
    ids, mask = batch()
    if kind == "roberta":
        ref, out = pm(input_ids=ids, attention_mask=mask).logits, ours(ids, mask)
    else:
        dec = torch.randint(4, V, (3, 5), generator=g)
        ref = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        out = ours(ids, mask, dec)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(out.shape, generator=g)
    (ref * w).sum().backward()
    (out * w).sum().backward()
    grads_match(theirs, mine)


@pytest.mark.parametrize("kind", ["roberta", "bart", "mbart"])
def test_identity_at_init_and_merge(tmp_path, kind):
    """LoRaDA-A with the family's preset (s = 1 and r = 22 / 64 on BART / mBART, 1/255 and 3 on
    RoBERTa), LMAM's default init and the adapter's LoRA-style init is exactly the base model;
    after training-like changes, merging LMAM (and LoRA) changes nothing."""
    hf = tiny_roberta() if kind == "roberta" else tiny_bart(kind)
    path = save(hf, tmp_path / kind)
    base = load(path).eval()
    ids, mask = batch()
    dec = torch.randint(4, V, (3, 5), generator=torch.Generator().manual_seed(2))
    run = (lambda m: m(ids, mask)) if kind == "roberta" else (lambda m: m(ids, mask, dec))
    m = methods.apply_method(load(path).eval(), "lorada_a", lmam_heads=2, lmam_len=8, adapter_r=4)
    assert m.peft_method["hparams"]["lmam_scale"] == {"roberta": 1 / 255, "bart": 1.0, "mbart": 1.0}[kind]
    with torch.no_grad():
        assert torch.equal(run(m), run(base))
        for n, p in m.named_parameters():
            if p.requires_grad and not n.startswith("head."):
                p.add_(0.05 * torch.randn_like(p))
        before = run(m)
        assert not torch.allclose(before, run(base), atol=1e-4)
        for mod in m.modules():
            if hasattr(mod, "merge"):
                mod.merge()
        assert_close(run(m), before, atol=1e-5, rtol=1e-5)
    lora = methods.apply_method(load(path).eval(), "lora", lora_r=2)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        before = run(lora)
        for mod in lora.modules():
            if hasattr(mod, "merge"):
                mod.merge()
        assert_close(run(lora), before, atol=1e-5, rtol=1e-5)


def test_three_way_prefix_decodes_with_the_cache(tmp_path):
    """BART with prefixes on all three attentions: generation with the KV cache equals full forwards."""
    ours = load(save(tiny_bart("bart"), tmp_path / "b")).eval()
    methods.apply_method(ours, "prefix", prefix_len=3, prefix_mid_dim=8)
    ids, mask = batch()
    dec = torch.randint(4, V, (3, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids, mask, dec)
        enc_kv = ours.cross_kv(ours.encode(ids, mask))
        cache = ours.new_cache(3, 6)
        steps = [ours.decode(dec[:, t:t + 1], enc_kv, mask, cache) for t in range(6)]
        assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        plain = load(str(tmp_path / "b")).eval()(ids, mask, dec)
    assert not torch.allclose(full, plain, atol=1e-4)              # the prefixes do act


def test_fmam_share_as_table_13():
    """¬L (FMAM) on RoBERTa-base: the full (h, n, n) map of all 12 heads, no s, with Adapter-FFN
    r=16: 12·12·512² + the adapter = 38.05M, Table 13's 23.47% (of the model without its head)."""
    m = methods.apply_method(build("roberta-base"), "lorada_a", lmam_variant="full_rank")
    head = sum(p.numel() for n, p in m.named_parameters() if n.startswith("head."))
    t, a = methods.count_parameters(m)
    assert t - head == 12 * 12 * 512 ** 2 + 12 * (2 * 768 * 16 + 16 + 768)
    assert round(100 * (t - head) / (a - head), 2) == 23.47


def test_ffn_adapters_act_after_the_blocks_dropout():
    """He et al.: dropout(fc2(·)), then the adapter term; Houlsby's adapter drops after its ReLU."""
    from adapters import AdapterFFN, HoulsbyAdapter
    torch.manual_seed(0)
    layer = M.EncoderLayer(16, 2, 32, "gelu", dropout=1.0, attention_dropout=0.0, activation_dropout=0.0).train()
    layer.ffn.adapter = AdapterFFN(16, 4, scale=2.0)
    torch.nn.init.normal_(layer.ffn.adapter.adapter_up.weight)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():                      # p = 1 drops the whole FFN output; the adapter term stays
        expected = layer.final_layer_norm(x + layer.ffn.adapter(x, torch.zeros_like(x)))
        got = layer.residual(x, layer.final_layer_norm, layer.ffn, layer.ffn.adapter)
    assert_close(got, expected)
    assert not torch.allclose(got, layer.final_layer_norm(x))
    houlsby = HoulsbyAdapter(16, 4, dropout=0.5, layer_norm=True).train()
    y = torch.randn(2, 3, 16)
    torch.manual_seed(1)
    got = houlsby(x, y)
    torch.manual_seed(1)
    h = torch.nn.functional.dropout(torch.relu(houlsby.adapter_down(houlsby.adapter_norm(y))), 0.5)
    assert_close(got, y + houlsby.adapter_up(h))


@pytest.mark.parametrize("kind", ["roberta", "bart"])
def test_need_weights_returns_the_attention_maps(tmp_path, kind):
    """RoBERTa and BART's encoder return every layer's attention probabilities, with LMAM's map
    added (the naive path), and the same hidden states as the fast path."""
    hf = tiny_roberta() if kind == "roberta" else tiny_bart(kind)
    m = methods.apply_method(load(save(hf, tmp_path / kind)), "lmam", lmam_heads=2, lmam_len=8)
    ids, mask = batch()
    with torch.no_grad():
        plain_out, plain = m.encode(ids, mask, need_weights=True)
        for mod in m.modules():
            if isinstance(mod, LMAM):
                mod.wb.add_(0.5 * torch.randn_like(mod.wb))
        out, probs = m.encode(ids, mask, need_weights=True)
        assert_close(out, m.encode(ids, mask), atol=1e-5, rtol=1e-5)
    layers = m.cfg.n_layers if kind == "roberta" else m.cfg.encoder_layers
    assert len(probs) == layers and probs[0].shape == (3, m.cfg.n_heads, ids.shape[1], ids.shape[1])
    real = mask.bool()
    sums = plain[0].sum(-1).permute(0, 2, 1)[real]                   # (real queries, H): rows of a softmax
    assert_close(sums, torch.ones_like(sums))
    assert not torch.allclose(probs[0], plain[0], atol=1e-4)         # the learned map shows
