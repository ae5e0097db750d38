"""Tokenizers: text <-> token ids, id-for-id as the checkpoints' own tokenizers.

  - SentencePieceTokenizer: LLaMA 1/2 and llama2.c (sentencepiece tokenizer.model);
  - TiktokenTokenizer: LLaMA 3 (tiktoken-format tokenizer.model, Meta's split pattern and
    special tokens);
  - GPT2BPETokenizer: RoBERTa and BART (GPT-2's byte-level BPE from vocab.json + merges.txt, run by
    tiktoken);
  - MBartTokenizer: mBART (sentencepiece with fairseq's ids and the language codes);
  - DebertaTokenizer: DeBERTa-v2/v3 (spm.model's unigram pieces, transformers' pipeline);
  - ByteLevelBPETokenizer: byte-level BPE from a Hugging Face tokenizer.json (SmolLM2, Llama 3,
    Qwen2, ...) or from a GGUF file's "gpt2" vocabulary, run by tiktoken;
  - a GGUF file's "llama" vocabulary becomes a sentencepiece model (SentencePieceTokenizer).
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
    """LLaMA 1/2 (and llama2.c) sentencepiece tokenizer.model, or `sp`, a processor already loaded
    (one built from a GGUF file). encode adds BOS unless told otherwise (add_bos: the default)."""

    def __init__(self, path: str, sp=None, add_bos: bool = True, add_eos: bool = False):
        self.path, self.sp = path, sp if sp is not None else load_sentencepiece(path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.vocab_size = self.sp.vocab_size()
        self.add_bos, self.add_eos = add_bos, add_eos

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        bos, eos = self.add_bos if bos is None else bos, self.add_eos if eos is None else eos
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


class ByteLevelBPETokenizer:
    """Byte-level BPE (GPT-2's scheme: SmolLM2, Llama 3, Qwen2, ...) from a Hugging Face
    tokenizer.json or a GGUF file's "gpt2" vocabulary, run by tiktoken; id for id as transformers'
    fast tokenizer (the tokenizers library) runs the tokenizer.json, and with the regexes llama.cpp
    gives a GGUF's tokenizer.ggml.pre:

      1. added tokens ("<|im_start|>") are found in the text first, leftmost-longest, with their
         single_word, lstrip and rstrip rules (tokenizers' AddedVocabulary: the tokens not
         `normalized` in the whole text, then the normalized ones in what is left); each is its id;
      2. the rest is cut by the pre-tokenizer's Split regexes in turn (behavior Isolated: the matches
         and the gaps between them are pieces); ByteLevel puts a space before each piece that lacks
         one when add_prefix_space is set, and its regex (GPT-2's, when use_regex) cuts the pieces
         that BPE merges;
      3. a piece's UTF-8 bytes are merged by tiktoken, whose ranks are the 256 single bytes then the
         merges in file order, mapped to the file's ids through its vocabulary. A byte the vocabulary
         lacks (SmolLM2 has no 0x04) is dropped before merging, as tokenizers does without an
         unk_token: text with one takes a slower path that splits and merges in Python;
      4. BOS and EOS where the post-processor's template puts them (`add_bos`, `add_eos`: encode's
         defaults).
    decode joins the tokens' bytes (a token outside GPT-2's byte alphabet is its own UTF-8, as in
    tokenizers' ByteLevel decoder) and skips special tokens unless skip_special=False."""

    def __init__(self, path: str, vocab: dict[str, int], merges: list, added: list[dict], splits: list[str],
                 pattern: str | None, add_prefix_space: bool, bos_id: int | None, eos_id: int | None,
                 pad_id: int | None = None, add_bos: bool = False, add_eos: bool = False):
        """vocab: token (spelled in GPT-2's byte alphabet) -> id; merges: (left, right) pairs, first
        merged first; added: the added tokens as tokenizer.json lists them ({"id", "content",
        "special", "single_word", "lstrip", "rstrip", "normalized"}); splits: the Split regexes
        before ByteLevel; pattern: ByteLevel's regex (None: use_regex off); pad_id None: eos_id."""
        import numpy as np
        import regex                                # tiktoken's own dependency
        import tiktoken
        self.path, self.regex = path, regex
        b2u = bytes_to_unicode()
        self.u2b = {c: b for b, c in b2u.items()}
        self.ranks = {bytes([b]): b for b in range(256)}
        for n, (left, right) in enumerate(merges):
            if left + right not in vocab or not all(c in self.u2b for c in left + right):
                raise ValueError(f"{path}: merge {n} ({left!r} {right!r}) builds a token that is not in the "
                                 f"vocabulary, or not in GPT-2's byte alphabet")
            self.ranks.setdefault(self.token_bytes(left + right), len(self.ranks))
        self.rank_to_id = np.array([vocab.get("".join(b2u[b] for b in token), -1) for token in self.ranks])
        self.absent = bytes(b for b in range(256) if self.rank_to_id[b] < 0)    # bytes BPE drops

        # The regexes but the last run here; the last in tiktoken, with a second branch that keeps
        # what it does not match as a piece, as Split does. add_prefix_space puts its space on the
        # pieces of the Split regexes, before ByteLevel's own regex (or none: the whole piece).
        steps = list(splits)
        if pattern or add_prefix_space or not steps:
            steps.append(pattern or r"[\s\S]+")
        last = f"(?:{steps[-1]})|(?:(?!(?:{steps[-1]}))[\\s\\S])+"
        try:
            self.splits = [regex.compile(p) for p in steps]
            self.enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=last,
                                         mergeable_ranks=self.ranks, special_tokens={})
        except Exception as e:
            raise ValueError(f"{path}: a pre-tokenizer regex does not compile ({type(e).__name__}: {e})") from None
        self.add_prefix_space = add_prefix_space

        self.added = {t["content"]: t for t in added if t["content"]}
        self.matchers = [self.matcher([t for t in added if not t.get("normalized")]),
                         self.matcher([t for t in added if t.get("normalized")])]
        self.word = regex.compile(r"\w")
        self.special_ids = {t["id"] for t in added if t.get("special")}
        self.id_to_bytes = {i: self.token_bytes(t) for t, i in vocab.items()}
        self.id_to_bytes.update({t["id"]: self.token_bytes(t["content"]) for t in added})
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        self.add_bos, self.add_eos = add_bos, add_eos
        self.vocab_size = max(self.id_to_bytes) + 1

    def token_bytes(self, token: str) -> bytes:
        """A token's bytes: its GPT-2 byte-alphabet spelling read back, or its UTF-8 outside it."""
        try:
            return bytes(self.u2b[c] for c in token)
        except KeyError:
            return token.encode()

    def matcher(self, tokens: list[dict]):
        """One regex for the added tokens' texts, longest first: leftmost-longest matching."""
        texts = sorted({t["content"] for t in tokens if t["content"]}, key=len, reverse=True)
        return self.regex.compile("|".join(map(self.regex.escape, texts))) if texts else None

    def split_added(self, text: str, matcher) -> list:
        """text -> its pieces: plain text (str) and the ids of the added tokens in it (int), as
        tokenizers' AddedVocabulary.find_matches cuts them."""
        if matcher is None:
            return [text] * (text != "")
        out, done = [], 0
        for m in matcher.finditer(text):
            token, (start, stop) = self.added[m.group()], m.span()
            if token.get("single_word") and ((start > 0 and self.word.match(text, start - 1))
                                             or (stop < len(text) and self.word.match(text, stop))):
                continue
            if token.get("lstrip"):
                start = max(len(text[:start].rstrip(WHITE_SPACE)), done)
            if token.get("rstrip"):
                stop = len(text) - len(text[stop:].lstrip(WHITE_SPACE))
            out += [text[done:start]] * (done < start) + [token["id"]]
            done = stop
        return out + [text[done:]] * (done < len(text))

    @staticmethod
    def isolate(pattern, text: str) -> list[str]:
        """Split with behavior Isolated: the matches and the gaps between them, in order."""
        pieces, done = [], 0
        for m in pattern.finditer(text):
            pieces += [text[done:m.start()]] * (done < m.start()) + [m.group()] * (m.end() > m.start())
            done = m.end()
        return pieces + [text[done:]] * (done < len(text))

    def bpe(self, data: bytes) -> list[int]:
        """tiktoken's merge loop, in Python: merge the adjacent pair whose concatenation ranks lowest."""
        parts = [data] if data in self.ranks else [data[i:i + 1] for i in range(len(data))]
        while len(parts) > 1:
            rank, i = min((self.ranks.get(parts[i] + parts[i + 1], math.inf), i) for i in range(len(parts) - 1))
            if rank == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [int(self.rank_to_id[self.ranks[p]]) for p in parts]

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of text without added tokens: pre-tokenizer, then BPE."""
        pieces = [text]
        for split in self.splits[:-1]:
            pieces = [p for piece in pieces for p in self.isolate(split, piece)]
        if self.add_prefix_space:
            pieces = [p if p.startswith(" ") else " " + p for p in pieces]
        if self.absent and any(len(p.encode().translate(None, self.absent)) < len(p.encode()) for p in pieces):
            return [i for piece in pieces for p in self.isolate(self.splits[-1], piece)
                    for i in self.bpe(p.encode().translate(None, self.absent))]
        return [i for p in pieces for i in self.rank_to_id[self.enc.encode_ordinary(p)].tolist()]

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = None) -> list[int]:
        """Token ids of text, with BOS / EOS where bos / eos say (None: where the tokenizer's
        post-processor puts them, what transformers' tokenizer(text) gives)."""
        bos, eos = self.add_bos if bos is None else bos, self.add_eos if eos is None else eos
        for wanted, name, i in ((bos, "BOS", self.bos_id), (eos, "EOS", self.eos_id)):
            if wanted and i is None:
                raise ValueError(f"{self.path}: has no {name} token (none is named in its configuration)")
        ids = []
        for piece in self.split_added(text, self.matchers[0]):
            for p in [piece] if isinstance(piece, int) else self.split_added(piece, self.matchers[1]):
                ids += [p] if isinstance(p, int) else self.encode_plain(p)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids, skip_special: bool = True) -> str:
        skip = self.special_ids if skip_special else ()
        data = b"".join(self.id_to_bytes.get(int(i), b"") for i in ids if int(i) not in skip)
        return data.decode("utf-8", errors="replace")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read as JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def json_pre_tokenizer(spec: dict | None, refuse) -> tuple[list[str], str | None, bool]:
    """A tokenizer.json pre_tokenizer -> (Split regexes, ByteLevel's regex or None, add_prefix_space).
    Supported: ByteLevel, or a Sequence of Split (behavior Isolated) / Digits steps ending in ByteLevel."""
    import regex
    supported = "ByteLevel, Split+ByteLevel, Digits+ByteLevel"
    if spec is None:
        refuse("pre_tokenizer null", supported)
    steps = spec.get("pretokenizers", []) if spec.get("type") == "Sequence" else [spec]
    splits = []
    for n, step in enumerate(steps):
        kind = (step or {}).get("type")
        if kind == "ByteLevel" and n == len(steps) - 1:
            pattern = GPT2BPETokenizer.PATTERN if step.get("use_regex", True) else None
            return splits, pattern, bool(step.get("add_prefix_space", True))
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            pattern = step.get("pattern") or {}
            splits.append(pattern["Regex"] if "Regex" in pattern else regex.escape(pattern.get("String", "")))
        elif kind == "Digits":
            splits.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "Split":
            refuse(f"pre_tokenizer Split with behavior {step.get('behavior')}"
                   f"{' and invert' if step.get('invert') else ''}", "Split with behavior Isolated")
        else:
            refuse(f"pre_tokenizer {kind}{' before the last step' if kind == 'ByteLevel' else ''}", supported)
    refuse("pre_tokenizer without a final ByteLevel", supported)


