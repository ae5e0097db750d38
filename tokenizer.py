"""Tokenizers: text <-> token ids, id-for-id as the checkpoints' own tokenizers.

  - SentencePieceTokenizer: LLaMA 1/2 and llama2.c (sentencepiece tokenizer.model);
  - TiktokenTokenizer: LLaMA 3 (tiktoken-format tokenizer.model, Meta's split pattern and
    special tokens);
  - GPT2BPETokenizer: RoBERTa and BART (GPT-2's byte-level BPE from vocab.json + merges.txt, run by
    tiktoken);
  - MBartTokenizer: mBART (sentencepiece with fairseq's ids and the language codes);
  - DebertaTokenizer: DeBERTa-v2/v3 (spm.model's unigram pieces, transformers' pipeline).
`load_tokenizer(path)` picks the right one from a file or a checkpoint directory. Each has
`encode` and `decode` and the ids the models need (bos_id, eos_id, pad_id, vocab_size).
"""
import json
import math
import os
import re
import unicodedata


def load_sentencepiece(path: str):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except Exception as e:
        raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
    return sp


class SentencePieceTokenizer:
    """LLaMA 1/2 (and llama2.c) sentencepiece tokenizer.model."""

    def __init__(self, path: str):
        self.path, self.sp = path, load_sentencepiece(path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.EncodeAsIds(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])


class TiktokenTokenizer:
    """LLaMA 3's tokenizer.model: base64 BPE ranks, Meta's split pattern and 256 special tokens."""

    PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
               + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)])

    def __init__(self, path: str):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        self.path = path
        try:
            ranks = load_tiktoken_bpe(path)
        except Exception as e:
            raise ValueError(f"{path}: not a tiktoken BPE file ({e})") from None
        special = {t: len(ranks) + i for i, t in enumerate(self.SPECIAL)}
        self.enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=self.PATTERN,
                                     mergeable_ranks=ranks, special_tokens=special)
        self.bos_id, self.eos_id = special["<|begin_of_text|>"], special["<|end_of_text|>"]
        self.pad_id = self.eos_id
        self.vocab_size = len(ranks) + len(special)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # Special-token text in the input is encoded as plain text, as Meta's tokenizer does.
        return [self.bos_id] * bos + self.enc.encode(text, disallowed_special=()) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (vocab.json and merges.txt are written
    in it): printable Latin-1 bytes map to themselves, the other 68 to chr(256 + k)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE (RoBERTa, BART) from a Hugging Face vocab.json + merges.txt, run by tiktoken.

    tiktoken wants {token bytes: rank} where merging always picks the lowest-ranked pair: single
    bytes get ranks 0-255 and merge line i gets rank 256 + i, which is GPT-2's merge priority. The
    ranks are then mapped to the checkpoint's ids through vocab.json (RoBERTa's ids are not GPT-2's:
    fairseq renumbered them by frequency). Special-token text in the input ("<mask>") is encoded as
    plain text.
    """

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab_file: str, merges_file: str):
        import numpy as np
        import tiktoken
        self.path = os.path.dirname(vocab_file)
        b2u = bytes_to_unicode()
        u2b = {c: b for b, c in b2u.items()}
        try:
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{vocab_file}: cannot read the BPE vocabulary ({e})") from None
        ranks = {bytes([b]): i for i, b in enumerate(sorted(b2u))}
        with open(merges_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.startswith("#version") or not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{merges_file}:{n}: expected two space-separated tokens, got {line.rstrip()!r}")
                try:
                    merged = bytes(u2b[c] for c in parts[0] + parts[1])
                except KeyError as e:
                    raise ValueError(f"{merges_file}:{n}: character {e} is not in GPT-2's byte alphabet") from None
                ranks.setdefault(merged, len(ranks))
        self.enc = tiktoken.Encoding(name="gpt2-bpe", pat_str=self.PATTERN, mergeable_ranks=ranks, special_tokens={})
        rank_to_id = np.zeros(len(ranks), dtype=np.int64)
        for token, rank in ranks.items():
            text = "".join(b2u[b] for b in token)
            if text not in vocab:
                raise ValueError(f"{vocab_file}: has no entry for {text!r}, which {merges_file} builds")
            rank_to_id[rank] = vocab[text]
        self.rank_to_id = rank_to_id
        self.id_to_bytes = {i: bytes(u2b[c] for c in t) for t, i in vocab.items() if all(c in u2b for c in t)}
        self.special = {t: i for t, i in vocab.items() if t.startswith("<") and t.endswith(">") and len(t) > 2}
        for name, tok in (("bos_id", "<s>"), ("eos_id", "</s>"), ("pad_id", "<pad>"), ("unk_id", "<unk>")):
            if tok not in vocab:
                raise ValueError(f"{vocab_file}: missing special token {tok!r}")
            setattr(self, name, vocab[tok])
        self.mask_id = vocab.get("<mask>")
        self.vocab_size = max(vocab.values()) + 1

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """<s> text </s> (RoBERTa's and BART's single-sequence format)."""
        ids = self.rank_to_id[self.enc.encode_ordinary(text)].tolist()
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_pair(self, a: str, b: str | None = None, max_length: int | None = None) -> list[int]:
        """<s> A </s></s> B </s> (or <s> A </s>), cut to max_length tokens from the end of the texts
        as transformers' truncation="longest_first" does (the tokenizers library's rule: the shorter
        text keeps its length if the longer one can absorb the cut, else the shorter gets
        budget // 2 and the longer the rest)."""
        x = self.encode(a, bos=False, eos=False)
        y = self.encode(b, bos=False, eos=False) if b else None        # "" counts as no B, as in transformers
        if max_length is not None:
            budget = max_length - (4 if y is not None else 2)
            if budget < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the text")
            if y is None:
                x = x[:budget]
            elif len(x) + len(y) > budget:
                short, long = sorted((len(x), len(y)))
                long = short if short > budget else max(short, budget - short)
                if short + long > budget:
                    short, long = budget // 2, budget // 2 + budget % 2
                nx, ny = (long, short) if len(x) > len(y) else (short, long)
                x, y = x[:nx], y[:ny]
        if y is None:
            return [self.bos_id] + x + [self.eos_id]
        return [self.bos_id] + x + [self.eos_id, self.eos_id] + y + [self.eos_id]

    def decode(self, ids, skip_special: bool = True) -> str:
        inv = {i: t for t, i in self.special.items()}
        out = b"".join(self.id_to_bytes.get(int(i), b"") if int(i) not in inv else
                       (b"" if skip_special else inv[int(i)].encode()) for i in ids)
        return out.decode("utf-8", errors="replace")


