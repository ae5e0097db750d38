"""Test helpers: tiny random transformers DeBERTa-v2/v3 models and a DeBERTa-layout spm.model."""
import io
import json
import os

import torch
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

from hf_encdec import randomise_norms

V = 128          # tiny vocabulary: [PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3, as in DeBERTa-v3

# microsoft/deberta-v3-base's config.json, shapes aside
V3 = dict(relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
          pos_att_type="p2c|c2p", layer_norm_eps=1e-7, max_relative_positions=-1, position_biased_input=False,
          type_vocab_size=0, pad_token_id=0, hidden_act="gelu")


def tiny_deberta(num_labels=3, seed=0, **extra):
    """v3's layout at width 32: log buckets of 8 (distances of 4 and more are bucketed; the batches
    below have 13 tokens), 64 positions."""
    torch.manual_seed(seed)
    cfg = dict(V3, vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, position_buckets=8, num_labels=num_labels, initializer_range=0.2)
    cfg.update(extra)
    return randomise_norms(DebertaV2ForSequenceClassification(DebertaV2Config(**cfg))).eval()


def deberta_v3_base_meta(num_labels=2):
    """transformers' DeBERTaV3-base with a GLUE head, on the meta device (parameter counts)."""
    with torch.device("meta"):
        return DebertaV2ForSequenceClassification(DebertaV2Config(
            **V3, vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512, num_labels=num_labels))


def save(hf, path):
    hf.save_pretrained(path)
    return str(path)


def batch(seed=1, T=13):
    """Three rows of lengths 13, 9 and 5, right-padded with [PAD] = 0, starting with [CLS]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (3, T), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask


SENTENCES = ["The film was a joy from start to finish.", "A dull mess, and far too long.",
             "Is the man in the picture playing a guitar?", "Two dogs run across the snowy field.",
             "The committee will announce its decision on Tuesday.", "She didn't think the plan would work.",
             "Prices rose 3.5% in May, the fastest pace since 2008.", "Ünïcödé, café and naïve words; ﬁne print.",
             "He said: \"it's over\" -- and left.", "QQP asks whether two questions mean the same thing?"]


def train_deberta_spm(lines, out, vocab_size=300):
    """A unigram sentencepiece model laid out like DeBERTa-v3's spm.model: [PAD] 0, [CLS] 1, [SEP] 2,
    [UNK] 3 ([MASK] comes after the last piece)."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]",
                                   eos_id=2, eos_piece="[SEP]", unk_id=3, unk_piece="[UNK]", character_coverage=1.0,
                                   minloglevel=2)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "spm.model"), "wb") as f:
        f.write(buf.getvalue())
    return str(out)


def deberta_ckpt(path, vocab_size=None, num_labels=None, **extra):
    """A tiny DeBERTa checkpoint without a head (as microsoft/deberta-v3-base), with a trained spm.model
    whose vocabulary fits the embedding."""
    from transformers import DebertaV2Model
    torch.manual_seed(0)
    tok = train_deberta_spm(SENTENCES * 20, path, vocab_size=100)
    cfg = dict(V3, vocab_size=vocab_size or 101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64, position_buckets=8)
    cfg.update(extra)
    save(DebertaV2Model(DebertaV2Config(**cfg)), path)
    return tok


def edit_config(path, **changes):
    """Rewrite config.json of a saved checkpoint (a key set to None is removed)."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(file, "w") as f:
        json.dump(cfg, f)
    return file