def json_template(post: dict | None, refuse) -> tuple[int | None, int | None]:
    """A tokenizer.json post_processor -> the ids its single-sequence template puts before and after
    the text (None: nothing). Supported: TemplateProcessing ([BOS] $A [EOS]), ByteLevel, null, and a
    Sequence of those."""
    supported = "TemplateProcessing, ByteLevel, null"
    steps = post.get("processors", []) if post and post.get("type") == "Sequence" else [post] if post else []
    ends = None, None
    for step in steps:
        if step.get("type") == "ByteLevel":
            continue
        if step.get("type") != "TemplateProcessing":
            refuse(f"post_processor {step.get('type')}", supported)
        names = [item["Sequence"]["id"] if "Sequence" in item else item.get("SpecialToken", {}).get("id")
                 for item in step.get("single", [])]
        if names.count("A") != 1 or names.index("A") > 1 or len(names) - names.index("A") > 2:
            refuse(f"post_processor template {' '.join(map(str, names))}", "[BOS] $A [EOS], each optional")
        ids = [step.get("special_tokens", {}).get(name, {}).get("ids") for name in names]
        if any(name != "A" and (not isinstance(i, list) or len(i) != 1) for name, i in zip(names, ids)):
            refuse(f"post_processor template token with ids {ids}", "one id per special token")
        a = names.index("A")
        ends = (ids[0][0] if a == 1 else None), (ids[-1][0] if a == len(names) - 2 else None)
    return ends