class MBartTokenizer:
    """mBART's sentencepiece model with fairseq's ids: <s>=0 <pad>=1 </s>=2 <unk>=3, piece p at
    sentencepiece id + 1 (sentencepiece's own <unk>, id 0, becomes 3), then the 25 language codes,
    then <mask>. A sequence is `text </s> lang_code` (source and target alike)."""

    LANGUAGE_CODES = ["ar_AR", "cs_CZ", "de_DE", "en_XX", "es_XX", "et_EE", "fi_FI", "fr_XX", "gu_IN", "hi_IN",
                      "it_IT", "ja_XX", "kk_KZ", "ko_KR", "lt_LT", "lv_LV", "my_MM", "ne_NP", "nl_XX", "ro_RO",
                      "ru_RU", "si_LK", "tr_TR", "vi_VN", "zh_CN"]
    OFFSET = 1

    def __init__(self, path: str):
        self.path, self.sp = path, load_sentencepiece(path)
        n = self.sp.GetPieceSize()
        self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self.lang_code_to_id = {c: n + self.OFFSET + i for i, c in enumerate(self.LANGUAGE_CODES)}
        self.mask_id = n + self.OFFSET + len(self.LANGUAGE_CODES)
        self.vocab_size = self.mask_id + 1

    def lang_id(self, lang: str) -> int:
        if lang not in self.lang_code_to_id:
            raise ValueError(f"unknown mBART language code {lang!r}; valid: {', '.join(self.LANGUAGE_CODES)}")
        return self.lang_code_to_id[lang]

    def encode(self, text: str, lang: str | None = None) -> list[int]:
        """text </s> lang_code (without lang_code when lang is None)."""
        ids = [i + self.OFFSET if i else self.unk_id for i in self.sp.EncodeAsIds(text)]
        return ids + [self.eos_id] + ([self.lang_id(lang)] if lang is not None else [])

    def decode(self, ids, skip_special: bool = True) -> str:
        n = self.sp.GetPieceSize()
        pieces = [int(i) - self.OFFSET for i in ids if 4 <= int(i) < n + self.OFFSET]
        return self.sp.DecodeIds(pieces)


