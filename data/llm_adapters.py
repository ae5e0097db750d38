"""LLM-Adapters' commonsense and arithmetic data: JSON lists of
{"instruction", "input", "output", "answer"}, their prompts, tokenization and batching.

The prompts are byte-exact copies of LLM-Adapters' finetune.py (training) and
commonsense_evaluate.py / evaluate.py (evaluation), 16-space indentation included; the two differ
in whitespace (two spaces after "request." and a blank line of 16 spaces in training).
"""
import json
import os
import random
import re
import sys

from data import pad

_INDENT = " " * 16
TRAIN_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                f"request.  \n\n{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n{_INDENT}"
                f"### Response:\n{_INDENT}{{output}}")
TRAIN_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request. \n\n"
                      f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n{_INDENT}### Input:\n"
                      f"{_INDENT}{{input}}\n{_INDENT}\n{_INDENT}### Response:\n{_INDENT}{{output}}")
EVAL_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
               f"request. \n\n{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n{_INDENT}### Response:\n{_INDENT}")
EVAL_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n{_INDENT}### Input:\n{_INDENT}{{input}}"
                     f"\n\n{_INDENT}### Response:\n{_INDENT}")

COMMONSENSE = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa"]
MATH = ["AddSub", "MultiArith", "SingleEq", "gsm8k", "AQuA", "SVAMP", "mawps"]
TRAIN_SETS = ["commonsense_170k", "commonsense_15k", "math_10k", "math_7k", "math_14k", "math_50k", "math_data"]
SAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples")
# Where LLM-Adapters' dataset/ and ft-training_set/ folders are: $LLM_ADAPTERS_DATA, else ../shared
DEFAULT_ROOT = os.environ.get("LLM_ADAPTERS_DATA", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data", "llm_adapters"))


def train_prompt(record: dict) -> str:
    template = TRAIN_PROMPT_INPUT if record.get("input") else TRAIN_PROMPT
    return template.format(instruction=record["instruction"], input=record.get("input", ""), output=record["output"])


def train_prompt_only(record: dict) -> str:
    """The training prompt up to "### Response:\n" and its 16 spaces: the training layout, to evaluate in."""
    return train_prompt({**record, "output": ""})


def eval_prompt(record: dict) -> str:
    template = EVAL_PROMPT_INPUT if record.get("input") else EVAL_PROMPT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def option_texts(instruction: str) -> dict[str, str]:
    """The answer options of a commonsense instruction by label: {"solution1": "Blow into tin can ...",
    ...} from its "Solution1: ... Solution2: ..." (Answer, Option, Ending) list before "Answer format:".
    BoolQ's true/false have no list: their text is the label. {} when the instruction has neither."""
    body = instruction.split("Answer format:")[0]
    parts = re.split(r"(?:^|\s)(Solution|Answer|Option|Ending)(\d+)\s*:\s*", body)
    found = {f"{parts[i].lower()}{parts[i + 1]}": parts[i + 2].strip() for i in range(1, len(parts) - 2, 3)}
    if not found and "true/false" in instruction.lower():
        return {"true": "true", "false": "false"}
    return found


def without_options(instruction: str) -> str:
    """The instruction with its options list and answer format cut off: the question alone, for
    scoring the options' texts without showing them (lm-evaluation-harness's multiple-choice setup)."""
    body = instruction.split("Answer format:")[0]
    return re.split(r"(?:^|\s)(?:Solution|Answer|Option|Ending)\d+\s*:", body)[0].strip()


def load_records(path: str, fields=("instruction", "output")) -> list[dict]:
    """A JSON list of records, each checked for `fields` (strings). Errors name the file, the record
    number (0-based) and the field."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such data file")
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); LLM-Adapters' data is UTF-8 "
                             f"JSON") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i} is a {type(r).__name__}, expected an object")
        for field in fields:
            if field not in r:
                raise ValueError(f"{path}: record {i} has no field {field!r}")
            if not isinstance(r[field], str):
                raise ValueError(f"{path}: record {i} field {field!r} is a {type(r[field]).__name__}, expected a string")
    return records


def resolve(name_or_path: str, root: str = DEFAULT_ROOT, split: str = "test") -> str:
    """A data file from a path, a sample name ("commonsense_sample"), a training set name
    (ROOT/ft-training_set/NAME.json; if absent there, downloaded from LLM-Adapters' repository at a
    pinned commit and checked, data/fetch.py) or a task name (ROOT/dataset/NAME/test.json; if absent,
    downloaded the same way, and where that fails the missing local path, with a warning)."""
    if os.path.exists(name_or_path):
        return name_or_path
    if os.sep in name_or_path or name_or_path.endswith(".json"):
        raise FileNotFoundError(f"{name_or_path}: no such data file")
    sample = os.path.join(SAMPLES, f"{name_or_path}.json")
    if os.path.exists(sample):
        return sample
    if name_or_path in TRAIN_SETS:
        local = os.path.join(root, "ft-training_set", f"{name_or_path}.json")
        if os.path.exists(local):
            return local
        from data import fetch
        return fetch.train_set_path(name_or_path)
    if name_or_path in COMMONSENSE + MATH + ["mathqa"]:
        local = os.path.join(root, "dataset", name_or_path, f"{split}.json")
        if os.path.exists(local) or split != "test":
            return local
        from data import fetch
        try:                    # the test set from LLM-Adapters' repository; offline: the missing local path
            return fetch.test_set_path(name_or_path)
        except fetch.DownloadError as e:
            print(f"warning: {e}", file=sys.stderr)
            return local
    samples = sorted(f[:-5] for f in os.listdir(SAMPLES) if f.endswith(".json"))
    raise ValueError(f"unknown dataset {name_or_path!r}: not a file, and not one of the names "
                     f"{', '.join(samples + TRAIN_SETS + COMMONSENSE + MATH)}")


def tokenize(tokenizer, record: dict, cutoff_len: int = 256, train_on_inputs: bool = True) -> dict:
    """LLM-Adapters' tokenize(): BOS from the tokenizer, truncation to cutoff_len tokens, EOS only
    when the sequence was not truncated, labels = input_ids (prompt masked with -100 when
    train_on_inputs is False)."""
    ids = tokenizer.encode(train_prompt(record))[:cutoff_len]
    if ids[-1] != tokenizer.eos_id and len(ids) < cutoff_len:
        ids.append(tokenizer.eos_id)
    labels = list(ids)
    if not train_on_inputs:
        n_prompt = len(tokenizer.encode(train_prompt({**record, "output": ""}))[:cutoff_len])
        labels = [-100] * n_prompt + labels[n_prompt:]
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict], pad_id: int = 0, side: str = "right") -> dict:
    """Pad a list of tokenized examples: input_ids with pad_id, labels with -100, attention_mask 0."""
    ids, mask = pad([e["input_ids"] for e in examples], pad_id, side)
    labels, _ = pad([e.get("labels", e["input_ids"]) for e in examples], -100, side)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, mega: int = 50) -> list[list[int]]:
    """Index batches for one epoch: a seeded shuffle, then within each group of `mega` batches the
    examples sorted by length (longest first), so a batch holds similar lengths and padding stays
    small (transformers' group_by_length does the same). Deterministic in (lengths, seed)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches = []
    for start in range(0, len(order), mega * batch_size):
        group = sorted(order[start:start + mega * batch_size], key=lambda i: -lengths[i])
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    random.Random(seed + 1).shuffle(batches)
    return batches


VAL_SPLIT_SEED = 42      # finetune.py: train_test_split(test_size=val_set_size, shuffle=True, seed=42)


def train_test_split(n: int, n_test: int, seed: int = VAL_SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of n records as Hugging Face datasets'
    Dataset.train_test_split(test_size=n_test, shuffle=True, seed=seed) draws them (arrow_dataset.py):
    generator = np.random.default_rng(seed) (PCG64), permutation = generator.permutation(n), the
    held-out set permutation[:n_test], the training set permutation[n_test:], in that order (the
    Trainer reshuffles it). LLM-Adapters' finetune.py calls it with seed=42 whatever the run's seed.
    n_test = 0 holds nothing out and keeps the file's order (finetune.py skips the split then)."""
    import numpy as np
    if n_test <= 0:
        return list(range(n)), []
    perm = np.random.default_rng(seed).permutation(n).tolist()
    return perm[n_test:], perm[:n_test]
