"""Plain text for language-model training and perplexity (LongLoRA, Table 7).

Training (LongLoRA's RedPajama pipeline): documents tokenized, joined into one stream and cut into
rows of exactly L tokens, in one of two layouts (`stream`):
  - "document" (the default): each document between BOS and EOS;
  - "longlora": LongLoRA's fine-tune.py. datasets' map(batched=True) hands its tokenize_fn 1,000
    documents at a time; it joins them with EOS, tokenizes the result with one BOS and pads its end
    with [PAD] to a multiple of L (pad_to_multiple_of), so no row straddles two batches. [PAD] is
    the id after the vocabulary, the row methods.add_pad_token adds; Rows(pad_id=...) gives it no
    loss, as LongLoRA's DataCollatorForLanguageModeling does (labels -100 where the input is [PAD]).
    Each document is encoded on its own (no BOS, no EOS), as LLaMA's tokenizer encodes the text
    between two special tokens of the joined string.
The stream is written once to a token file
(uint16, or uint32 for vocabularies past 65,535) and read back through a memory map, so a large
corpus never sits in memory. Evaluation reads a token file as LongLoRA ships proof-pile's
(`test_sampled_data.bin`: uint16 LLaMA tokens) or tokenizes text the same way.

Documents: a .txt file (one document), JSON lines with a "text" field (RedPajama's sample format;
records without one: their string fields joined by newlines, e.g. question and answer), or a
folder of such files.
"""
import hashlib
import json
import os
import sys

import numpy as np

from runs import atomic_write, content_hash, json_lines, remove_stale_tmp


def documents(path: str):
    """Yield each document's text, streaming (one file line at a time)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".txt", ".jsonl", ".json")))
        if not files:
            raise ValueError(f"{path}: no .txt, .jsonl or .json files")
        for f in files:
            yield from documents(f)
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such text file or folder")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            yield f.read()
        return
    for n, record in json_lines(path, 'a JSON object with a "text" field'):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {n} is not a JSON object with a \"text\" field")
        text = record.get("text")
        yield text if isinstance(text, str) else "\n".join(v for v in record.values() if isinstance(v, str))


PROBE = "The quick brown fox, 12 345.67 -- jumps\n\tover ünïcödé 漢字 \U0001F600 [x]{y} <s></s>  end"


def tokenizer_fingerprint(tokenizer) -> str:
    """What identifies a tokenizer for a token cache: a hash of its vocabulary size, special ids and
    the ids it gives a fixed text of words, numbers, whitespace and non-ASCII characters."""
    ids = tokenizer.encode(PROBE, bos=True, eos=True)
    what = [tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "pad_id", None), ids]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


LAYOUTS = ("document", "longlora")
LONGLORA_BATCH = 1000          # datasets' map(batched=True) default batch_size, which fine-tune.py keeps


def stream(docs, tokenizer, layout: str = "document", row_len: int | None = None,
           batch_docs: int = LONGLORA_BATCH, pad_id: int | None = None):
    """The token stream of an iterable of documents, in pieces (lists of ids) to write one after
    the other. "document": BOS doc EOS per document. "longlora": per `batch_docs` documents,
    BOS d1 EOS d2 EOS … dk, then [PAD] (pad_id; default: the tokenizer's vocabulary size, the id
    methods.add_pad_token gives it) up to a multiple of row_len."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown text layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if layout == "document":
        for doc in docs:
            yield tokenizer.encode(doc, bos=True, eos=True)
        return
    if not row_len or row_len <= 0:
        raise ValueError("the longlora layout pads each batch of documents to a multiple of the row length: "
                         "give row_len")
    pad = tokenizer.vocab_size if pad_id is None else pad_id
    batch = []

    def joined(batch):
        ids = [tokenizer.bos_id]
        for k, doc in enumerate(batch):
            ids += ([tokenizer.eos_id] if k else []) + tokenizer.encode(doc, bos=False, eos=False)
        return ids + [pad] * (-len(ids) % row_len)
    for doc in docs:
        batch.append(doc)
        if len(batch) == batch_docs:
            yield joined(batch)
            batch = []
    if batch:
        yield joined(batch)