# Unicode's White_Space characters (what the tokenizers library's \s and strip use; Python's
# str.isspace() also counts \x1c-\x1f).
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


def truncate_longest_first(x: list, y: list | None, budget: int):
    """transformers' truncation="longest_first" of a pair to `budget` tokens, cut from the ends
    (the tokenizers library's rule: the shorter text keeps its length if the longer one can absorb
    the cut, else the shorter gets budget // 2 and the longer the rest)."""
    if budget < 0:
        raise ValueError(f"max_length leaves no room for the text ({budget} tokens)")
    if y is None:
        return x[:budget], None
    if len(x) + len(y) <= budget:
        return x, y
    short, long = sorted((len(x), len(y)))
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short, long = budget // 2, budget // 2 + budget % 2
    nx, ny = (long, short) if len(x) > len(y) else (short, long)
    return x[:nx], y[:ny]


class DebertaTokenizer:
    """DeBERTa-v2/v3's spm.model, id for id as transformers' DebertaV2Tokenizer (5.x), which runs
    the model's unigram pieces through its own pipeline rather than sentencepiece's:

      1. normalise: runs of 2+ white space and every \\n, \\r, \\t become one space; NFC; strip the
         right end (not sentencepiece's NFKC: "ﬁ" stays one unknown character);
      2. split into words at spaces, each word starting with "▁" (one is prepended to the first);
      3. segment each word by Viterbi over the pieces' log-probabilities (the unigram model);
         a character no piece covers is [UNK] with score min − 10, and runs of [UNK] fuse.

    Ids: the pieces' own ([PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3 in v3), [MASK] after the last piece
    (128000 in v3). A pair is [CLS] A [SEP] B [SEP], token types 0 up to the first [SEP] and 1
    after. Special-token text in the input ("[MASK]") is encoded as plain text, as this project's
    other tokenizers do (transformers would emit the special id)."""

    SPECIAL = {"pad_id": "[PAD]", "bos_id": "[CLS]", "eos_id": "[SEP]", "unk_id": "[UNK]"}

    def __init__(self, path: str):
        self.path, self.sp = path, load_sentencepiece(path)
        n = self.sp.GetPieceSize()
        ids = {self.sp.IdToPiece(i): i for i in range(n)}
        for attr, piece in self.SPECIAL.items():
            if piece not in ids:
                raise ValueError(f"{path}: no piece {piece!r}; not a DeBERTa-v2/v3 spm.model "
                                 f"(it has {', '.join(self.SPECIAL.values())} as pieces)")
            setattr(self, attr, ids[piece])
        self.cls_id, self.sep_id = self.bos_id, self.eos_id
        self.mask_id = ids.get("[MASK]", n)
        self.vocab_size = max(n, self.mask_id + 1)
        # the pieces a word can be made of: normal and user-defined ones (not [PAD], [CLS], ...)
        self.pieces = {self.sp.IdToPiece(i): (i, self.sp.GetScore(i)) for i in range(n)
                       if not (self.sp.IsControl(i) or self.sp.IsUnknown(i) or self.sp.IsUnused(i))}
        self.unk_score = min(self.sp.GetScore(i) for i in range(n)) - 10.0
        self.longest = max(map(len, self.pieces))
        self.space = re.compile(f"[{re.escape(WHITE_SPACE)}]{{2,}}|[\n\r\t]")
        self.cache = {}

    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", self.space.sub(" ", text)).rstrip(WHITE_SPACE)

    def segment(self, word: str) -> list[int]:
        """Viterbi over one word: best[e] = max over pieces w[s:e] of best[s] + score."""
        if word in self.cache:
            return self.cache[word]
        L = len(word)
        best = [0.0] + [-math.inf] * L
        back = [None] * (L + 1)                     # (start, id) of the last piece of the best path to e
        for s in range(L):
            if best[s] == -math.inf:
                continue
            covered = False
            for e in range(s + 1, min(L, s + self.longest) + 1):
                hit = self.pieces.get(word[s:e])
                if hit is None:
                    continue
                covered |= e == s + 1
                if best[s] + hit[1] > best[e]:
                    best[e], back[e] = best[s] + hit[1], (s, hit[0])
            if not covered and best[s] + self.unk_score > best[s + 1]:
                best[s + 1], back[s + 1] = best[s] + self.unk_score, (s, self.unk_id)
        out, e = [], L
        while e > 0:
            s, i = back[e]
            if not (i == self.unk_id and out and out[-1] == self.unk_id):    # fuse runs of [UNK]
                out.append(i)
            e = s
        out.reverse()
        if len(self.cache) < 1 << 20:
            self.cache[word] = out
        return out

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        """[CLS] text [SEP] (DeBERTa's single-sequence format)."""
        text = self.normalize(text)
        ids = []
        if text:
            text = text.replace(" ", "\u2581")
            text = text if text.startswith("\u2581") else "\u2581" + text
            for word in re.findall("\u2581[^\u2581]*", text):
                ids += self.segment(word)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_pair(self, a: str, b: str | None = None, max_length: int | None = None,
                    token_types: bool = False):
        """[CLS] A [SEP] B [SEP] (or [CLS] A [SEP]), cut to max_length tokens longest-first as
        transformers does; with token_types also the segment ids (0 for [CLS] A [SEP], 1 after)."""
        x = self.encode(a, bos=False, eos=False)
        y = self.encode(b, bos=False, eos=False) if b else None        # "" counts as no B, as in transformers
        if max_length is not None:
            x, y = truncate_longest_first(x, y, max_length - (3 if y is not None else 2))
        ids = [self.cls_id] + x + [self.sep_id] + (y + [self.sep_id] if y is not None else [])
        if not token_types:
            return ids
        return ids, [0] * (len(x) + 2) + [1] * (len(ids) - len(x) - 2)

    def decode(self, ids, skip_special: bool = True) -> str:
        special = {self.pad_id, self.bos_id, self.eos_id, self.mask_id} | ({self.unk_id} if skip_special else set())
        n = self.sp.GetPieceSize()
        text = "".join(self.sp.IdToPiece(int(i)) if int(i) < n else "[MASK]"
                       for i in ids if not (skip_special and int(i) in special))
        return text.replace("\u2581", " ").removeprefix(" ")


