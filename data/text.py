"""Plain text for language-model training and perplexity (LongLoRA, Table 7).

Training (LongLoRA's RedPajama pipeline): documents tokenized, each between BOS and EOS, joined into
one stream and cut into rows of exactly L tokens. The stream is written once to a token file
(uint16, or uint32 for vocabularies past 65,535) and read back through a memory map, so a large
corpus never sits in memory. Evaluation reads a token file as LongLoRA ships proof-pile's
(`test_sampled_data.bin`: uint16 LLaMA tokens) or tokenizes text the same way.

Documents: a .txt file (one document), JSON lines with a "text" field (RedPajama's sample format;
records without one: their string fields joined by newlines, e.g. question and answer), or a
folder of such files.
"""
import json
import os

import numpy as np


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
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object with a \"text\" field")
            text = record.get("text")
            yield text if isinstance(text, str) else "\n".join(v for v in record.values() if isinstance(v, str))


def token_file(data: str, tokenizer, out_path: str) -> np.ndarray:
    """Tokenize `data` once into `out_path` (reused when it exists) and return its tokens as a
    memory map. Written to a temporary file and renamed when complete: an interrupted run never
    leaves a half-written token file behind to be reused."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
    if not os.path.exists(out_path):
        tmp = f"{out_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                for doc in documents(data):
                    f.write(np.asarray(tokenizer.encode(doc, bos=True, eos=True), dtype=dtype).tobytes())
            os.replace(tmp, out_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return read_tokens(out_path, tokenizer.vocab_size, dtype)


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
    example {"input_ids", "labels"} (the loss on every next token), read from the memory map."""

    def __init__(self, tokens, L: int, start: int = 0, stop: int | None = None):
        self.tokens, self.L = tokens, L
        self.start, self.stop = start, len(tokens) // L if stop is None else stop

    def __len__(self):
        return max(0, self.stop - self.start)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        j = self.start + i
        ids = self.tokens[j * self.L:(j + 1) * self.L].astype(np.int64).tolist()
        return {"input_ids": ids, "labels": ids}
