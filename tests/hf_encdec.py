"""Test helpers: tiny random transformers RoBERTa / BART / mBART models and tokenizer files."""
import io
import json
import os
import shutil

import torch
from transformers import (BartConfig, BartForConditionalGeneration, MBartConfig, MBartForConditionalGeneration,
                          RobertaConfig, RobertaForSequenceClassification)

V = 120          # tiny vocabulary: ids 0-3 are <s> <pad> </s> <unk>, as in RoBERTa/BART


def randomise_norms(model):
    """LayerNorm weights and biases away from 1 / 0, so that a swapped or skipped norm shows."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n.lower():
                p.copy_((1 if n.endswith("weight") else 0) + 0.1 * torch.randn_like(p))
    return model


def tiny_roberta(num_labels=3, seed=0):
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5,
                        num_labels=num_labels, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        initializer_range=0.2)
    return randomise_norms(RobertaForSequenceClassification(cfg)).eval()


def tiny_bart(kind="bart", seed=0, init=0.02, **extra):
    """bart: post-LN like bart-large (generation config: forced BOS 0, forced EOS 2, early stopping,
    4 beams, no_repeat_ngram_size 3);
    mbart: pre-LN with final LayerNorms and scaled embeddings like mbart-large-cc25."""
    torch.manual_seed(seed)
    common = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                  init_std=init, pad_token_id=1, bos_token_id=0, eos_token_id=2, forced_eos_token_id=2)
    common.update(extra)
    if kind == "bart":
        model = BartForConditionalGeneration(BartConfig(**common, scale_embedding=False))
        g = model.generation_config           # facebook/bart-large's
        g.forced_bos_token_id, g.early_stopping, g.num_beams, g.no_repeat_ngram_size = 0, True, 4, 3
    else:
        model = MBartForConditionalGeneration(MBartConfig(**common, scale_embedding=True))
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.1)
    return randomise_norms(model).eval()


def save(hf, path):
    hf.save_pretrained(path)
    return str(path)


def batch(seed=1, pad_id=1):
    """Three sources of lengths 9, 6 and 4, right-padded (the tokenizers pad on the right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (3, 9), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = pad_id
    return ids, mask


def roberta_vocab_dir(gpt2_dir, out):
    """vocab.json + merges.txt as Hugging Face's roberta-base has them, built from GPT-2's
    encoder.json and vocab.bpe and fairseq's dict.txt: id = 4 + the dict line of the GPT-2 id."""
    with open(os.path.join(gpt2_dir, "encoder.json")) as f:
        gpt2 = {i: t for t, i in json.load(f).items()}
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    with open(os.path.join(gpt2_dir, "fairseq_dict.txt")) as f:
        for n, line in enumerate(f):
            tok = line.split()[0]
            if tok.isdigit():
                vocab[gpt2[int(tok)]] = 4 + n
            elif tok in ("madeupword0000", "madeupword0001", "madeupword0002"):
                vocab[tok] = 4 + n
    vocab["<mask>"] = len(vocab)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    shutil.copy(os.path.join(gpt2_dir, "vocab.bpe"), os.path.join(out, "merges.txt"))
    return str(out)


def train_mbart_spm(lines, out, vocab_size=500):
    """A small unigram sentencepiece model laid out like mBART's (unk 0, <s> 1, </s> 2, no pad)."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sentencepiece.bpe.model"), "wb") as f:
        f.write(buf.getvalue())
    return str(out)


def byte_vocab_dir(out):
    """A GPT-2-style byte-level vocab.json + merges.txt with no merges (every byte its own token)
    and RoBERTa's special ids: 0-3 <s> <pad> </s> <unk>, bytes 4-259, <mask> 260."""
    from tokenizer import bytes_to_unicode
    os.makedirs(out, exist_ok=True)
    chars = bytes_to_unicode()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for b in range(256):
        vocab[chars[b]] = 4 + b
    vocab["<mask>"] = 260
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(out, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return str(out)
