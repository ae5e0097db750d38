"""Evaluate a base model with an adapter: LLM-Adapters' commonsense and arithmetic test sets
(LLaMA), GLUE (RoBERTa), XSum (BART) and WMT16 en-ro (mBART).

    python eval.py --model /ckpt/llama-7b-hf --adapter runs/la/adapter.safetensors --task commonsense
    python eval.py --model /ckpt/roberta-base --adapter runs/sst2/adapter.safetensors --task sst2 --data glue_data/SST-2
    python eval.py --model /ckpt/bart-large --adapter runs/xsum/adapter.safetensors --task xsum --data xsum_dir
    python eval.py --model /ckpt/mbart-large-cc25 --adapter runs/mt/adapter.safetensors --task wmt16-en-ro --data wmt_dir

LLaMA, as the reference (LLM-Adapters' commonsense_evaluate.py / evaluate.py, with DoRA's merged,
dropout-free model): the evaluation prompt, batched 4-beam search with left padding,
max_new_tokens 32 (commonsense) or 256 (math), the response cut after "### Response:", and the
answer taken by `extract_answer`. GLUE: the dev sets (MNLI: matched and mismatched) with
`glue_metric`. XSum and en-ro: beam search with He et al.'s settings on the test split, then
`rouge` or `bleu`. Predictions go to OUT_DIR/<task>.jsonl, one line per example; a rerun of the
same evaluation skips the examples already there. Predictions and results record what made them
(the base model's fingerprint, the adapter's and the data's content hashes, the task, the
settings: TASK.jsonl.meta.json, each results.json entry's "fingerprint"); those of another
evaluation are never reused: they are refused, naming the difference, or replaced with
--overwrite. A markdown table in the layout of the paper's Table 4 (commonsense),
Table 8 (math), Table 5 (GLUE; Table 11 for DeBERTa) or Table 10 (XSum, MT) is printed and the numbers are written to
OUT_DIR/results.json.

--protocol quanta (LLaMA; Table 4's QuanTA rows and Table 8 come from it): QuanTA's run.py.
Commonsense by rank classification over the answer candidates, math (AQuA, GSM8K, MAWPS, SVAMP)
by greedy decoding of at most 50 tokens up to a newline, scored by the correct metric and, labelled,
by QuanTA's released one (`quanta_math_correct`). Predictions go to OUT_DIR/<task>.quanta.jsonl,
the numbers to OUT_DIR/results.quanta.json.

    python eval.py --model /ckpt/llama-2-7b-hf --adapter runs/q/adapter.safetensors --task math --protocol quanta
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys

import torch

import hub
import model as M
from checkpoint import CheckpointError, load
from runs import atomic_write, check_device, content_hash, default_precision, read_json_object
from data import glue as G
from data import llm_adapters as D
from data import quanta as Q
from data import seq2seq as S
from data import text
from generate import generate, generate_seq2seq
from loss import lm_loss
from tokenizer import load_tokenizer

CHOICES = {"boolq": r"true|false", "piqa": r"solution1|solution2", "hellaswag": r"ending1|ending2|ending3|ending4",
           "winogrande": r"option1|option2",
           **{t: r"answer1|answer2|answer3|answer4|answer5"
              for t in ("social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa")}}
NUMERIC = ("addsub", "multiarith", "singleeq", "gsm8k", "svamp", "mawps")
TASKS = D.COMMONSENSE + D.MATH
GROUPS = {"commonsense": D.COMMONSENSE, "math": D.MATH}
# the paper's column names, Tables 4 and 8
COLUMNS = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag",
           "winogrande": "WinoGrande", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c", "openbookqa": "OBQA",
           "AddSub": "AddSub", "MultiArith": "MultiArith", "SingleEq": "SingleEq", "gsm8k": "GSM8K",
           "AQuA": "AQuA", "SVAMP": "SVAMP", "mawps": "MAWPS"}
TABLE_ORDER = {"commonsense": ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy",
                               "ARC-Challenge", "openbookqa"],
               "math": ["AQuA", "gsm8k", "mawps", "SVAMP", "AddSub", "MultiArith", "SingleEq"]}


def extract_answer(dataset: str, text: str):
    """The prediction in a response, as LLM-Adapters extracts it: the first match of the dataset's
    option pattern for the commonsense sets ("" if none); for AQuA the first capital A-E anywhere
    ("" if none); for the numeric sets the last number after removing commas (inf if none)."""
    if dataset in CHOICES:
        m = re.findall(CHOICES[dataset], text)
        return m[0] if m else ""
    if dataset.lower() == "aqua":
        m = re.findall(r"A|B|C|D|E", text.strip())
        return m[0] if m else ""
    if dataset.lower() in NUMERIC:
        numbers = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
        return float(numbers[-1]) if numbers else float("inf")
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(TASKS)}")


def is_correct(dataset: str, label: str, prediction) -> bool:
    if dataset.lower() in NUMERIC:
        return abs(float(label) - prediction) <= 0.001
    return label == prediction


def response_of(generated_text: str) -> str:
    """What follows "### Response:" in the prompt, up to a repeated marker, stripped (the
    reference's `decoded.split("### Response:")[1].strip()`)."""
    return generated_text.split("### Response:")[0].strip()


def predict_resumably(inputs: dict, predict, out_path, field: str, label: str, batch_size: int,
                      progress=True) -> dict:
    """The loop every generative evaluation shares. `inputs` {index: token ids} are predicted in
    batches of similar length by `predict(indices) -> records` (dicts with "index" and `field`),
    which go to `out_path` as JSON lines; indices already in that file are not predicted again, so
    a rerun resumes (main's claim_predictions has checked that the same evaluation made them). A
    last line that a kill cut short is dropped; a corrupt line elsewhere is an error naming the
    file and the line. Returns {index: record[field]} for every index of `inputs`."""
    done = {}
    if out_path and os.path.exists(out_path):
        with open(out_path, "rb") as f:
            lines = f.read().split(b"\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                index, value = r["index"], r[field]
            except (ValueError, TypeError, KeyError):
                if n >= len(lines) - 1:                        # the last line, cut short by a kill
                    print(f"{out_path}: dropping its last line, cut short; that example is predicted again",
                          file=sys.stderr)
                    atomic_write(out_path, lambda f: f.write(b"\n".join(lines[:n - 1]) + b"\n" * (n > 1)))
                    break
                raise ValueError(f"{out_path}: line {n} is not a prediction record with \"index\" and "
                                 f"{field!r} (corrupt?); fix or delete that line, or delete the file") from None
            if index in inputs:                                # (a run with a larger --limit made the rest)
                done[index] = value
    todo = sorted((i for i in inputs if i not in done), key=lambda i: len(inputs[i]))   # similar lengths together
    out = open(out_path, "a") if out_path else None
    try:
        for b in range(0, len(todo), batch_size):
            for record in predict(todo[b:b + batch_size]):
                done[record["index"]] = record[field]
                if out:
                    try:
                        out.write(json.dumps(record) + "\n")
                        out.flush()
                    except OSError as e:                       # a full disk: name the file
                        raise OSError(e.errno, f"cannot write {out_path}: {e.strerror or e}") from None
            if progress:
                score = f" | accuracy {sum(done.values()) / len(done):.3f}" if field == "correct" else ""
                print(f"\r{label}: {len(done)}/{len(inputs)}{score}", end="", file=sys.stderr, flush=True)
    finally:
        if out:
            out.close()
        if progress:
            print(file=sys.stderr)
    return done


def markdown(head: list, rows: list) -> str:
    """A markdown table."""
    return "\n".join(["| " + " | ".join(map(str, r)) + " |" for r in [head]] + ["|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


@torch.no_grad()
def evaluate_task(model, tokenizer, task, records, out_path=None, batch_size=8, num_beams=4,
                  max_new_tokens=None, progress=True, prompt=D.eval_prompt):
    """Generate and score every record; returns (correct, total). Resumes from out_path's lines.
    `prompt` builds the prompt of a record (LLM-Adapters' evaluation prompt by default)."""
    if max_new_tokens is None:
        max_new_tokens = 32 if task in D.COMMONSENSE else 256
    prompts = {i: tokenizer.encode(prompt(r)) for i, r in enumerate(records)}
    device = next(model.parameters()).device

    def predict(idx):
        batch = D.collate([{"input_ids": prompts[i]} for i in idx], tokenizer.pad_id, side="left")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        seqs = generate(model, ids, mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for row, i in enumerate(idx):
            gen = [t for t in seqs[row, ids.shape[1]:].tolist() if t not in (tokenizer.eos_id, tokenizer.pad_id)]
            response = response_of(tokenizer.decode(gen))
            pred = extract_answer(task, response)
            yield {"index": i, "response": response, "prediction": pred, "label": records[i]["answer"],
                   "correct": is_correct(task, records[i]["answer"], pred)}
    done = predict_resumably(prompts, predict, out_path, "correct", task, batch_size, progress)
    return sum(done.values()), len(records)


def candidate_sequences(tokenizer, prompt: str, candidates: list, response: str = "the correct answer is {}"):
    """The token ids of `prompt` completed by each candidate's response, split into the part all
    candidates share and each one's own tokens. Prompt and response are tokenized together, as in
    training (the prompt's trailing spaces merge with the response's first word), so the shared
    part is the longest common prefix of the candidates' sequences, not the prompt alone."""
    seqs = [tokenizer.encode(prompt + response.format(c)) for c in candidates]
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return seqs[0][:n], [s[n:] for s in seqs]


@torch.no_grad()
def evaluate_rank(model, tokenizer, task, records, out_path=None, batch_size=8, prompt=D.eval_prompt,
                  progress=True, by="label"):
    """Rank classification in LLM-Adapters' layout (eval.py --protocol rank): each candidate
    completes the prompt as the training response does, "the correct answer is {candidate}", and the
    best-scoring candidate is the prediction (the first on a tie). The tokens the candidates share
    score the same for all, so only each candidate's own tokens are scored.

    by="label" (--rank_by label): the candidates are the answer format's labels ("true/false",
    "answer1/.../answer4", ...), scored by the summed log-probability of their own tokens. One
    forward pass per record when every candidate differs in its last token only (LLaMA's and
    SmolLM2's tokenizers split "answer1" into "answer" + "1"); otherwise one per candidate. QuanTA's
    protocol (--protocol quanta) does the same in its own prompt, with the mean over the response.
    by="text" (--rank_by text): the candidates are the options' texts ("Blow into tin can ...",
    data.llm_adapters.option_texts) after the question alone (the options list cut from the
    instruction: shown, every option would be equally easy to copy), scored by their summed
    log-probability per character (lm-evaluation-harness's multiple-choice setup and acc_norm):
    what a pretrained model knows, without having to learn the labels. Returns (correct, total); the scores go to out_path, one line per record, resumed."""
    samples = {}
    for i, r in enumerate(records):
        labels = Q.answer_format(r["instruction"]) if by == "label" else list(D.option_texts(r["instruction"]))
        if r["answer"] not in labels:
            raise ValueError(f"{task} record {i}: answer {r['answer']!r} is not one of its "
                             f"{'answer format' if by == 'label' else 'options'} {labels}")
        texts = labels if by == "label" else [D.option_texts(r["instruction"])[c] for c in labels]
        shown = r if by == "label" else {**r, "instruction": D.without_options(r["instruction"])}
        shared, own = candidate_sequences(tokenizer, prompt(shown), texts)
        norm = [1.0] * len(own) if by == "label" else [max(1, len(tokenizer.decode(o))) for o in own]
        samples[i] = (labels, shared, own, norm)
    device = next(model.parameters()).device

    def score(idx):
        rows, spans = [], []              # one row per record (single-token tails) or per candidate
        for i in idx:
            cands, shared, own, _ = samples[i]
            if all(len(o) == 1 for o in own):
                spans.append((i, len(rows), None))
                rows.append(shared)
            else:
                spans.append((i, len(rows), len(cands)))
                rows += [shared + o for o in own]
        batch = D.collate([{"input_ids": r} for r in rows], tokenizer.pad_id, side="right")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = model(ids, attention_mask=None if bool(mask.all()) else mask, return_hidden=True)
        # the positions whose next-token distribution scores a candidate's own tokens: (row, position)
        at = {}
        for i, row, n in spans:
            cands, shared, own, _ = samples[i]
            for c, o in enumerate(own):
                r = row if n is None else row + c
                for j in range(1 if n is None else len(o)):
                    at.setdefault((r, len(shared) + j - 1), len(at))
        where = torch.tensor(list(at), device=device)
        logp = model.lm_head(hidden[where[:, 0], where[:, 1]]).float().log_softmax(-1).cpu()   # (positions, vocab)
        for i, row, n in spans:
            cands, shared, own, norm = samples[i]
            if n is None:                                   # the next token after the shared part
                s = [logp[at[(row, len(shared) - 1)], o[0]].item() for o in own]
            else:
                s = [sum(logp[at[(row + c, len(shared) + j - 1)], t].item() for j, t in enumerate(o))
                     for c, o in enumerate(own)]
            s = [v / k for v, k in zip(s, norm)]
            pred = max(range(len(cands)), key=s.__getitem__)
            yield {"index": i, "scores": s, "prediction": cands[pred], "label": records[i]["answer"],
                   "correct": cands[pred] == records[i]["answer"]}
    lengths = {i: shared + max(own, key=len) for i, (_, shared, own, _) in samples.items()}
    done = predict_resumably(lengths, score, out_path, "correct", task, batch_size, progress)
    return sum(done.values()), len(records)


def remove_lmam(model) -> int:
    """eval.py --lmam_off: take LMAM's learned map out of every attention layer (Attn_s ≡ 0) and
    leave everything else as it is; returns the number of maps removed (an error if none)."""
    n = 0
    for m in model.modules():
        if getattr(m, "attn_map", None) is not None:
            m.attn_map, n = None, n + 1
    if not n:
        raise ValueError("--lmam_off: this model has no LMAM map to remove (its method has no LMAM)")
    return n


def markdown_table(results: dict, method: str = "") -> str:
    """Rows in the layout of the paper's Table 4 (commonsense) and Table 8 (math)."""
    lines = []
    for group, order in TABLE_ORDER.items():
        cols = [t for t in order if t in results]
        if not cols:
            continue
        accs = [100 * results[t]["accuracy"] for t in cols]
        head = ["Method"] + [COLUMNS[t] for t in cols] + ["Avg."]
        row = [method] + [f"{a:.1f}" for a in accs] + [f"{sum(accs) / len(accs):.1f}"]
        if group == "math" and "AQuA" in cols and len(cols) > 1:
            rest = [100 * results[t]["accuracy"] for t in cols if t != "AQuA"]
            head.append("Avg. w/o AQuA")
            row.append(f"{sum(rest) / len(rest):.1f}")
        lines += [markdown(head, [row]), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- QuanTA's protocol
# (eval.py --protocol quanta; data/quanta.py has its prompts and candidates). Table 4's QuanTA rows
# and Table 8 come from it: commonsense by rank classification over the candidates, math by greedy
# decoding up to a newline, scored twice (the correct metric, and the released code's).

QUANTA_MATH = ["AQuA", "gsm8k", "mawps", "SVAMP"]         # QuanTA's math test sets (tasks.py), Table 8's columns
QUANTA_GROUPS = {"commonsense": D.COMMONSENSE, "math": QUANTA_MATH}


def quanta_number(response: str) -> float:
    """QuanTA's extract_answer_number: the last number after removing commas, inf if none."""
    numbers = re.findall(r"-?\d+\.?\d*", response.replace(",", ""))
    return float(numbers[-1]) if numbers else float("inf")


def quanta_letter(response: str) -> str:
    """QuanTA's extract_answer_letter: the first of the capitals A-I, K in the stripped text."""
    m = re.findall(r"A|B|C|D|E|F|G|H|I|G|K", response.strip())
    return m[0] if m else ""


def quanta_math_correct(gold: str, response: str) -> tuple[bool, bool]:
    """(correct, what QuanTA's released metric says) for one math answer (metrics.py, "math").
    Numeric gold: correct is |gold − prediction| < 1e-5. The released code computes
    `abs(float(gold) - float(pred) < 1e-5)`, the absolute value of a comparison: true whenever
    gold − prediction < 1e-5, that is for any prediction above gold − 1e-5 and for a response with
    no number (prediction inf). Letter gold (AQuA): the first capital A-K equals it, both metrics."""
    try:
        g = float(gold)
    except ValueError:
        if not gold.isalpha():
            raise ValueError(f"math answer {gold!r} is neither a number nor a letter") from None
        ok = gold == quanta_letter(response)
        return ok, ok
    pred = quanta_number(response)
    return abs(g - pred) < 1e-5, bool(abs(g - pred < 1e-5))        # the second: the released precedence


def option_scores(model, batch: dict, device, autocast: bool = False):
    """QuanTA's candidate score for every row of a data.quanta.collate_choices batch: the mean
    log-probability of the row's last option_lens tokens, each given the tokens before it (the
    LM head runs on those positions only). Differentiable: train.py's classification loss uses it."""
    ids = batch["input_ids"].to(device)
    mask = None if bool(batch["attention_mask"].all()) else batch["attention_mask"].to(device)
    k = batch["option_lens"]
    row = torch.repeat_interleave(torch.arange(len(k)), k)
    pos = torch.cat([torch.arange(n - j, n) for n, j in zip(batch["lengths"].tolist(), k.tolist())])
    row, pos = row.to(device), pos.to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        hidden = model(ids, attention_mask=mask, return_hidden=True)
        logits = model.lm_head(hidden[row, pos - 1])                 # the logits that predict each scored token
    logp = logits.float().log_softmax(-1).gather(1, ids[row, pos][:, None])[:, 0]
    return torch.zeros(len(k), dtype=logp.dtype, device=logp.device).index_add(0, row, logp) / k.to(logp.device)


def quanta_generate(model, tokenizer, prompts: list, max_new_tokens: int = Q.MAX_NEW_TOKENS,
                    max_length: int = Q.MAX_LENGTH) -> list[str]:
    """run.py's generation: greedy, at most min(max_new_tokens, max_length − prompt length) new
    tokens, ending at the first newline token (the last token of encode("\\n")) or EOS, decoded
    without special tokens and stripped. The batch decodes with EOS off and each row is cut at its
    own first stop token: greedy rows do not depend on each other, so that is what stopping there gives."""
    newline = (tokenizer.encode("\n", bos=False) or [tokenizer.eos_id])[-1]    # (a tokenizer without "\n": EOS)
    stops = {newline, tokenizer.eos_id}
    limits = [max(0, min(max_new_tokens, max_length - len(p))) for p in prompts]
    batch = D.collate([{"input_ids": p} for p in prompts], tokenizer.pad_id, side="left")
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    seqs = generate(model, ids, batch["attention_mask"].to(device), max_new_tokens=max(1, max(limits)),
                    num_beams=1, eos_id=newline, pad_id=tokenizer.pad_id)
    out = []
    for row, limit in enumerate(limits):
        gen = seqs[row, ids.shape[1]:].tolist()[:limit]
        cut = next((j + 1 for j, t in enumerate(gen) if t in stops), len(gen))
        specials = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
        out.append(tokenizer.decode([t for t in gen[:cut] if t not in specials]).strip())
    return out


@torch.no_grad()
def evaluate_quanta_choices(model, tokenizer, task, records, out_path=None, batch_size=8, progress=True):
    """Rank classification (run.py's one_step_pred): each record's candidates scored by
    option_scores, the highest one predicted (the first on a tie). Returns (correct, total);
    resumes from out_path's lines."""
    samples = [Q.choice_sample(r, f"{task} record {i}") for i, r in enumerate(records)]
    examples = {i: Q.tokenize_choices(tokenizer, s) for i, s in enumerate(samples)}
    device = next(model.parameters()).device

    def predict(idx):
        batch = Q.collate_choices([examples[i] for i in idx], tokenizer.pad_id)
        scores = option_scores(model, batch, device).tolist()
        start = 0
        for i, n in zip(idx, batch["counts"]):
            s, start = scores[start:start + n], start + n
            pred, cands = max(range(n), key=s.__getitem__), samples[i]["candidates"]
            yield {"index": i, "scores": s, "prediction": cands[pred], "label": cands[samples[i]["label"]],
                   "correct": pred == samples[i]["label"]}
    longest = {i: max(e["candidates"], key=len) for i, e in examples.items()}
    done = predict_resumably(longest, predict, out_path, "correct", task, batch_size, progress)
    return sum(done.values()), len(records)


@torch.no_grad()
def evaluate_quanta_math(model, tokenizer, task, records, out_path=None, batch_size=8,
                         max_new_tokens=Q.MAX_NEW_TOKENS, progress=True) -> dict:
    """Greedy answers to "{question}\\nAnswer:" (quanta_generate), scored by quanta_math_correct:
    {"correct", "correct_released_metric", "total"}. Resumes from out_path's lines."""
    samples = [Q.math_sample(r) for r in records]
    prompts = {i: Q.prompt_ids(tokenizer, s["question"]) for i, s in enumerate(samples)}

    def predict(idx):
        for i, response in zip(idx, quanta_generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens)):
            ok, released = quanta_math_correct(samples[i]["answer"], response)
            yield {"index": i, "response": response, "label": samples[i]["answer"], "correct": ok,
                   "correct_released_metric": released}
    done = predict_resumably(prompts, predict, out_path, "response", task, batch_size, progress)
    scored = [quanta_math_correct(samples[i]["answer"], done[i]) for i in range(len(samples))]
    return {"correct": sum(a for a, _ in scored), "correct_released_metric": sum(b for _, b in scored),
            "total": len(samples)}


def evaluate_quanta(model, tokenizer, task, records, out_dir, batch_size=8, max_new_tokens=None) -> dict:
    """One task under QuanTA's protocol -> its results.json entry (predictions to
    OUT_DIR/TASK.quanta.jsonl). Math entries carry both metrics."""
    out_path = os.path.join(out_dir, f"{task}.quanta.jsonl") if out_dir else None
    if task in D.COMMONSENSE:
        correct, total = evaluate_quanta_choices(model, tokenizer, task, records, out_path, batch_size)
        return {"accuracy": correct / total, "correct": correct, "total": total, "protocol": "quanta"}
    r = evaluate_quanta_math(model, tokenizer, task, records, out_path, batch_size, max_new_tokens or Q.MAX_NEW_TOKENS)
    return {"accuracy": r["correct"] / r["total"], "correct": r["correct"], "total": r["total"],
            "accuracy_released_metric": r["correct_released_metric"] / r["total"],
            "correct_released_metric": r["correct_released_metric"], "protocol": "quanta"}


def quanta_table(results: dict, method: str = "") -> str:
    """Table 4's layout (commonsense) and Table 8's (math) under QuanTA's protocol; math twice:
    the correct metric, then QuanTA's released one, labelled."""
    out = markdown_table({t: r for t, r in results.items() if t in D.COMMONSENSE}, method)
    math = {t: r for t, r in results.items() if t in D.MATH}
    if math:
        out += markdown_table(math, method)
        released = {t: {"accuracy": r["accuracy_released_metric"]} for t, r in math.items()
                    if "accuracy_released_metric" in r}
        out += markdown_table(released, f"{method}, QuanTA's released metric (counts any prediction ≥ gold "
                                        f"and any answer without a number as correct)")
    return out


# ----------------------------------------------------------------------------- GLUE

MAIN_METRIC = {t: "accuracy" for t in G.TASKS} | {"cola": "matthews_correlation", "stsb": "pearson"}
GLUE_COLUMNS = [("mnli", "MNLI"), ("sst2", "SST2"), ("qqp", "QQP"), ("qnli", "QNLI"), ("stsb", "STS-B"),
                ("mrpc", "MRPC"), ("rte", "RTE"), ("cola", "CoLA")]        # Table 5's order


def ranks(x: list) -> list:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def pearson(x: list, y: list) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else 0.0


def glue_metric(task: str, predictions: list, labels: list) -> dict:
    """The GLUE metrics of a task (the `evaluate` library's glue metric, by hand): accuracy; F1 of
    class 1 and accuracy for MRPC and QQP; Matthews correlation for CoLA (0 when undefined, as
    sklearn); Pearson and Spearman correlations for STS-B (regression predictions)."""
    G.check_task(task)
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if task == "stsb":
        p, l = [float(v) for v in predictions], [float(v) for v in labels]
        return {"pearson": pearson(p, l), "spearmanr": pearson(ranks(p), ranks(l))}
    acc = sum(int(p) == int(l) for p, l in zip(predictions, labels)) / len(labels)
    if task == "cola":
        tp = sum(p == 1 and l == 1 for p, l in zip(predictions, labels))
        tn = sum(p == 0 and l == 0 for p, l in zip(predictions, labels))
        fp = sum(p == 1 and l == 0 for p, l in zip(predictions, labels))
        fn = sum(p == 0 and l == 1 for p, l in zip(predictions, labels))
        den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
        return {"matthews_correlation": (tp * tn - fp * fn) / den if den else 0.0}
    if task in ("mrpc", "qqp"):
        tp = sum(p == 1 and l == 1 for p, l in zip(predictions, labels))
        n_pred, n_true = sum(p == 1 for p in predictions), sum(l == 1 for l in labels)
        f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else 0.0
        return {"accuracy": acc, "f1": f1}
    return {"accuracy": acc}


@torch.no_grad()
def glue_predictions(model, examples: list, pad_id: int, batch_size: int = 32, device="cpu") -> list:
    """Class ids (argmax) or, for a one-output head (STS-B), the regression values."""
    model.eval()
    out = []
    for i in range(0, len(examples), batch_size):
        batch = G.collate(examples[i:i + batch_size], pad_id)
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
        out += logits.squeeze(-1).tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()
    return out


def evaluate_glue(model, tokenizer, task, data, out_dir, batch_size=32, limit=None, max_length=512) -> dict:
    """Every dev split of a task (MNLI: mnli-m and mnli-mm) -> {split: metrics}; predictions to
    OUT_DIR/<split>.jsonl."""
    results = {}
    device = next(model.parameters()).device
    for split in G.EVAL_SPLITS[task]:
        rows = G.load_glue(task, G.split_file(task, data, split))[:limit]
        examples = [G.tokenize(tokenizer, r, max_length) for r in rows]
        preds = glue_predictions(model, examples, tokenizer.pad_id, batch_size, device)
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as f:
            for i, (p, r) in enumerate(zip(preds, rows)):
                f.write(json.dumps({"index": i, "prediction": p, "label": r["label"]}) + "\n")
        results[split] = dict(glue_metric(task, preds, [r["label"] for r in rows]), total=len(rows))
    return results


def glue_table(results: dict, method: str = "") -> str:
    """Table 5's layout: each task's main metric × 100 (MNLI: matched), and their mean."""
    head, row, vals = ["Method"], [method], []
    for task, name in GLUE_COLUMNS:
        split = "mnli-m" if task == "mnli" else task
        head.append(name)
        if split in results:
            v = 100 * results[split][MAIN_METRIC[task]]
            vals.append(v)
            row.append(f"{v:.1f}")
        else:
            row.append("–")
    head.append("mean")
    row.append(f"{sum(vals) / len(vals):.1f}" if vals else "–")
    return markdown(head, [row])


# Table 11 (DeBERTaV3-base): its columns and the metric(s) each shows, the SoRA paper's layout
TABLE11_COLUMNS = [("CoLA", [("cola", "matthews_correlation")]), ("SST-2", [("sst2", "accuracy")]),
                   ("MRPC", [("mrpc", "accuracy")]), ("QQP", [("qqp", "accuracy"), ("qqp", "f1")]),
                   ("STS-B", [("stsb", "pearson")]), ("MNLI", [("mnli-m", "accuracy"), ("mnli-mm", "accuracy")]),
                   ("QNLI", [("qnli", "accuracy")]), ("RTE", [("rte", "accuracy")])]


def table11(results: dict, method: str = "", params: str = "–") -> str:
    """Table 11's layout: # Params, then each task × 100, QQP as accuracy/F1 and MNLI as
    matched/mismatched, and Avg. over the tasks with QQP's and MNLI's two numbers averaged first:
    the convention of its AdaLoRA and SoRA rows (copied from Ding et al.: 88.83 and 89.36 recompute
    exactly). Its LoRaDA-A row's 90.89 is the mean with QQP's accuracy and MNLI-m only; by the
    other rows' convention that row averages 90.73."""
    head, row, task_means = ["Method", "# Params"], [method, params], []
    for name, cells in TABLE11_COLUMNS:
        head.append(name)
        got = [100 * results[split][metric] for split, metric in cells if split in results]
        if len(got) == len(cells):
            row.append("/".join(f"{v:.2f}" for v in got))
            task_means.append(sum(got) / len(got))
        else:
            row.append("–")
    head.append("Avg.")
    row.append(f"{sum(task_means) / len(task_means):.2f}" if task_means else "–")
    return markdown(head, [row])


# ----------------------------------------------------------------------------- XSum, WMT16 en-ro

def rouge(predictions: list, references: list) -> dict:
    """ROUGE-1/2/L F-measures × 100 with Google's rouge-score scorer and Porter stemming, averaged
    over the examples (the `evaluate` library reports the bootstrap median of this mean, which is
    within a few hundredths of it). Needs `pip install -r requirements-eval.txt`."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("rouge() needs the rouge-score package: pip install -r requirements-eval.txt") from None
    if len(predictions) != len(references) or not references:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r.strip(), p.strip()) for p, r in zip(predictions, references)]
    return {k: 100 * sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}


# Sennrich's wmt16-scripts: normalise-romanian.py (cedilla -> comma-below letters) and
# remove-diacritics.py; and the common cases of Moses' replace-unicode-punctuation.perl.
RO_NORMALISE = str.maketrans({"\u015e": "\u0218", "\u015f": "\u0219", "\u0162": "\u021a", "\u0163": "\u021b"})
RO_DIACRITICS = str.maketrans({"\u0218": "S", "\u0219": "s", "\u021a": "T", "\u021b": "t", "\u0102": "A",
                               "\u0103": "a", "\u00c2": "A", "\u00e2": "a", "\u00ce": "I", "\u00ee": "i"})
PUNCTUATION = str.maketrans({"\u201e": '"', "\u201c": '"', "\u201d": '"', "\u00ab": '"', "\u00bb": '"',
                             "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2013": "-", "\u2014": " - ",
                             "\u2026": "..."})


def romanian_postprocess(text: str) -> str:
    """He et al.'s romanian_postprocess.sh without Moses: punctuation normalised, Romanian letters
    normalised and stripped of diacritics."""
    return text.translate(PUNCTUATION).translate(RO_NORMALISE).translate(RO_DIACRITICS)


def bleu(hypotheses: list, references: list) -> dict:
    """Two BLEU scores with sacreBLEU (needs `pip install -r requirements-eval.txt`):
    "sacrebleu": detokenised text, sacreBLEU's default 13a tokenisation (the standard, comparable
    number); "bleu_ro_tok": He et al.'s reported convention, both sides normalised and stripped of
    Romanian diacritics (romanian_postprocess), then tokenised, no smoothing. He et al. tokenise with
    Moses' tokenizer.perl and score with `-tok none -s none`; Moses is not bundled here, so 13a
    tokenises instead (both split punctuation from words; they differ on a few cases such as
    apostrophes and hyphens)."""
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("bleu() needs the sacrebleu package: pip install -r requirements-eval.txt") from None
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    standard = sacrebleu.corpus_bleu(hypotheses, [references]).score
    post = lambda xs: [romanian_postprocess(x) for x in xs]
    ro = sacrebleu.corpus_bleu(post(hypotheses), [post(references)], tokenize="13a", smooth_method="none").score
    return {"sacrebleu": standard, "bleu_ro_tok": ro}


# He et al.'s generation settings (adapters.md section 7)
GENERATION = {"xsum": dict(num_beams=6, max_length=60, min_length=10, no_repeat_ngram_size=3, length_penalty=1.0),
              "wmt16-en-ro": dict(num_beams=5, max_length=150, min_length=1, no_repeat_ngram_size=0,
                                  length_penalty=1.0)}


@torch.no_grad()
def evaluate_seq2seq(model, tokenizer, task, data, out_path=None, split="test", batch_size=8, limit=None,
                     progress=True, max_source_len=None, **generation) -> dict:
    """Generate for every source of a split and score: ROUGE (xsum) or BLEU (wmt16-en-ro). Sources
    are cut to max_source_len tokens (He et al.: 512 XSum, 150 MT; at most the model's positions).
    mBART's decoder starts with ro_RO. Resumes from out_path's lines."""
    pairs = S.load_pairs(task, data, split)[:limit]
    settings = dict(GENERATION[task], **{k: v for k, v in generation.items() if v is not None})
    mbart = model.cfg.model_type == "mbart"
    src_lang = "en_XX" if mbart else None
    if mbart:
        settings.setdefault("decoder_start_token_id", tokenizer.lang_id("ro_RO"))
    if max_source_len is not None and not 0 < max_source_len <= model.cfg.max_positions:
        raise ValueError(f"--max_source_len {max_source_len}: expected 1 to the model's {model.cfg.max_positions} positions")
    max_src = min(max_source_len or (512 if task == "xsum" else 150), model.cfg.max_positions)
    sources = {i: S.encode(tokenizer, p["source"], max_src, src_lang) for i, p in enumerate(pairs)}
    device = next(model.parameters()).device

    def predict(idx):
        batch = S.collate([{"input_ids": sources[i], "labels": [0]} for i in idx], tokenizer.pad_id)
        seqs = generate_seq2seq(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), **settings)
        for row, i in enumerate(idx):
            yield {"index": i, "hypothesis": tokenizer.decode(seqs[row].tolist()).strip(),
                   "reference": pairs[i]["target"]}
    done = predict_resumably(sources, predict, out_path, "hypothesis", task, batch_size, progress)
    hyps, refs = [done[i] for i in range(len(pairs))], [p["target"] for p in pairs]
    scores = rouge(hyps, refs) if task == "xsum" else bleu(hyps, refs)
    return dict(scores, total=len(pairs))


def seq2seq_table(results: dict, method: str = "") -> str:
    """Table 10's layout: XSum R-1/R-2/R-L and MT BLEU (He et al.'s tokenised convention)."""
    x, m = results.get("xsum"), results.get("wmt16-en-ro")
    xsum = f"{x['rouge1']:.2f}/{x['rouge2']:.2f}/{x['rougeL']:.2f}" if x else "–"
    mt = f"{m['bleu_ro_tok']:.1f} (sacreBLEU {m['sacrebleu']:.1f})" if m else "–"
    return markdown(["Method", "XSum (R-1/2/L)", "MT (BLEU)"], [[method, xsum, mt]])


# ----------------------------------------------------------------------------- perplexity (Table 7)

@torch.no_grad()
def perplexity(model, tokens, seq_len: int, stride: int = 256, protocol: str = "longlora", progress=True) -> dict:
    """Perplexity of a token stream (a memory-mapped token file) with windows of seq_len tokens.

    protocol "longlora" (LongLoRA's eval.py, Table 7's numbers): windows x = tokens[i : i + L] for
    i in range(0, N − L, stride), the last of them dropped; each window scored over all its L − 1
    next-token predictions (so overlapping windows score most tokens many times); the windows'
    mean losses averaged with equal weight; ppl = e^mean.
    protocol "strided" (the standard one, transformers' "perplexity of fixed-length models"): each
    window scores only the tokens the previous window did not, with the rest as context; every
    token is scored once; ppl = e^(total loss / tokens scored)."""
    model.eval()
    device = next(model.parameters()).device
    N, L = len(tokens), seq_len
    if N <= L:
        raise ValueError(f"{N} tokens: no window of --seq_len {L} fits")
    window = lambda i, j: torch.from_numpy(tokens[i:j].astype("int64"))[None].to(device)
    total, count = 0.0, 0
    if protocol == "longlora":
        starts = list(range(0, N - L, stride))[:-1]
        if not starts:
            raise ValueError(f"{N} tokens: LongLoRA's protocol needs at least two windows of {L} tokens")
        for n, i in enumerate(starts, 1):
            x = window(i, i + L)
            total += float(lm_loss(model(x, return_hidden=True)[:, :-1], model.lm_head, x[:, 1:])) / (L - 1)
            count += 1
            if progress:
                print(f"\rppl, L={L}: window {n}/{len(starts)}", end="", file=sys.stderr, flush=True)
    elif protocol == "strided":
        scored_to = 0
        for i in range(0, N, stride):
            j = min(i + L, N)
            x = window(i, j)
            labels = x.clone()
            labels[:, :scored_to - i] = -100                # context only: scored by an earlier window
            total += float(lm_loss(model(x, return_hidden=True)[:, :-1], model.lm_head, labels[:, 1:]))
            count += int((labels[:, 1:] != -100).sum())
            scored_to = j
            if j == N:
                break
    else:
        raise ValueError(f"--ppl_protocol {protocol!r}: expected longlora or strided")
    if progress:
        print(file=sys.stderr)
    return {"ppl": math.exp(total / count), "windows" if protocol == "longlora" else "tokens": count,
            "protocol": protocol}


def ppl_table(results: dict, method: str = "") -> str:
    """Table 7's layout: perplexity at each evaluation context length."""
    lens = sorted(results, key=int)
    return markdown(["Method", *lens], [[method, *(f"{results[n]['ppl']:.2f}" for n in lens)]])


def evaluate_ppl(model, tok, args) -> dict:
    """eval.py --task ppl: a token file (.bin, uint16, as LongLoRA's proof-pile test_sampled_data.bin)
    or text (tokenized as data/text.py does), at every --seq_len; --context_size sets the RoPE
    interpolation factor as LongLoRA's eval.py does (ceil(context_size / trained length))."""
    if not args.data:
        raise ValueError("--data is required for ppl: a token file (.bin) or text (.txt, .jsonl)")
    if args.data.endswith(".bin"):
        tokens = text.read_tokens(args.data, model.cfg.vocab_size)
    else:
        tokens = text.token_file(args.data, tok, os.path.join(args.out_dir, "eval_tokens.bin"))
    if args.context_size:
        factor = math.ceil(args.context_size / model.cfg.max_seq_len)
        model.cfg.rope_scaling = {"rope_type": "linear", "factor": float(factor)} if factor > 1 else None
    return {str(L): perplexity(model, tokens, L, args.stride, args.ppl_protocol)
            for L in (int(x) for x in str(args.seq_len).split(","))}


def load_for_eval(model_path, adapter=None, device="cpu", tokenizer=None, num_labels=None, precision=None):
    """Base model + adapter, in eval mode with the adapter merged where the method allows it (in
    fp32, rounded once to the weights' dtype). num_labels: a RoBERTa checkpoint's GLUE head (the
    adapter file holds its trained weights). precision: "bf16" loads the weights in bf16,
    "fp32" in fp32; None: runs.default_precision (bf16 on a GPU or a CPU with native bf16). model_path: a local checkpoint, a Hub id
    or a paper name (hub.resolve_model). adapter: this project's adapter file, or a directory in
    peft's format (adapter_config.json: LoRA / DoRA from peft or NVlabs/DoRA, export.load_peft_adapter)."""
    bf16 = (precision or default_precision(device)) == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    paper, model_path = hub.paper_name(model_path), hub.resolve_model(model_path)
    model = load(model_path, dtype=dtype, device=device, num_labels=num_labels)
    model.cfg.name = paper or model.cfg.name
    if adapter:
        from export import load_any_adapter      # peft's directory format or this project's file
        load_any_adapter(model, adapter)
    model.eval()
    for m in model.modules():
        if hasattr(m, "merge"):
            m.merge()
    tok = load_tokenizer(tokenizer or hub.tokenizer_source(model_path))
    return model, tok


# ----------------------------------------------------------------------------- cached results, keyed
# Every saved prediction file (TASK.jsonl, TASK.quanta.jsonl, TASK.rank.jsonl, SPLIT.jsonl) and
# every results.json entry records what produced it: the base model (its fingerprint), the adapter
# and the data (content hashes), the task and the settings that change a prediction. A rerun
# resumes only what the same evaluation made; anything else is refused, naming what differs
# (--overwrite replaces it). --limit and --batch_size are not in the key: a prediction is the
# same whichever of the first N examples are asked for, and the batches a resumed run forms
# already differ from an uninterrupted one's (the remaining examples, sorted by length), so the
# batch size only changes padding, which the attention mask takes out up to rounding (the device
# likewise); a resumed evaluation is exact up to that rounding.

RUN_KEY_FLAGS = ("protocol", "rank_by", "prompt_layout", "lmam_off", "num_beams", "max_new_tokens", "max_source_len",
                 "split", "stride", "ppl_protocol", "context_size")   # (ppl: each --seq_len is an entry of its own)


def check_eval_args(args):
    """Flags that would evaluate nothing, or something else than asked, refused before any work."""
    check_device(args.device)
    for flag in ("batch_size", "num_beams", "max_new_tokens", "stride", "context_size", "limit"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise ValueError(f"--{flag} {v}: expected a positive number"
                             + (" (the first N examples of each task)" if flag == "limit" else ""))


def evaluation_key(args, model) -> dict:
    """What every prediction and result of this eval.py run shares: the base model's fingerprint
    (a digest of methods.base_fingerprint), the adapter's and the tokenizer's content hashes, the
    weights' precision and the flags that change a prediction. "model" (the path given) is kept
    for the messages only."""
    import methods
    base = json.dumps(methods.base_fingerprint(model), sort_keys=True).encode()
    return {"model": args.model, "base": hashlib.sha256(base).hexdigest()[:16],
            "adapter": content_hash(args.adapter)[:16] if args.adapter else None,
            "tokenizer": content_hash(args.tokenizer)[:16] if args.tokenizer else None,
            "precision": args.precision or default_precision(args.device),
            **{k: getattr(args, k, None) for k in RUN_KEY_FLAGS}}


def task_key(key: dict, task: str, data: str | None) -> dict:
    """The key of one task's predictions and result: the run's, the task and its data's content hash."""
    return {**key, "task": task, "data": data, "data_sha256": content_hash(data)[:16] if data else None}


NAMES = {"base": "base model", "adapter": "adapter", "tokenizer": "tokenizer", "data_sha256": "data",
         "precision": "--precision"}


def key_difference(old, new: dict, only=None) -> str | None:
    """How a recorded key differs from this run's, in words (None when they match); "model" and
    "data" (paths) only name the inputs, their hashes decide. `only`: compare these fields."""
    if not isinstance(old, dict):
        return "there is no record of what produced it"
    for k in only or new:
        if k in ("model", "data") or old.get(k) == new.get(k):
            continue
        name = NAMES.get(k, f"--{k}")
        where = {"base": "model", "data_sha256": "data"}.get(k)
        there = f"{old.get(where)}, {old.get(k)}" if where and old.get(where) else old.get(k)
        here = f"{new.get(where)}, {new.get(k)}" if where and new.get(where) else new.get(k)
        return f"another {name}: {there} there, {here} here"
    return None


def refuse_or_replace(what: str, differs: str, overwrite: bool):
    """A cached result of another evaluation: refused (a ValueError saying what differs and what to
    do), or with --overwrite announced for replacement."""
    if not overwrite:
        raise ValueError(f"{what} comes from another evaluation ({differs}); evaluate into another --out_dir, or "
                         f"give --overwrite to replace what this folder holds of it")
    print(f"--overwrite: replacing {what} ({differs})", file=sys.stderr)


def claim_predictions(out_path: str, key: dict, overwrite: bool = False):
    """Before predict_resumably appends to out_path: its predictions are resumed only when
    OUT_PATH.meta.json records this very key; predictions of another evaluation (or of unknown
    origin) are refused, or with --overwrite deleted. Writes the record for this run."""
    meta = out_path + ".meta.json"
    if os.path.exists(out_path):
        recorded = text.read_json(meta)
        differs = key_difference(recorded, key)
        if differs is None:
            return
        with open(out_path, "rb") as f:
            n = f.read().count(b"\n")
        refuse_or_replace(f"{out_path} ({n} predictions)", differs, overwrite)
        os.remove(out_path)
    atomic_write(meta, lambda f: f.write(json.dumps(key, indent=2).encode()))


def read_results(path: str) -> dict:
    """results.json ({} when absent); a file that is not a JSON object is an error naming it."""
    if not os.path.exists(path):
        return {}
    return read_json_object(path, fix="move it away or delete it to evaluate again")


def settle_results(results: dict, path: str, key: dict, keys: dict, overwrite: bool = False) -> dict:
    """results.json holds one evaluation's results (one model, adapter and settings, over tasks):
    an entry of another one (by its "fingerprint"), or of this run's tasks made from other data, is
    refused, or with --overwrite dropped. `keys`: {entry name: its task_key} of this run."""
    run_fields = [k for k in key if k != "model"]
    kept = {}
    for name, entry in results.items():
        entries = entry.values() if name == "ppl" and isinstance(entry, dict) else [entry]
        differs = None
        for e in entries:
            fp = e.get("fingerprint") if isinstance(e, dict) else None
            differs = key_difference(fp, key, run_fields) or (
                key_difference(fp, keys[name], ["data_sha256"]) if name in keys else None)
            if differs:
                break
        if differs:
            refuse_or_replace(f"{path}'s {name} result", differs, overwrite)
            continue
        kept[name] = entry
    return kept


def write_results(path: str, results: dict):
    atomic_write(path, lambda f: f.write(json.dumps(results, indent=2).encode()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="the base checkpoint: a directory or llama2.c .bin, a Hugging Face Hub id or a paper name "
                        "(downloaded once, see train.py --help)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the one in the checkpoint directory)")
    p.add_argument("--adapter", default=None,
                   help="an adapter file from train.py, or a directory in peft's format (adapter_config.json + "
                        "adapter_model.safetensors / .bin: LoRA and DoRA from peft, DoRA from NVlabs/DoRA's "
                        "released checkpoints, LoRA and the series / parallel bottleneck adapters from "
                        "LLM-Adapters' released checkpoints); none: the base model")
    p.add_argument("--task", required=True, help="LLaMA: a task, a group or several, comma-separated; "
                   + "|".join(TASKS + list(GROUPS) + list(G.TASKS) + list(S.TASKS))
                   + "|ppl (perplexity of a token file or text, Table 7)")
    p.add_argument("--seq_len", default="2048", help="ppl: evaluation context lengths, e.g. 2048,4096,8192 (Table 7)")
    p.add_argument("--context_size", type=int, default=None,
                   help="ppl: the training context length; sets the RoPE interpolation factor (LongLoRA's eval.py)")
    p.add_argument("--stride", type=int, default=256, help="ppl: the windows' stride (LongLoRA: 256)")
    p.add_argument("--ppl_protocol", default="longlora", choices=("longlora", "strided"),
                   help="ppl: LongLoRA's (Table 7's numbers) or the standard strided perplexity")
    p.add_argument("--data", default=None, help="LLaMA: a test file in LLM-Adapters' format (default: "
                   "dataset/TASK/test.json); GLUE: the task's folder; XSum / WMT: the folder or file of the split")
    p.add_argument("--data_dir", default=None, help="LLaMA: a folder holding TASK.json for each task evaluated "
                   "(e.g. a held-out split); default: LLM-Adapters' dataset/TASK/test.json")
    p.add_argument("--split", default="test", help="XSum / WMT: which split to evaluate (test, val)")
    p.add_argument("--out_dir", default="eval_out",
                   help="predictions (TASK.jsonl, resumed on a rerun of the same evaluation) and results.json: one "
                        "evaluation's (model, adapter, data, settings); another's is refused, naming what differs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the predictions and results in --out_dir that another evaluation made")
    p.add_argument("--batch_size", type=int, default=8, help="examples per generation batch (left-padded)")
    p.add_argument("--num_beams", type=int, default=None,
                   help="default: 4 (LLaMA, LLM-Adapters), 6 (XSum), 5 (WMT) (He et al.)")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: 32 commonsense, 256 math (LLM-Adapters' evaluation scripts)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    p.add_argument("--max_source_len", type=int, default=None,
                   help="XSum / WMT: source tokens kept (default: 512 XSum, 150 WMT, at most the model's positions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="the weights' dtype (default: bf16 on a GPU and on a CPU with native bf16, AVX512-BF16 or "
                        "AMX; fp32 elsewhere; LORADA_PRECISION sets the default)")
    p.add_argument("--prompt_layout", choices=("eval", "train"), default="eval",
                   help="LLaMA's commonsense and math tasks: the prompt of LLM-Adapters' evaluation scripts "
                        "(eval, the default) or of its training (train: finetune.py's layout, which differs in "
                        "whitespace; see data/llm_adapters.py)")
    p.add_argument("--rank_by", choices=("label", "text"), default="label",
                   help="--protocol rank: score the answer labels (answer1, true, ...: what fine-tuning in "
                        "LLM-Adapters' format teaches) or the options' texts (per character, as "
                        "lm-evaluation-harness's acc_norm: what the pretrained model knows)")
    p.add_argument("--lmam_off", action="store_true",
                   help="remove the adapter's LMAM map (Attn_s = 0) and keep everything else: what the map "
                        "itself contributes")
    p.add_argument("--protocol", choices=("default", "quanta", "rank"), default="default",
                   help="LLaMA's commonsense and math tasks. default: LLM-Adapters' evaluation (4-beam generation, "
                        "the answer by regex). quanta: QuanTA's (run.py), where Table 4's QuanTA rows and Table 8 "
                        "come from: commonsense by rank classification over the candidates (mean log-probability "
                        "of '... the correct answer is {candidate}.'), math ('math' = AQuA, gsm8k, mawps, SVAMP) by "
                        "greedy decoding of 50 tokens up to a newline, scored by the correct metric and by QuanTA's "
                        "released one (labelled; it counts any prediction >= gold as correct). Writes "
                        "TASK.quanta.jsonl and results.quanta.json. rank: commonsense by rank classification in "
                        "--prompt_layout's prompt (evaluate_rank: one forward pass per question, every question "
                        "affordable on a CPU); writes TASK.rank.jsonl and results.rank.json")
    args = p.parse_args(argv)
    quanta, rank = args.protocol == "quanta", args.protocol == "rank"
    suffix = {"default": "", "quanta": ".quanta", "rank": ".rank" if args.rank_by == "label" else ".rank_text"}[args.protocol]
    results_path = os.path.join(args.out_dir, f"results{suffix}.json")
    layout = D.train_prompt_only if args.prompt_layout == "train" else D.eval_prompt
    medium = args.task in G.TASKS or args.task in S.TASKS
    try:
        check_eval_args(args)
        if (quanta or rank) and (medium or args.task == "ppl"):
            raise ValueError("--protocol quanta is QuanTA's for LLaMA's commonsense and math tasks, not for "
                             f"{args.task}")
        if quanta and (args.num_beams or 1) != 1:
            raise ValueError("--protocol quanta decodes greedily (--num_beams 1)")
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise ValueError(f"--out_dir {args.out_dir}: is a file, not a folder")
        os.makedirs(args.out_dir, exist_ok=True)
        results = read_results(results_path)
        if args.task == "ppl":                           # Table 7: perplexity of long texts (LongLoRA)
            model, tok = load_for_eval(args.model, args.adapter, args.device, args.tokenizer, precision=args.precision)
            key = task_key(evaluation_key(args, model), "ppl", args.data if args.data and os.path.exists(args.data)
                           else None)
            results = settle_results(results, results_path, key, {"ppl": key}, args.overwrite)
            ppl = {L: {**r, "fingerprint": key} for L, r in evaluate_ppl(model, tok, args).items()}
            results.setdefault("ppl", {}).update(ppl)
            print(f"perplexity, {args.ppl_protocol} protocol"
                  + (" (LongLoRA's eval.py: every window's L − 1 tokens, windows averaged)"
                     if args.ppl_protocol == "longlora" else " (standard: every token scored once)"))
            print(ppl_table(ppl, model.peft_method["name"] if getattr(model, "peft_method", None) else "base"))
            write_results(results_path, results)
            return results
        if medium:
            if not args.data:
                raise ValueError(f"--data is required for {args.task}")
            num_labels = G.num_labels(args.task) if args.task in G.TASKS else None
            model, tok = load_for_eval(args.model, args.adapter, args.device, args.tokenizer, num_labels, args.precision)
            key = task_key(evaluation_key(args, model), args.task, args.data)
            if args.task in G.TASKS:
                if not isinstance(model, (M.Roberta, M.Deberta)):
                    raise ValueError(f"GLUE task {args.task} needs a RoBERTa or DeBERTa checkpoint")
                splits = G.EVAL_SPLITS[args.task]
                results = settle_results(results, results_path, key, dict.fromkeys(splits, key), args.overwrite)
                for split in splits:
                    claim_predictions(os.path.join(args.out_dir, f"{split}.jsonl"), key, args.overwrite)
                for split, r in evaluate_glue(model, tok, args.task, args.data, args.out_dir, args.batch_size,
                                              args.limit).items():
                    results[split] = {**r, "fingerprint": key}
            else:
                if not isinstance(model, M.Bart):
                    raise ValueError(f"{args.task} needs a BART / mBART checkpoint")
                results = settle_results(results, results_path, key, {args.task: key}, args.overwrite)
                out_path = os.path.join(args.out_dir, f"{args.task}.jsonl")
                claim_predictions(out_path, key, args.overwrite)
                results[args.task] = {**evaluate_seq2seq(model, tok, args.task, args.data, out_path, args.split,
                                                         args.batch_size, args.limit, num_beams=args.num_beams,
                                                         max_source_len=args.max_source_len),
                                      "fingerprint": key}
        else:
            # The model first, as train.py does: a missing huggingface_hub or a gated repository is said
            # before any test file is downloaded (load_for_eval below finds the model in the cache).
            hub.resolve_model(args.model, quiet=True)
            tasks = [t for name in args.task.split(",") for t in (QUANTA_GROUPS if quanta else GROUPS).get(name, [name])]
            for t in tasks:
                if rank and t not in D.COMMONSENSE:
                    raise ValueError(f"--protocol rank scores answer candidates: {t} has none (commonsense "
                                     f"tasks only: {', '.join(D.COMMONSENSE)})")
                if t not in TASKS:
                    raise ValueError(f"unknown task {t!r}; valid: {', '.join(TASKS + list(GROUPS) + list(G.TASKS) + list(S.TASKS))}")
            if args.data and len(tasks) > 1:
                raise ValueError("--data names one file: use it with a single --task")
            if args.data and args.data_dir:
                raise ValueError("--data and --data_dir: give one (a file for one task, or a folder of TASK.json)")
            files = {t: args.data or (os.path.join(args.data_dir, f"{t}.json") if args.data_dir else D.resolve(t))
                     for t in tasks}
            missing = [f for f in files.values() if not os.path.exists(f)]
            if len(tasks) == 1 and missing:
                raise FileNotFoundError(f"{missing[0]}: no such test file for task {tasks[0]}")
            data = {t: D.load_records(f, fields=("instruction", "answer"))[:args.limit]
                    for t, f in files.items() if os.path.exists(f)}
            for t, records in data.items():
                if not records:
                    raise ValueError(f"{files[t]}: no test examples for task {t}")
            model, tok = load_for_eval(args.model, args.adapter, args.device, args.tokenizer, precision=args.precision)
            if args.lmam_off:
                print(f"LMAM map removed from {remove_lmam(model)} layers (--lmam_off)")
            for f in missing:
                print(f"skipping {f}: not found", file=sys.stderr)
            key = evaluation_key(args, model)
            keys = {t: task_key(key, t, files[t]) for t in data}
            results = settle_results(results, results_path, key, keys, args.overwrite)
            paths = {t: os.path.join(args.out_dir, f"{t}{suffix}.jsonl") for t in data}
            for t in data:                                 # every task's, before any work
                claim_predictions(paths[t], keys[t], args.overwrite)
            for t, records in data.items():
                if quanta:
                    results[t] = {**evaluate_quanta(model, tok, t, records, args.out_dir, args.batch_size,
                                                    args.max_new_tokens), "fingerprint": keys[t]}
                    continue
                if rank:
                    correct, total = evaluate_rank(model, tok, t, records, paths[t], args.batch_size, prompt=layout,
                                                   by=args.rank_by)
                else:
                    correct, total = evaluate_task(model, tok, t, records, paths[t], args.batch_size,
                                                   args.num_beams or 4, args.max_new_tokens, prompt=layout)
                results[t] = {"accuracy": correct / total, "correct": correct, "total": total, "fingerprint": keys[t]}
        write_results(results_path, results)
    except (ValueError, OSError, ImportError, CheckpointError) as e:      # OSError: a full or read-only disk
        sys.exit(f"error: {e}")
    name = model.peft_method["name"] if getattr(model, "peft_method", None) else "base"
    if isinstance(model, M.Roberta):
        print(glue_table(results, name))
    elif isinstance(model, M.Deberta):                   # Table 11's layout; # Params without the GLUE head
        added = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))
        print(table11(results, name, f"{added / 1e6:.2f}M"))
    elif isinstance(model, M.Bart):
        print(seq2seq_table(results, name))
    elif quanta:
        print(quanta_table(results, name))
    else:
        print(markdown_table(results, name))
    return results


if __name__ == "__main__":
    main()
