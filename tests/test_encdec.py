"""RoBERTa, BART and mBART: parity with transformers, seq2seq generation, tokenizers, bad checkpoints."""
import json
import os

import pytest
import torch
from torch.testing import assert_close

import model
from checkpoint import CheckpointError, build, load
from conftest import shared
from generate import generate_seq2seq
from hf_encdec import V, batch, roberta_vocab_dir, save, tiny_bart, tiny_roberta, train_mbart_spm
from tokenizer import GPT2BPETokenizer, MBartTokenizer, load_tokenizer


# -- RoBERTa ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_labels", [3, 1])        # classification, and STS-B's regression
def test_roberta_matches_transformers(tmp_path, num_labels):
    hf = tiny_roberta(num_labels)
    ours = load(save(hf, tmp_path / "r")).eval()
    assert isinstance(ours, model.Roberta) and ours.cfg.num_labels == num_labels
    ids, mask = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask)
        out = ours(ids, mask)
        assert out.shape == (3, num_labels)
        assert_close(out, ref.logits, atol=1e-5, rtol=1e-5)
        hidden = hf.roberta(input_ids=ids, attention_mask=mask).last_hidden_state
        assert_close(ours.encode(ids, mask)[mask.bool()], hidden[mask.bool()], atol=1e-5, rtol=1e-5)
    assert ref.logits.std() > 1e-3             # a real comparison, not of two constant outputs


def test_roberta_positions_skip_padding(tmp_path):
    """RoBERTa numbers positions from pad_id + 1 over real tokens only: a sequence's hidden states do
    not depend on the padding after it."""
    ours = load(save(tiny_roberta(), tmp_path / "r")).eval()
    ids, mask = batch()
    with torch.no_grad():
        alone = ours.encode(ids[2:3, :4])
        in_batch = ours.encode(ids, mask)[2:3, :4]
    assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)


def test_roberta_fresh_head(tmp_path):
    from transformers import RobertaModel
    hf = tiny_roberta()
    path = tmp_path / "enc"
    RobertaModel(hf.config).save_pretrained(path)        # an encoder checkpoint (with a pooler): no head
    bare = load(str(path)).eval()
    assert bare.head is None
    with pytest.raises(ValueError, match="num_labels"):
        bare(*batch())
    torch.manual_seed(0)
    m = load(str(path), num_labels=2).eval()
    assert m.head.out_proj.weight.shape == (2, 32)
    assert m.head.dense.weight.std().item() == pytest.approx(0.2, rel=0.3) and m.head.out_proj.bias.abs().sum() == 0
    with torch.no_grad():
        assert_close(m.encode(*batch()), bare.encode(*batch()))
    assert m(*batch()).shape == (3, 2)
    with pytest.raises(CheckpointError, match="3 labels, num_labels=2"):
        load(save(hf, tmp_path / "cls"), num_labels=2)


def test_roberta_ignores_pretraining_head_only(tmp_path):
    """Keys of parts this model does not use (the MLM head, the pooler) are dropped by name;
    anything else unknown is an error naming the file and key."""
    from transformers import RobertaForMaskedLM
    torch.manual_seed(0)
    mlm = RobertaForMaskedLM(tiny_roberta().config)
    m = load(save(mlm, tmp_path / "mlm"), num_labels=2)
    assert m.head is not None and not any(x.training for x in m.modules())   # eval mode, the fresh head too
    from safetensors.torch import load_file, save_file
    file = str(tmp_path / "mlm" / "model.safetensors")
    sd = load_file(file)
    sd["roberta.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    save_file(sd, file)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'roberta\.encoder"):
        load(str(tmp_path / "mlm"))


