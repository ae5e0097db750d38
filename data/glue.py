"""GLUE from the original TSV files (download_glue_data.py's layout: TASK/train.tsv, TASK/dev.tsv;
MNLI's dev_matched.tsv and dev_mismatched.tsv), read as the legacy transformers processors read
them: tab-separated, quoting off (sentences contain quotes), utf-8-sig (MRPC starts with a BOM).

Labels follow transformers' GLUE ids (the ones He et al. trained with): MNLI entailment 0, neutral
1, contradiction 2; QNLI and RTE entailment 0, not_entailment 1; CoLA, SST-2, MRPC, QQP and WNLI
the file's 0/1; STS-B a float in [0, 5] (regression, num_labels 1).
"""
import csv
import os

import torch

from data import pad

# task -> (folder, has header, text columns, label column, label map (None: a float score),
#          first header field (a check that the file is this task's))
TASKS = {
    "cola": ("CoLA", False, (3,), 1, {"0": 0, "1": 1}, None),
    "sst2": ("SST-2", True, (0,), 1, {"0": 0, "1": 1}, "sentence"),
    "mrpc": ("MRPC", True, (3, 4), 0, {"0": 0, "1": 1}, "Quality"),
    "stsb": ("STS-B", True, (7, 8), 9, None, "index"),
    "qqp": ("QQP", True, (3, 4), 5, {"0": 0, "1": 1}, "id"),
    "mnli": ("MNLI", True, (8, 9), -1, {"entailment": 0, "neutral": 1, "contradiction": 2}, "index"),
    "qnli": ("QNLI", True, (1, 2), 3, {"entailment": 0, "not_entailment": 1}, "index"),
    "rte": ("RTE", True, (1, 2), 3, {"entailment": 0, "not_entailment": 1}, "index"),
    "wnli": ("WNLI", True, (1, 2), 3, {"0": 0, "1": 1}, "index"),
}
# evaluation splits: name -> file (MNLI has two, as the paper's MNLI-m / MNLI-mm)
EVAL_SPLITS = {t: {t: "dev.tsv"} for t in TASKS}
EVAL_SPLITS["mnli"] = {"mnli-m": "dev_matched.tsv", "mnli-mm": "dev_mismatched.tsv"}


def num_labels(task: str) -> int:
    check_task(task)
    labels = TASKS[task][4]
    return 1 if labels is None else len(labels)


def check_task(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; valid: {', '.join(TASKS)}")


def split_file(task: str, data: str, split: str = "train") -> str:
    """The TSV of a split: `data` is the task's folder (with train.tsv, dev.tsv) or the GLUE root
    (with the task's folder in it), or a .tsv file itself. split: train, or an EVAL_SPLITS name."""
    check_task(task)
    if os.path.isfile(data):
        return data
    name = "train.tsv" if split == "train" else EVAL_SPLITS[task].get(split)
    if name is None:
        raise ValueError(f"GLUE {task} has no split {split!r}; valid: train, {', '.join(EVAL_SPLITS[task])}")
    for folder in (data, os.path.join(data, TASKS[task][0])):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{data}: no {name} for GLUE {task} (looked in {data} and "
                            f"{os.path.join(data, TASKS[task][0])})")


def load_glue(task: str, path: str) -> list[dict]:
    """Rows of a GLUE TSV -> [{"text_a", "text_b" (None for single sentences), "label"}]. A row with
    too few columns or an unknown label is an error naming the file, the line and the column; QQP's
    rows with missing columns are skipped, as the reference processor does (IndexError)."""
    check_task(task)
    _, header, text_cols, label_col, labels, first = TASKS[task]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such GLUE file")
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quotechar=None)
        for line, row in enumerate(reader, 1):
            if header and line == 1:
                if first is not None and (not row or row[0] != first):
                    raise ValueError(f"{path}:1: header starts with {row[:1]}, expected {first!r} (GLUE {task}); "
                                     f"is this the right task's file?")
                continue
            need = max(max(text_cols), label_col) + 1
            if len(row) < need:
                if task == "qqp":
                    continue
                raise ValueError(f"{path}:{line}: {len(row)} columns, expected at least {need} "
                                 f"(column {need} missing) for GLUE {task}")
            raw = row[label_col].strip()
            col = (label_col % len(row)) + 1
            if labels is None:
                try:
                    label = float(raw)
                except ValueError:
                    raise ValueError(f"{path}:{line}: column {col}: score {raw!r} is not a number") from None
            elif raw in labels:
                label = labels[raw]
            else:
                raise ValueError(f"{path}:{line}: column {col}: label {raw!r} is not one of {', '.join(labels)}")
            texts = [row[c] for c in text_cols]
            rows.append({"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else None, "label": label})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def tokenize(tokenizer, row: dict, max_length: int = 512) -> dict:
    """<s> A </s></s> B </s> with transformers' longest-first truncation (RoBERTa's pair format)."""
    return {"input_ids": tokenizer.encode_pair(row["text_a"], row["text_b"], max_length), "label": row["label"]}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded input_ids, attention_mask, and labels (long, or float for STS-B)."""
    ids, mask = pad([e["input_ids"] for e in examples], pad_id)
    dtype = torch.float32 if isinstance(examples[0]["label"], float) else torch.long
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples], dtype=dtype)}
