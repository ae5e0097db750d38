"""QuanTA's protocol for LLM-Adapters' data (quanta-fine-tuning/quanta @14f02f4, run/run.py,
run/utils/{tasks,templates,utils}.py, run/ft_com.sh): how its records become questions,
candidates, prompts and tokens.

Commonsense (COMMONSENSE170KDataset and the *TestDataset classes, all alike): the question is the
instruction with its newlines cleaned (`clean_text`); the candidates are the options after
"answer format:" in the lower-cased instruction, split on "/" ("true/false", "solution1/solution2",
"answer1/.../answer5", "ending1/...", "option1/option2"); the gold candidate is the record's
answer, lower-cased. Each candidate is a sequence of its own,

    "{question}\\nAnswer: the correct answer is {candidate}."

scored by the mean log-probability of its last k tokens, k = len(tokens(sequence)) -
len(tokens("{question}\\nAnswer:")): everything after "Answer:", the shared words included.
Training (--train_as_classification) is cross-entropy over those scores; evaluation is their
argmax (rank classification).

Math (MATH10KDataset, GSM8K/AQuA/MAWPS/SVAMP TestDataset): the prompt is "{question}\\nAnswer:";
training (only_train_option) is next-token cross-entropy over the answer tokens of
"{question}\\nAnswer: {output}\\n" (the output cleaned, a newline after it); evaluation decodes
greedily up to 50 new tokens, a newline ending the answer (eval_quanta.py, evaluate_quanta_math).

Tokens: BOS first, no EOS (the Hugging Face LLaMA tokenizer's encode); sequences longer than
max_length keep BOS and their last max_length - 1 tokens (encode_prompt's left truncation).

The split (Dataset.sample_train_sets with ft_com.sh's TRAIN=1000000, DEV=400): a permutation of
the training file by numpy's legacy RandomState seeded with TRAIN_SET_SEED; the last 400 of it are
the dev set, the rest trains.
"""
import re

import numpy as np
import torch

from data import pad

TRAIN_SET_SEED = 271828      # ft_com.sh's TRAIN_SET_SEED (its SEED, 31415, is presets.py's "quanta" row)
MAX_LENGTH = 2048            # run.py's max_length
MAX_NEW_TOKENS = 50          # run.py's max_new_tokens (math; ft_com.sh passes 64, used by no commonsense path)
COMMONSENSE_PROMPT = "{question}\nAnswer:"                                   # COMMONSENSE170KTemplate.encode
COMMONSENSE_CHOICE = "{question}\nAnswer: the correct answer is {candidate}."  # .verbalize
MATH_PROMPT = "{question}\nAnswer:"                                          # MATH10KTemplate.encode
MATH_TARGET = "{question}\nAnswer: {output}"                                 # .verbalize (output ends in "\n")


def clean_text(text: str) -> str:
    """QuanTA's clean_text: a run of newlines after a character that is not . ! ? ; : or a space
    becomes ". ", every other run of newlines a space; then strip."""
    return re.sub(r"\n+", " ", re.sub(r"(?<![.!?;:\s])\n+", ". ", text)).strip()


def answer_format(instruction: str) -> list[str]:
    """The candidates: the text after "answer format:" (lower-cased instruction) up to the line's
    end, split on "/" and stripped ([] if there is none), as extract_answer_format."""
    text = instruction.lower()
    start = text.find("answer format:")
    if start == -1:
        return []
    colon = text.find(":", start)
    end = text.find("\n", colon)
    return [o.strip() for o in text[colon + 1:len(text) if end == -1 else end].strip().split("/")]


def choice_sample(record: dict, where: str = "record") -> dict:
    """A commonsense record -> {"question", "candidates", "label"} (label: the gold candidate's
    index). A record whose answer is not one of its candidates is an error (the reference asserts)."""
    candidates = answer_format(record["instruction"])
    gold = record["answer"].lower()
    if gold not in candidates:
        raise ValueError(f"{where}: answer {record['answer']!r} is not one of the candidates {candidates} of its "
                         f"'Answer format:' line (QuanTA's protocol needs one)")
    return {"question": clean_text(record["instruction"]), "candidates": candidates,
            "label": candidates.index(gold)}