def load_tokenizer(path: str):
    """A tokenizer from a file or a checkpoint directory: vocab.json + merges.txt (GPT-2 BPE:
    RoBERTa, BART), sentencepiece.bpe.model / sentence.bpe.model (mBART), spm.model (DeBERTa-v2/v3),
    tokenizer.model in sentencepiece format (LLaMA 1/2, llama2.c) or tiktoken format (LLaMA 3)."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "spm.model")):     # DeBERTa-v2/v3
        path = os.path.join(path, "spm.model")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "vocab.json")):
            merges = os.path.join(path, "merges.txt")
            if not os.path.exists(merges):
                raise ValueError(f"{path}: has vocab.json but no merges.txt (GPT-2 BPE needs both)")
            return GPT2BPETokenizer(os.path.join(path, "vocab.json"), merges)
        for name in ("sentencepiece.bpe.model", "sentence.bpe.model"):
            if os.path.exists(os.path.join(path, name)):
                return MBartTokenizer(os.path.join(path, name))
        if not os.path.exists(os.path.join(path, "tokenizer.model")):
            raise ValueError(f"{path}: no tokenizer found (expected tokenizer.model, vocab.json + merges.txt, "
                             f"sentencepiece.bpe.model or spm.model)")
        path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such tokenizer file")
    if os.path.basename(path) in ("sentencepiece.bpe.model", "sentence.bpe.model"):
        return MBartTokenizer(path)
    if os.path.basename(path) == "spm.model":
        return DebertaTokenizer(path)
    with open(path, "rb") as f:
        first = f.readline(4096)
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path)