def token_file(data: str, tokenizer, out_path: str, layout: str = "document",
               row_len: int | None = None) -> np.ndarray:
    """Tokenize `data` once into `out_path` and return its tokens as a memory map. The file is a
    cache keyed by what made it: OUT_PATH.meta.json records the data's content hash, the
    tokenizer's fingerprint and the dtype, and a cache made from anything else (or without that
    record) is tokenized again, with a line saying what differed; never reused. Written to a
    temporary file and renamed when complete, the record last: an interrupted run never leaves a
    half-written token file behind to be reused. `layout`, `row_len`: the stream's layout (`stream`;
    "longlora" pads to multiples of row_len with the id after the vocabulary)."""
    ids = tokenizer.vocab_size + (layout == "longlora")                 # [PAD]: one id past the vocabulary
    dtype = np.uint16 if ids <= 2 ** 16 else np.uint32
    if not os.path.exists(data):
        raise FileNotFoundError(f"{data}: no such text file or folder")
    key = {"data": os.path.abspath(data), "data_sha256": content_hash(data),
           "tokenizer": tokenizer_fingerprint(tokenizer), "dtype": np.dtype(dtype).name}
    if layout != "document":
        key.update(layout=layout, row_len=row_len)
    meta_path = out_path + ".meta.json"
    if os.path.exists(out_path):
        recorded = read_json(meta_path)
        if recorded == key or (isinstance(recorded, dict) and {**recorded, "data": key["data"]} == key):
            return read_tokens(out_path, ids, dtype)     # (the same bytes under another path: reused)
        why = ("no record of what it was made from" if not isinstance(recorded, dict) else
               "made from other data" if recorded.get("data_sha256") != key["data_sha256"] else
               "made with another tokenizer" if recorded.get("tokenizer") != key["tokenizer"] else
               "made in another layout" if recorded.get("layout") != key.get("layout") or
               recorded.get("row_len") != key.get("row_len") else "another dtype")
        print(f"{out_path}: {why} ({meta_path}); tokenizing {data} again", file=sys.stderr)
        for p in (meta_path, out_path):
            if os.path.exists(p):
                os.remove(p)
    remove_stale_tmp(out_path)
    tmp = f"{out_path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            for piece in stream(documents(data), tokenizer, layout, row_len):
                f.write(np.asarray(piece, dtype=dtype).tobytes())
        os.replace(tmp, out_path)
    except OSError as e:
        if e.filename not in (None, tmp):                  # reading the data failed: as it is
            raise
        raise OSError(e.errno, f"cannot write {out_path}: {e.strerror or e}") from None     # a full disk
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    atomic_write(meta_path, lambda f: f.write(json.dumps(key, indent=2).encode()))
    return read_tokens(out_path, ids, dtype)


def read_json(path: str):
    """A small JSON file's value, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_tokens(path: str, vocab_size: int, dtype=np.uint16) -> np.ndarray:
    """A token file (LongLoRA's .bin: raw little-endian integers) as a memory map, checked against
    the model's vocabulary."""
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{path}: token id {int(tokens.max())} is outside the model's vocabulary of {vocab_size} "
                         f"(a token file of another tokenizer, or of another dtype than {np.dtype(dtype).name}?)")
    return tokens


class Rows:
    """Rows of exactly L tokens of a token stream, rows [start, stop): rows[i] is a training
    example {"input_ids", "labels"} (the loss on every next token), read from the memory map.
    pad_id: labels -100 where the input is that id (the "longlora" layout's [PAD], no loss)."""

    def __init__(self, tokens, L: int, start: int = 0, stop: int | None = None, pad_id: int | None = None):
        self.tokens, self.L, self.pad_id = tokens, L, pad_id
        self.start, self.stop = start, len(tokens) // L if stop is None else stop

    def __len__(self):
        return max(0, self.stop - self.start)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        j = self.start + i
        ids = self.tokens[j * self.L:(j + 1) * self.L].astype(np.int64).tolist()
        if self.pad_id is None:
            return {"input_ids": ids, "labels": ids}
        return {"input_ids": ids, "labels": [-100 if t == self.pad_id else t for t in ids]}
