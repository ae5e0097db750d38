"""XSum (summarisation) and WMT16 en-ro (translation) for BART / mBART.

Files:
  - XSum: JSON lines {"document", "summary"} (the published XSum JSON's fields; "id" optional).
  - WMT16 en-ro: JSON lines {"translation": {"en": ..., "ro": ...}}, or line-aligned text files
    SPLIT.source (English) and SPLIT.target (Romanian).
A directory holds SPLIT.json (or SPLIT.jsonl) or SPLIT.source + SPLIT.target, SPLIT being train,
val (or validation) and test.
"""
import json
import os
import random

from data import pad

TASKS = ("xsum", "wmt16-en-ro")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def split_files(data: str, split: str) -> tuple:
    """(json file,) or (source file, target file) of a split in a directory, or the file given."""
    if os.path.isfile(data):
        return (data,)
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLIT_NAMES)}")
    for name in SPLIT_NAMES[split]:
        for ext in (".json", ".jsonl"):
            if os.path.isfile(os.path.join(data, name + ext)):
                return (os.path.join(data, name + ext),)
        src, tgt = os.path.join(data, name + ".source"), os.path.join(data, name + ".target")
        if os.path.isfile(src) and os.path.isfile(tgt):
            return src, tgt
    raise FileNotFoundError(f"{data}: no {split}.json, {split}.jsonl or {split}.source + {split}.target")


def read_json_lines(path: str) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                rows.append((line, json.loads(text)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line}: not valid JSON (column {e.colno}: {e.msg})") from None
    return rows


def field(path, line, record, *keys):
    value = record
    for i, k in enumerate(keys):
        if not isinstance(value, dict) or k not in value:
            raise ValueError(f"{path}:{line}: missing field {'.'.join(keys[:i + 1])!r}")
        value = value[k]
    if not isinstance(value, str):
        raise ValueError(f"{path}:{line}: field {'.'.join(keys)!r} is a {type(value).__name__}, expected a string")
    return value


def load_pairs(task: str, data: str, split: str = "train", src_lang: str = "en", tgt_lang: str = "ro") -> list[dict]:
    """[{"source", "target"}] of a split. Errors name the file, the line and the field."""
    if task not in TASKS:
        raise ValueError(f"unknown seq2seq task {task!r}; valid: {', '.join(TASKS)}")
    files = split_files(data, split)
    if len(files) == 2:
        if task == "xsum":
            raise ValueError(f"{data}: XSum is JSON lines {{document, summary}}, not .source/.target files")
        with open(files[0], encoding="utf-8") as f:
            src = f.read().splitlines()
        with open(files[1], encoding="utf-8") as f:
            tgt = f.read().splitlines()
        if len(src) != len(tgt):
            raise ValueError(f"{files[0]} has {len(src)} lines but {files[1]} has {len(tgt)}; they must be "
                             f"line-aligned")
        for line, (s, t) in enumerate(zip(src, tgt), 1):
            if not s.strip() or not t.strip():
                raise ValueError(f"{files[0] if not s.strip() else files[1]}:{line}: empty line")
        return [{"source": s, "target": t} for s, t in zip(src, tgt)]
    path = files[0]
    out = []
    for line, r in read_json_lines(path):
        if task == "xsum":
            out.append({"source": field(path, line, r, "document"), "target": field(path, line, r, "summary")})
        else:
            out.append({"source": field(path, line, r, "translation", src_lang),
                        "target": field(path, line, r, "translation", tgt_lang)})
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def encode(tokenizer, text: str, max_length: int, lang: str | None = None) -> list[int]:
    """BART: <s> text </s>; mBART (lang given): text </s> lang_code. Cut to max_length tokens,
    the special tokens kept (as transformers truncates)."""
    if lang is None:
        return tokenizer.encode_pair(text, None, max_length)
    ids = tokenizer.encode(text, lang)
    return ids if len(ids) <= max_length else ids[:max_length - 2] + ids[-2:]


def tokenize(tokenizer, pair: dict, max_source: int, max_target: int, src_lang=None, tgt_lang=None) -> dict:
    return {"input_ids": encode(tokenizer, pair["source"], max_source, src_lang),
            "labels": encode(tokenizer, pair["target"], max_target, tgt_lang)}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded sources with their attention_mask, and labels padded with -100."""
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    labels, _ = pad([e["labels"] for e in examples], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_batches(lengths: list[int], max_tokens: int, seed: int, chunk: int = 100) -> list[list[int]]:
    """Dynamic batching by token budget (fairseq's --max-tokens; He et al.'s max_tokens_per_batch):
    a seeded shuffle, sorted by length within chunks of `chunk`·(typical batch) examples, then
    packed so that batch size × its longest sequence stays within max_tokens; batches in a seeded
    random order. `lengths`: max(source, target) length of each example."""
    if max(lengths) > max_tokens:
        raise ValueError(f"an example has {max(lengths)} tokens, more than max_tokens={max_tokens}")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    per = max(1, max_tokens // max(1, sum(lengths) // len(lengths)))
    batches = []
    for start in range(0, len(order), chunk * per):
        group = sorted(order[start:start + chunk * per], key=lambda i: lengths[i])
        batch, longest = [], 0
        for i in group:
            if batch and (len(batch) + 1) * max(longest, lengths[i]) > max_tokens:
                batches.append(batch)
                batch, longest = [], 0
            batch.append(i)
            longest = max(longest, lengths[i])
        if batch:
            batches.append(batch)
    random.Random(seed + 1).shuffle(batches)
    return batches