def tokenizer_from_json(path: str) -> ByteLevelBPETokenizer:
    """A Hugging Face tokenizer.json, with the tokenizer_config.json (or special_tokens_map.json)
    beside it for the bos/eos/pad tokens, -> ByteLevelBPETokenizer. Whether BOS and EOS are added is
    the post-processor's template, as in transformers 5 (it drops tokenizer_config.json's
    add_bos_token and add_eos_token when a tokenizer.json is there). What it cannot reproduce exactly
    is refused by name."""
    spec = read_json(path)

    def refuse(piece: str, supported: str):
        raise ValueError(f"{path}: {piece} is not supported (supported: {supported})")

    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        refuse(f"model {model.get('type')}", "BPE")
    for key, allowed in (("dropout", (None,)), ("byte_fallback", (False, None)),
                         ("continuing_subword_prefix", (None, "")), ("end_of_word_suffix", (None, ""))):
        if model.get(key) not in allowed:
            refuse(f"model {key} {model[key]!r}", f"{key} {' or '.join(map(repr, allowed))}")
    if spec.get("normalizer") is not None:
        refuse(f"normalizer {spec['normalizer'].get('type')}", "null")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        refuse(f"decoder {(spec.get('decoder') or {}).get('type')}", "ByteLevel")
    splits, pattern, add_prefix_space = json_pre_tokenizer(spec.get("pre_tokenizer"), refuse)
    before, after = json_template(spec.get("post_processor"), refuse)

    vocab, merges, added = model.get("vocab") or {}, [], spec.get("added_tokens") or []
    for n, merge in enumerate(model.get("merges") or []):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2:
            raise ValueError(f"{path}: merge {n} is {merge!r}, not two tokens")
        merges.append(tuple(pair))
    alphabet = set(bytes_to_unicode().values())
    if model.get("unk_token") is not None and not alphabet <= vocab.keys():
        refuse("model unk_token with single bytes missing from the vocabulary", "unk_token null")
    if model.get("ignore_merges"):            # tiktoken's whole-piece lookup knows only merged tokens
        built = {a + b for a, b in merges} | alphabet | {t["content"] for t in added}
        unbuilt = [t for t in vocab if t not in built and set(t) <= alphabet]
        if unbuilt:
            refuse(f"model ignore_merges with tokens no merge builds ({unbuilt[0]!r}, ...)", "ignore_merges false")

    directory, config = os.path.dirname(path), {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):      # the config wins
        if os.path.exists(os.path.join(directory, name)):
            config.update({k: v for k, v in read_json(os.path.join(directory, name)).items() if v is not None})
    ids = {**vocab, **{t["content"]: t["id"] for t in added}}

    def named(key: str) -> int | None:
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and token not in ids:
            raise ValueError(f"{directory}: its {key} {token!r} is not in {path}'s vocabulary")
        return ids.get(token)

    bos_id = before if before is not None else named("bos_token")
    eos_id = after if after is not None else named("eos_token")
    return ByteLevelBPETokenizer(path, vocab, merges, added, splits, pattern, add_prefix_space, bos_id, eos_id,
                                 named("pad_token"), add_bos=before is not None, add_eos=after is not None)