def math_sample(record: dict) -> dict:
    """A math record -> {"question", "output", "answer"} (MATH10KDataset.build_sample)."""
    return {"question": clean_text(record["instruction"]), "output": clean_text(record.get("output", "")) + "\n",
            "answer": record["answer"].strip()}


def truncate(ids: list[int], max_length: int = MAX_LENGTH) -> list[int]:
    """Longer than max_length: BOS and the last max_length - 1 tokens (encode_prompt)."""
    return ids if len(ids) <= max_length else ids[:1] + ids[len(ids) - (max_length - 1):]


def scored_tail(tokenizer, text: str, prompt: str, max_length: int) -> tuple[list[int], int]:
    """(the tokens of text, truncated; how many of its last tokens follow `prompt`): the
    reference's option_len, len(encode(text)) - len(encode(prompt)), at least 1."""
    ids = tokenizer.encode(text, bos=True)
    k = len(ids) - len(tokenizer.encode(prompt, bos=True))
    ids = truncate(ids, max_length)
    return ids, max(1, min(k, len(ids) - 1))


def tokenize_choices(tokenizer, sample: dict, max_length: int = MAX_LENGTH) -> dict:
    """The candidates' token sequences and how many trailing tokens of each are scored."""
    prompt = COMMONSENSE_PROMPT.format(question=sample["question"])
    seqs, lens = zip(*[scored_tail(tokenizer, COMMONSENSE_CHOICE.format(question=sample["question"], candidate=c),
                                   prompt, max_length) for c in sample["candidates"]])
    return {"candidates": list(seqs), "option_lens": list(lens), "label": sample["label"]}


def tokenize_target(tokenizer, sample: dict, max_length: int = MAX_LENGTH - MAX_NEW_TOKENS) -> dict:
    """A math training example: the prompt and its answer, the answer's tokens labelled (-100
    elsewhere). The reference leaves max_new_tokens of room here too (encode_prompt, generation)."""
    ids, k = scored_tail(tokenizer, MATH_TARGET.format(question=sample["question"], output=sample["output"]),
                         MATH_PROMPT.format(question=sample["question"]), max_length)
    return {"input_ids": ids, "labels": [-100] * (len(ids) - k) + ids[len(ids) - k:]}


def prompt_ids(tokenizer, question: str, max_length: int = MAX_LENGTH - MAX_NEW_TOKENS) -> list[int]:
    """The math evaluation prompt's tokens."""
    return truncate(tokenizer.encode(MATH_PROMPT.format(question=question), bos=True), max_length)


def collate_choices(examples: list[dict], pad_id: int = 0) -> dict:
    """Every candidate of every example, one row each, right-padded: input_ids, attention_mask,
    lengths and option_lens per row (CPU tensors), counts (candidates per example) and labels."""
    rows = [s for e in examples for s in e["candidates"]]
    ids, mask = pad(rows, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "lengths": torch.tensor([len(r) for r in rows]),
            "option_lens": torch.tensor([k for e in examples for k in e["option_lens"]]),
            "counts": [len(e["candidates"]) for e in examples],
            "labels": torch.tensor([e["label"] for e in examples])}


def split(n: int, n_dev: int, seed: int = TRAIN_SET_SEED) -> tuple[list[int], list[int]]:
    """(train indices, dev indices) as Dataset.sample_train_sets draws them from a training file
    of n records: np.random.seed(seed); np.random.permutation(n); the dev set is the last n_dev."""
    perm = np.random.RandomState(seed).permutation(n).tolist()
    return (perm[:n - n_dev], perm[n - n_dev:]) if n_dev > 0 else (perm, [])