# -- BART / mBART --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bart", "mbart"])
def test_bart_matches_transformers(tmp_path, kind):
    hf = tiny_bart(kind)
    ours = load(save(hf, tmp_path / kind)).eval()
    assert isinstance(ours, model.Bart) and ours.cfg.pre_norm == (kind == "mbart")
    ids, mask = batch()
    dec = torch.randint(4, V, (3, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        out = ours(ids, mask, dec)
    assert out.shape == (3, 7, V) and ref.std() > 1e-3
    assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bart", "mbart"])
def test_bart_cached_decoding_equals_full(tmp_path, kind):
    ours = load(save(tiny_bart(kind), tmp_path / kind)).eval()
    ids, mask = batch()
    dec = torch.randint(4, V, (3, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = ours(ids, mask, dec)
        enc_kv = ours.cross_kv(ours.encode(ids, mask))
        cache = ours.new_cache(3, 7)
        steps = [ours.decode(dec[:, :3], enc_kv, mask, cache)]          # 3 at once, then 2 + 1 + 1
        steps.append(ours.decode(dec[:, 3:5], enc_kv, mask, cache))
        steps += [ours.decode(dec[:, t:t + 1], enc_kv, mask, cache) for t in (5, 6)]
    assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_shift_tokens_right_matches_transformers():
    from transformers.models.bart.modeling_bart import shift_tokens_right as bart_shift
    from transformers.models.mbart.modeling_mbart import shift_tokens_right as mbart_shift
    labels = torch.tensor([[50, 51, 52, 2, 119], [60, 61, 2, 119, -100]])   # text </s> lang_code, padded
    assert model.shift_tokens_right(labels, 1, 2).tolist() == bart_shift(labels, 1, 2).tolist()
    assert model.shift_tokens_right(labels, 1, None).tolist() == mbart_shift(labels, 1).tolist()
    assert model.shift_tokens_right(labels, 1, None)[:, 0].tolist() == [119, 119]


def hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)


XSUM = dict(num_beams=6, no_repeat_ngram_size=3, min_length=10, max_length=60, length_penalty=1.0)


def eos_prone(hf, bias=2.5):
    """Raise EOS's final-logits bias so that hypotheses do end before max_length (the finishing
    logic, min_length and early stopping are exercised)."""
    with torch.no_grad():
        hf.final_logits_bias[0, 2] += bias
    return hf


def test_beam_search_xsum_settings_match_transformers(tmp_path):
    """bart-large's generation config (forced BOS <s>, forced EOS, early stopping) with XSum's settings."""
    hf = eos_prone(tiny_bart("bart", init=0.2))
    ours = load(save(hf, tmp_path / "b"))
    assert ours.cfg.generation["early_stopping"] is True and ours.cfg.generation["forced_bos_token_id"] == 0
    ids, mask = batch()
    ref = hf_generate(hf, ids, mask, **XSUM)
    out = generate_seq2seq(ours, ids, mask, **XSUM)
    assert out.tolist() == ref.tolist()
    assert (out[:, 1] == 0).all()                                  # forced BOS
    lengths = (out != 1).sum(1)
    assert (lengths < 60).any() and (lengths >= 10).all()          # some ended on EOS, none before min_length
    # the settings matter: without the n-gram rule or the length floor, the search finds other outputs
    for change in (dict(no_repeat_ngram_size=0), dict(min_length=0), dict(early_stopping=False)):
        kw = dict(XSUM, **change)
        alt = generate_seq2seq(ours, ids, mask, **kw)
        assert alt.tolist() == hf_generate(hf, ids, mask, **kw).tolist()
        if "early_stopping" not in change:
            assert alt.tolist() != out.tolist()


def test_beam_search_translation_settings_match_transformers(tmp_path):
    """mBART en->ro: 5 beams, the decoder starts with the target language code (mbart-large-cc25's
    convention) or starts with </s> and forces the code (mBART-50's, forced BOS)."""
    hf = eos_prone(tiny_bart("mbart", init=0.2), 2.0)
    ours = load(save(hf, tmp_path / "m"))
    ids, mask = batch()
    ro = V - 3                                                     # stands for ro_RO
    for kw in (dict(decoder_start_token_id=ro), dict(decoder_start_token_id=2, forced_bos_token_id=ro)):
        kw.update(num_beams=5, max_length=30)
        ref = hf_generate(hf, ids, mask, **kw)
        out = generate_seq2seq(ours, ids, mask, **kw)
        assert out.tolist() == ref.tolist()
        assert (out[:, 0 if "forced_bos_token_id" not in kw else 1] == ro).all()


@pytest.mark.parametrize("kind", ["bart", "mbart"])
def test_greedy_seq2seq_matches_transformers(tmp_path, kind):
    hf = eos_prone(tiny_bart(kind, init=0.2))
    ours = load(save(hf, tmp_path / kind))
    ids, mask = batch()
    kw = dict(num_beams=1, max_length=25, decoder_start_token_id=2)
    assert generate_seq2seq(ours, ids, mask, **kw).tolist() == hf_generate(hf, ids, mask, **kw).tolist()


def test_generate_seq2seq_rejects_unknown_settings(tmp_path):
    ours = load(save(tiny_bart(), tmp_path / "b"))
    with pytest.raises(ValueError, match="num_beam"):
        generate_seq2seq(ours, *batch(), num_beam=4)


# -- bad checkpoints -----------------------------------------------------------------------------

def test_bart_bad_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file
    path = save(tiny_bart(), tmp_path / "b")
    file = os.path.join(path, "model.safetensors")
    good = load_file(file)

    sd = dict(good)
    del sd["model.decoder.layers.1.encoder_attn.v_proj.bias"]
    save_file(sd, file)
    with pytest.raises(CheckpointError, match="missing tensor 'decoder.layers.1.encoder_attn.v_proj.bias'"):
        load(path)

    sd = dict(good, **{"model.encoder.layers.0.fc3.weight": torch.zeros(2)})
    save_file(sd, file)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.encoder.layers.0.fc3.weight'"):
        load(path)

    sd = dict(good, **{"lm_head.weight": good["model.shared.weight"] + 1})
    save_file(sd, file)
    with pytest.raises(CheckpointError, match="untied embeddings"):
        load(path)

    save_file(good, file)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(cfg, activation_function="swish"), f)
    with pytest.raises(CheckpointError, match="config.json: activation_function 'swish'"):
        load(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(cfg, model_type="t5"), f)
    with pytest.raises(CheckpointError, match="model_type 't5' is not supported"):
        load(path)


# -- tokenizers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def roberta_tok_dir(tmp_path_factory):
    return roberta_vocab_dir(shared("gpt2-bpe"), tmp_path_factory.mktemp("roberta-tok"))


def glue_sentences(n=200):
    """Real GLUE text (SST-2 sentences, MRPC pairs) when ../shared/data has it."""
    sst = shared("glue", "SST-2", "dev.tsv")
    with open(sst, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:n + 1]
    return [r[0] for r in rows]


def test_gpt2_bpe_matches_roberta_tokenizer(roberta_tok_dir):
    from transformers import BartTokenizer, RobertaTokenizer
    ours = load_tokenizer(roberta_tok_dir)
    assert isinstance(ours, GPT2BPETokenizer) and ours.mask_id == 50264 and ours.vocab_size == 50265
    # the ids fairseq's and transformers' docstrings give for roberta-base
    assert ours.encode("Hello world") == [0, 31414, 232, 2]
    assert ours.encode(" Hello world") == [0, 20920, 232, 2]
    texts = glue_sentences() + ["  Spaces   and\ttabs\n\nnew lines", "Ünïcödé, 中文 and emoji 🤗!", "it's we'll 1234567",
                                ""]
    for ref in (RobertaTokenizer.from_pretrained(roberta_tok_dir), BartTokenizer.from_pretrained(roberta_tok_dir)):
        for t in texts:
            assert ours.encode(t) == ref(t)["input_ids"], t
    for t in texts:
        assert ours.decode(ours.encode(t)) == t


def test_gpt2_bpe_pair_encoding_and_truncation(roberta_tok_dir):
    import random
    from transformers import RobertaTokenizer
    ours, ref = load_tokenizer(roberta_tok_dir), RobertaTokenizer.from_pretrained(roberta_tok_dir)
    sents = glue_sentences(60)
    rng = random.Random(0)
    for i in range(150):
        a, b = rng.choice(sents), rng.choice(sents + [""])
        ml = rng.randint(5, 60)
        assert ours.encode_pair(a, b, ml) == ref(a, b, truncation=True, max_length=ml)["input_ids"], (a, b, ml)
    a, b = sents[0], sents[1]
    ids = ours.encode_pair(a, b)
    assert ids == ref(a, b)["input_ids"]
    assert ids.count(2) == 3 and ids[ids.index(2) + 1] == 2          # <s> A </s></s> B </s>


def test_gpt2_bpe_with_gpt2_ids():
    """The same class reads GPT-2's own files (encoder.json is a vocab.json with GPT-2's ids)."""
    d = shared("gpt2-bpe")
    import shutil, tempfile
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(d, "encoder.json")) as f:
            vocab = json.load(f)
        vocab.update({"<s>": 50257, "</s>": 50258, "<pad>": 50259, "<unk>": 50260})
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        shutil.copy(os.path.join(d, "vocab.bpe"), os.path.join(tmp, "merges.txt"))
        tok = load_tokenizer(tmp)
        assert tok.encode("Hello world", bos=False, eos=False) == [15496, 995]     # SOURCE.md's check
        assert tok.encode(" Hello world", bos=False, eos=False) == [18435, 995]


def test_tokenizer_errors(tmp_path, roberta_tok_dir):
    import shutil
    d = tmp_path / "t"
    d.mkdir()
    shutil.copy(os.path.join(roberta_tok_dir, "vocab.json"), d / "vocab.json")
    with pytest.raises(ValueError, match="vocab.json but no merges.txt"):
        load_tokenizer(str(d))
    (d / "merges.txt").write_text("#version: 0.2\nĠ t\nbad line here\n")
    with pytest.raises(ValueError, match=r"merges.txt:3: expected two space-separated tokens"):
        load_tokenizer(str(d))
    (d / "merges.txt").write_text("#version: 0.2\nĠ t\n")
    with open(d / "vocab.json", "w") as f:
        json.dump({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}, f)
    with pytest.raises(ValueError, match=r"vocab.json: has no entry for '.+', which .*merges.txt builds"):
        load_tokenizer(str(d))


def en_ro_lines():
    lines = []
    for split in ("train", "val", "test"):
        with open(shared("hf-seq2seq-samples", "wmt_en_ro_json", f"{split}.json"), encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)["translation"]
                lines += [r["en"], r["ro"]]
    return lines


def test_mbart_tokenizer_matches_transformers(tmp_path):
    from transformers import MBartTokenizer as HFMBartTokenizer
    lines = en_ro_lines()
    path = train_mbart_spm(lines, tmp_path / "spm")
    ours = load_tokenizer(path)
    ref = HFMBartTokenizer.from_pretrained(path, src_lang="en_XX", tgt_lang="ro_RO")
    assert isinstance(ours, MBartTokenizer) and ours.vocab_size == len(ref)
    assert ours.lang_id("ro_RO") == ref.convert_tokens_to_ids("ro_RO") == 500 + 1 + 19
    assert ours.mask_id == ref.mask_token_id
    for t in lines + ["Qqzx ∑ unknown ☃ symbols", "two  spaces"]:
        assert ours.encode(t, "en_XX") == ref(t)["input_ids"], t
    for t in lines[1::2]:
        assert ours.encode(t, "ro_RO") == ref(text_target=t)["input_ids"], t
        assert ours.decode(ours.encode(t, "ro_RO")) == ref.decode(ours.encode(t, "ro_RO"), skip_special_tokens=True)
    with pytest.raises(ValueError, match="unknown mBART language code 'ro'"):
        ours.encode("x", "ro")


def test_preset_parameter_counts_match_transformers():
    """roberta-base (2-label head), bart-large, mbart-large-cc25: our presets against transformers'
    models built on the meta device from the released configs."""
    from transformers import (BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration,
                              RobertaConfig, RobertaForSequenceClassification)
    large = dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                 decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024)
    with torch.device("meta"):
        refs = {"roberta-base": RobertaForSequenceClassification(RobertaConfig(
                    vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_labels=2)),
                "bart-large": BartForConditionalGeneration(BartConfig(vocab_size=50265, **large)),
                "mbart-large-cc25": MBartForConditionalGeneration(MBartConfig(vocab_size=250027, scale_embedding=True,
                                                                             **large))}
    for name, ref in refs.items():
        ours = build(name)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()), name
        assert model.preset_name(ours.cfg) == name