# llama.cpp's pre-tokenizers (tokenizer.ggml.pre, src/llama-vocab.cpp) -> the regexes it splits with,
# in turn: Split regexes, then the one whose pieces BPE merges.
GGUF_PRE_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS = {
    "gpt-2": ([], GPT2BPETokenizer.PATTERN),
    "smollm": ([r"\p{N}"], GPT2BPETokenizer.PATTERN),        # = SmolLM2's tokenizer.json: Digits, ByteLevel
    "starcoder": ([r"\p{N}"], GPT2BPETokenizer.PATTERN),
    "llama-bpe": ([], TiktokenTokenizer.PATTERN),
    "llama3": ([], TiktokenTokenizer.PATTERN),
    "llama-v3": ([], TiktokenTokenizer.PATTERN),
    "qwen2": ([], GGUF_PRE_QWEN2),
}
GGUF_MISSING = "reading GGUF files needs the gguf package: pip install -r requirements-gguf.txt"


def read_gguf_tokenizer(path: str) -> dict:
    """The tokenizer.* metadata of a GGUF file, as Python values (read by the gguf package)."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: {GGUF_MISSING}") from None
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:
        raise ValueError(f"{path}: cannot read as a GGUF file ({type(e).__name__}: {e})") from None
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def tokenizer_from_gguf(path: str):
    """The tokenizer in a GGUF file's metadata: tokenizer.ggml.model "gpt2" (byte-level BPE) ->
    ByteLevelBPETokenizer, "llama" (sentencepiece) -> SentencePieceTokenizer."""
    meta = read_gguf_tokenizer(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return gguf_byte_level(path, meta)
    if kind == "llama":
        return gguf_sentencepiece(path, meta)
    raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")


def gguf_byte_level(path: str, meta: dict) -> ByteLevelBPETokenizer:
    """A GGUF "gpt2" vocabulary as transformers reads it (integrations/gguf): tokens (respelled in
    GPT-2's byte alphabet where they are not), merges, control tokens (type 3) as special added
    tokens and user-defined ones (type 4) as plain added tokens, when spelled in the byte alphabet;
    BOS/EOS added as tokenizer.ggml.add_bos_token / add_eos_token say (absent: no, as transformers
    reads it); the pre-tokenizer regexes llama.cpp gives tokenizer.ggml.pre (transformers 5.23 knows
    no "smollm" and splits SmolLM2's digits as GPT-2 does, unlike llama.cpp and SmolLM2's own
    tokenizer.json: "x  123" differs)."""
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                         f"{', '.join(GGUF_PRE_TOKENIZERS)})")
    splits, pattern = GGUF_PRE_TOKENIZERS[pre]
    b2u = bytes_to_unicode()
    alphabet = set(b2u.values())
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t if set(t) <= alphabet else "".join(b2u[b] for b in t.encode()): i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{path}: a GGUF without tokenizer.ggml.merges is not supported (supported: gpt2 "
                         f"vocabularies with their merges)")
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    if any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: a tokenizer.ggml.merges entry is not two space-separated tokens")
    added = [{"id": i, "content": t, "special": kind == 3} for i, (t, kind) in enumerate(zip(tokens, types))
             if kind in (3, 4) and set(t) <= alphabet]
    ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding")}
    return ByteLevelBPETokenizer(path, vocab, merges, added, splits, pattern, False, ids["bos"], ids["eos"],
                                 ids["padding"], add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                                 add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def gguf_sentencepiece(path: str, meta: dict) -> SentencePieceTokenizer:
    """A GGUF "llama" vocabulary (LLaMA 1/2's sentencepiece BPE) -> a sentencepiece model built in
    memory from its pieces, scores and token types (GGUF's types are sentencepiece's), with LLaMA's
    normaliser (identity, a dummy prefix unless tokenizer.ggml.add_space_prefix is false)."""
    try:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise ValueError(f"{path}: building a sentencepiece model from a GGUF file needs sentencepiece and "
                         f"protobuf: pip install sentencepiece protobuf ({e})") from None
    if meta.get("tokenizer.ggml.precompiled_charsmap"):
        raise ValueError(f"{path}: tokenizer.ggml.precompiled_charsmap is not supported (supported: none)")
    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if scores is None or len(scores) != len(tokens) or len(types) != len(tokens):
        raise ValueError(f"{path}: a sentencepiece vocabulary needs as many scores and token types as tokens")
    if not set(types) <= {1, 2, 3, 4, 5, 6}:
        raise ValueError(f"{path}: token types {sorted(set(types) - {1, 2, 3, 4, 5, 6})} are not sentencepiece's")
    model = pb.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        model.pieces.add(piece=token, score=score, type=kind)
    spec = model.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(tokens), 6 in types
    for key, name in (("unk_id", "unknown"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        setattr(spec, key, meta.get(f"tokenizer.ggml.{name}_token_id", -1))
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    model.normalizer_spec.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model.SerializeToString())
    except Exception as e:
        raise ValueError(f"{path}: its vocabulary does not make a sentencepiece model ({e})") from None
    return SentencePieceTokenizer(path, sp, add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                                  add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def load_tokenizer(path: str):
    """A tokenizer from a file or a checkpoint directory: vocab.json + merges.txt (GPT-2 BPE:
    RoBERTa, BART), sentencepiece.bpe.model / sentence.bpe.model (mBART), spm.model (DeBERTa-v2/v3),
    tokenizer.model in sentencepiece format (LLaMA 1/2, llama2.c) or tiktoken format (LLaMA 3); where
    a directory has none of those, its tokenizer.json (byte-level BPE) or its one GGUF file."""
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
        if os.path.exists(os.path.join(path, "tokenizer.model")):
            path = os.path.join(path, "tokenizer.model")
        elif os.path.exists(os.path.join(path, "tokenizer.json")):
            return tokenizer_from_json(os.path.join(path, "tokenizer.json"))
        else:
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                return tokenizer_from_gguf(os.path.join(path, ggufs[0]))
            raise ValueError(f"{path}: " + (f"has several GGUF files ({', '.join(ggufs)}): name one" if ggufs else
                             "no tokenizer found (expected tokenizer.model, vocab.json + merges.txt, "
                             "sentencepiece.bpe.model, spm.model, tokenizer.json or a .gguf file)"))
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such tokenizer file")
    if os.path.basename(path) in ("sentencepiece.bpe.model", "sentence.bpe.model"):
        return MBartTokenizer(path)
    if os.path.basename(path) == "spm.model":
        return DebertaTokenizer(path)
    if path.endswith(".json"):
        return tokenizer_from_json(path)
    with open(path, "rb") as f:
        first = f.readline(4096)
    if first.startswith(b"GGUF"):
        return tokenizer_from_gguf(path)
    if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path)
