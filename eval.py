"""Evaluate a base model with an adapter: LLM-Adapters' commonsense and arithmetic test sets
(LLaMA), GLUE (RoBERTa, DeBERTaV3), XSum (BART), WMT16 en-ro (mBART) and the perplexity of long
texts (LLaMA, LongLoRA's protocol).

    python eval.py --model /ckpt/llama-7b-hf --adapter runs/la/adapter.safetensors --task commonsense
    python eval.py --model /ckpt/roberta-base --adapter runs/sst2/adapter.safetensors --task sst2 --data glue_data/SST-2
    python eval.py --model /ckpt/bart-large --adapter runs/xsum/adapter.safetensors --task xsum --data xsum_dir
    python eval.py --model /ckpt/mbart-large-cc25 --adapter runs/mt/adapter.safetensors --task wmt16-en-ro --data wmt_dir
    python eval.py --model /ckpt/llama-2-7b-hf --adapter runs/q/adapter.safetensors --task math --protocol quanta

The evaluators are data, as train.py's benchmarks are (pipelines.PIPELINES): EVALUATORS maps each
kind of task to the function that evaluates it and the function that lays its results out as the
paper's table; main looks the kind up and runs it. The protocols come first, each with its table:

  LLM-Adapters' protocol (LLaMA; the paper's Tables 4 and 8): LLM-Adapters' commonsense_evaluate.py
      and evaluate.py, with DoRA's merged, dropout-free model: the evaluation prompt, batched 4-beam
      search with left padding, max_new_tokens 32 (commonsense) or 256 (math), the response cut
      after "### Response:", and the answer taken by `extract_answer`.
  --protocol rank: commonsense by rank classification over the answer labels or the options' texts.
  --protocol quanta: QuanTA's run.py (eval_quanta.py), where Table 4's QuanTA rows and Table 8
      come from.
  GLUE: the dev sets (MNLI: matched and mismatched) with `glue_metric` (Tables 5 and 11).
  XSum and en-ro: beam search with He et al.'s settings on the test split, then `rouge` or `bleu`
      (Table 10).
  --task ppl: perplexity of a token file or text at several context lengths (Table 7).

then loading the model, the evaluators and EVALUATORS, and the command line.

Predictions go to OUT_DIR/<task>.jsonl (--protocol quanta: <task>.quanta.jsonl; rank:
<task>.rank.jsonl, by texts <task>.rank_text.jsonl), one line per example; a rerun of the same
evaluation skips the examples already there. Predictions and results record what made them (the base
model's fingerprint, the adapter's and the data's content hashes, the task, the settings:
TASK.jsonl.meta.json, each results.json entry's "fingerprint"); those of another evaluation are never
reused: they are refused, naming the difference, or replaced with --overwrite (predictions.py). The
numbers go to OUT_DIR/results.json (results.quanta.json, results.rank.json, ...) and are printed as a
markdown table in the paper's layout.
"""
import argparse
import json
import math
import os
import re
import sys
from functools import partial

import torch

import hub
import model as M
from checkpoint import CheckpointError, load
from data import glue, llm_adapters, quanta, seq2seq, text
from eval_quanta import QUANTA_GROUPS, evaluate_quanta
from generate import generate, generate_seq2seq
from loss import lm_loss
from predictions import (claim_predictions, evaluation_key, predict_resumably, read_results, settle_results,
                         task_key, write_results)
from runs import check_device, default_precision
from tokenizer import load_tokenizer


# ----------------------------------------------------------------------------- LLM-Adapters' protocol

CHOICES = {"boolq": r"true|false", "piqa": r"solution1|solution2", "hellaswag": r"ending1|ending2|ending3|ending4",
           "winogrande": r"option1|option2",
           **{t: r"answer1|answer2|answer3|answer4|answer5"
              for t in ("social_i_qa", "ARC-Challenge", "ARC-Easy", "openbookqa")}}
NUMERIC = ("addsub", "multiarith", "singleeq", "gsm8k", "svamp", "mawps")
TASKS = llm_adapters.COMMONSENSE + llm_adapters.MATH
GROUPS = {"commonsense": llm_adapters.COMMONSENSE, "math": llm_adapters.MATH}
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
    """The response in the generated tokens, decoded without the prompt: the text up to a "### Response:"
    the model repeats, stripped. LLM-Adapters' evaluate.py decodes the prompt and the generation
    together and takes `output.split("### Response:")[1].strip()`, the text between the prompt's
    marker and the next one; without the prompt, that text is what comes before the first marker: [0]."""
    return generated_text.split("### Response:")[0].strip()


@torch.no_grad()
def evaluate_task(model, tokenizer, task, records, out_path=None, batch_size=8, num_beams=4,
                  max_new_tokens=None, progress=True, prompt=llm_adapters.eval_prompt):
    """Generate and score every record; returns (correct, total). Resumes from out_path's lines.
    `prompt` builds the prompt of a record (LLM-Adapters' evaluation prompt by default)."""
    if max_new_tokens is None:
        max_new_tokens = 32 if task in llm_adapters.COMMONSENSE else 256
    prompts = {i: tokenizer.encode(prompt(r)) for i, r in enumerate(records)}
    device = next(model.parameters()).device

    def predict(idx):
        batch = llm_adapters.collate([{"input_ids": prompts[i]} for i in idx], tokenizer.pad_id, side="left")
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


def markdown(head: list, rows: list) -> str:
    """A markdown table."""
    return "\n".join(["| " + " | ".join(map(str, r)) + " |" for r in [head]] + ["|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


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


# ----------------------------------------------------------------------------- --protocol rank

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


def rank_candidates(tokenizer, task, records, prompt, by="label") -> dict:
    """evaluate_rank's candidates: {record index: (its labels, the tokens its candidates share, each
    candidate's own tokens, each one's score divisor)}. by="label": the answer format's labels after
    the prompt, divisor 1; by="text": the options' texts after the question alone, divisor the
    candidate's characters."""
    samples = {}
    for i, r in enumerate(records):
        options = llm_adapters.option_texts(r["instruction"]) if by != "label" else {}
        labels = quanta.answer_format(r["instruction"]) if by == "label" else list(options)
        if r["answer"] not in labels:
            raise ValueError(f"{task} record {i}: answer {r['answer']!r} is not one of its "
                             f"{'answer format' if by == 'label' else 'options'} {labels}")
        texts = labels if by == "label" else [options[c] for c in labels]
        shown = r if by == "label" else {**r, "instruction": llm_adapters.without_options(r["instruction"])}
        shared, own = candidate_sequences(tokenizer, prompt(shown), texts)
        norm = [1.0] * len(own) if by == "label" else [max(1, len(tokenizer.decode(o))) for o in own]
        samples[i] = (labels, shared, own, norm)
    return samples


@torch.no_grad()
def evaluate_rank(model, tokenizer, task, records, out_path=None, batch_size=8, prompt=llm_adapters.eval_prompt,
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
    what a pretrained model knows, without having to learn the labels. Returns (correct, total); the
    scores go to out_path, one line per record, resumed."""
    samples = rank_candidates(tokenizer, task, records, prompt, by)
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
        batch = llm_adapters.collate([{"input_ids": r} for r in rows], tokenizer.pad_id, side="right")
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


# ----------------------------------------------------------------------------- --protocol quanta's table

def quanta_table(results: dict, method: str = "") -> str:
    """Table 4's layout (commonsense) and Table 8's (math) under QuanTA's protocol; math twice:
    the correct metric, then QuanTA's released one, labelled."""
    out = markdown_table({t: r for t, r in results.items() if t in llm_adapters.COMMONSENSE}, method)
    math_results = {t: r for t, r in results.items() if t in llm_adapters.MATH}
    if math_results:
        out += markdown_table(math_results, method)
        released = {t: {"accuracy": r["accuracy_released_metric"]} for t, r in math_results.items()
                    if "accuracy_released_metric" in r}
        out += markdown_table(released, f"{method}, QuanTA's released metric (counts any prediction ≥ gold "
                                        f"and any answer without a number as correct)")
    return out


# ----------------------------------------------------------------------------- GLUE

MAIN_METRIC = {t: "accuracy" for t in glue.TASKS} | {"cola": "matthews_correlation", "stsb": "pearson"}
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
    glue.check_task(task)
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
        batch = glue.collate(examples[i:i + batch_size], pad_id)
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
        out += logits.squeeze(-1).tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()
    return out


def evaluate_glue(model, tokenizer, task, data, out_dir, batch_size=32, limit=None, max_length=512) -> dict:
    """Every dev split of a task (MNLI: mnli-m and mnli-mm) -> {split: metrics}; predictions to
    OUT_DIR/<split>.jsonl."""
    results = {}
    device = next(model.parameters()).device
    for split in glue.EVAL_SPLITS[task]:
        rows = glue.load_glue(task, glue.split_file(task, data, split))[:limit]
        examples = [glue.tokenize(tokenizer, r, max_length) for r in rows]
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
    pairs = seq2seq.load_pairs(task, data, split)[:limit]
    settings = dict(GENERATION[task], **{k: v for k, v in generation.items() if v is not None})
    mbart = model.cfg.model_type == "mbart"
    src_lang = "en_XX" if mbart else None
    if mbart:
        settings.setdefault("decoder_start_token_id", tokenizer.lang_id("ro_RO"))
    if max_source_len is not None and not 0 < max_source_len <= model.cfg.max_positions:
        raise ValueError(f"--max_source_len {max_source_len}: expected 1 to the model's "
                         f"{model.cfg.max_positions} positions")
    max_src = min(max_source_len or (512 if task == "xsum" else 150), model.cfg.max_positions)
    sources = {i: seq2seq.encode(tokenizer, p["source"], max_src, src_lang) for i, p in enumerate(pairs)}
    device = next(model.parameters()).device

    def predict(idx):
        batch = seq2seq.collate([{"input_ids": sources[i], "labels": [0]} for i in idx], tokenizer.pad_id)
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


# ----------------------------------------------------------------------------- loading

def load_for_eval(model_path, adapter=None, device="cpu", tokenizer=None, num_labels=None, precision=None):
    """Base model + adapter, in eval mode with the adapter merged where the method allows it (in
    fp32, rounded once to the weights' dtype). num_labels: a RoBERTa checkpoint's GLUE head (the
    adapter file holds its trained weights). precision: "bf16" loads the weights in bf16,
    "fp32" in fp32; None: runs.default_precision (bf16 on a GPU or a CPU with native bf16).
    model_path: a local checkpoint, a Hub id or a paper name (hub.resolve_model). adapter: this
    project's adapter file, or a directory in peft's format (adapter_config.json: LoRA / DoRA from
    peft or NVlabs/DoRA, export.load_peft_adapter)."""
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


def load_model(args, kinds, num_labels=None):
    """The model and tokenizer of eval.py's flags (load_for_eval), refused unless the model is one of
    `kinds` (a model class or a tuple of them, as isinstance takes); --lmam_off takes its LMAM map out."""
    model, tok = load_for_eval(args.model, args.adapter, args.device, args.tokenizer, num_labels, args.precision)
    if not isinstance(model, kinds):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise ValueError(f"--task {args.task} needs a {names} checkpoint; --model {args.model} is a "
                         f"{type(model).__name__}")
    if args.lmam_off:
        print(f"LMAM map removed from {remove_lmam(model)} layers (--lmam_off)")
    return model, tok


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


# ----------------------------------------------------------------------------- the evaluators, as data

# Each kind of task has a function that evaluates it, (args, results, results_path) -> (results, model):
# it reads and checks its inputs, loads the model, keys the run (predictions.py), settles what
# results.json already holds, evaluates and adds its entries; and a function that lays the results out
# as the paper's table, (results, model) -> str. main picks the kind from --task and --protocol.

def read_test_sets(args) -> tuple[dict, dict]:
    """--task's commonsense and math tasks (a group: its tasks) -> ({task: its test file}, {task: the
    first --limit records of the file}). A group skips a missing file; a single task's is an error."""
    groups = QUANTA_GROUPS if args.protocol == "quanta" else GROUPS
    tasks = [t for name in args.task.split(",") for t in groups.get(name, [name])]
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; valid: "
                             f"{', '.join(TASKS + list(GROUPS) + list(glue.TASKS) + list(seq2seq.TASKS))}")
        if args.protocol == "rank" and t not in llm_adapters.COMMONSENSE:
            raise ValueError(f"--protocol rank scores answer candidates: {t} has none (commonsense "
                             f"tasks only: {', '.join(llm_adapters.COMMONSENSE)})")
    if args.data and len(tasks) > 1:
        raise ValueError("--data names one file: use it with a single --task")
    if args.data and args.data_dir:
        raise ValueError("--data and --data_dir: give one (a file for one task, or a folder of TASK.json)")
    files = {t: args.data or (os.path.join(args.data_dir, f"{t}.json") if args.data_dir else llm_adapters.resolve(t))
             for t in tasks}
    missing = [f for f in files.values() if not os.path.exists(f)]
    if len(tasks) == 1 and missing:
        raise FileNotFoundError(f"{missing[0]}: no such test file for task {tasks[0]}")
    data = {t: llm_adapters.load_records(f, fields=("instruction", "answer"))[:args.limit]
            for t, f in files.items() if os.path.exists(f)}
    for t, records in data.items():
        if not records:
            raise ValueError(f"{files[t]}: no test examples for task {t}")
    return files, data


def run_llama_tasks(args, results, results_path, entry):
    """LLaMA on LLM-Adapters' commonsense and math test sets: every task's test file is read before the
    model loads, then each task is evaluated by `entry` (its protocol's) into its results.json entry."""
    # The model first, as train.py does: a missing huggingface_hub or a gated repository is said
    # before any test file is downloaded (load_model below finds the model in the cache).
    hub.resolve_model(args.model, quiet=True)
    files, data = read_test_sets(args)
    model, tok = load_model(args, M.Llama)
    for t in files.keys() - data.keys():
        print(f"skipping {files[t]}: not found", file=sys.stderr)
    key = evaluation_key(args, model)
    keys = {t: task_key(key, t, files[t]) for t in data}
    results = settle_results(results, results_path, key, keys, args.overwrite)
    paths = {t: os.path.join(args.out_dir, f"{t}{results_suffix(args)}.jsonl") for t in data}
    for t in data:                                 # every task's, before any work
        claim_predictions(paths[t], keys[t], args.overwrite)
    for t, records in data.items():
        results[t] = {**entry(model, tok, t, records, paths[t], args), "fingerprint": keys[t]}
    return results, model


PROMPT_LAYOUTS = {"eval": llm_adapters.eval_prompt, "train": llm_adapters.train_prompt_only}   # --prompt_layout


def llm_adapters_entry(model, tok, task, records, out_path, args) -> dict:
    """A task under LLM-Adapters' protocol: beam search (--num_beams, default 4), the answer extracted."""
    correct, total = evaluate_task(model, tok, task, records, out_path, args.batch_size, args.num_beams or 4,
                                   args.max_new_tokens, prompt=PROMPT_LAYOUTS[args.prompt_layout])
    return {"accuracy": correct / total, "correct": correct, "total": total}


def rank_entry(model, tok, task, records, out_path, args) -> dict:
    """A commonsense task by rank classification (--rank_by label or text)."""
    correct, total = evaluate_rank(model, tok, task, records, out_path, args.batch_size,
                                   prompt=PROMPT_LAYOUTS[args.prompt_layout], by=args.rank_by)
    return {"accuracy": correct / total, "correct": correct, "total": total}


def quanta_entry(model, tok, task, records, out_path, args) -> dict:
    """A task under QuanTA's protocol (eval_quanta.py)."""
    return evaluate_quanta(model, tok, task, records, out_path, args.batch_size, args.max_new_tokens)


def run_glue(args, results, results_path):
    """A GLUE task's dev sets (RoBERTa, DeBERTaV3): each split a results.json entry."""
    if not args.data:
        raise ValueError(f"--data is required for {args.task}")
    model, tok = load_model(args, (M.Roberta, M.Deberta), glue.num_labels(args.task))
    key = task_key(evaluation_key(args, model), args.task, args.data)
    splits = glue.EVAL_SPLITS[args.task]
    results = settle_results(results, results_path, key, dict.fromkeys(splits, key), args.overwrite)
    for split in splits:
        claim_predictions(os.path.join(args.out_dir, f"{split}.jsonl"), key, args.overwrite)
    for split, r in evaluate_glue(model, tok, args.task, args.data, args.out_dir, args.batch_size, args.limit).items():
        results[split] = {**r, "fingerprint": key}
    return results, model


def run_seq2seq(args, results, results_path):
    """XSum or WMT16 en-ro (BART, mBART): --split of --data, one results.json entry."""
    if not args.data:
        raise ValueError(f"--data is required for {args.task}")
    model, tok = load_model(args, M.Bart)
    key = task_key(evaluation_key(args, model), args.task, args.data)
    results = settle_results(results, results_path, key, {args.task: key}, args.overwrite)
    out_path = os.path.join(args.out_dir, f"{args.task}.jsonl")
    claim_predictions(out_path, key, args.overwrite)
    scores = evaluate_seq2seq(model, tok, args.task, args.data, out_path, args.split, args.batch_size, args.limit,
                              num_beams=args.num_beams, max_source_len=args.max_source_len)
    results[args.task] = {**scores, "fingerprint": key}
    return results, model


def run_ppl(args, results, results_path):
    """Perplexity of --data at every --seq_len (LLaMA): the entry "ppl", {seq_len: its numbers}."""
    model, tok = load_model(args, M.Llama)
    key = task_key(evaluation_key(args, model), "ppl", args.data if args.data and os.path.exists(args.data) else None)
    results = settle_results(results, results_path, key, {"ppl": key}, args.overwrite)
    ppl = evaluate_ppl(model, tok, args)
    results.setdefault("ppl", {}).update({L: {**r, "fingerprint": key} for L, r in ppl.items()})
    return results, model


def method_name(model) -> str:
    """A table's Method column: the adapter's method, or "base"."""
    return model.peft_method["name"] if getattr(model, "peft_method", None) else "base"


def for_model(layout):
    """A table layout of (results, method name) as one of (results, model)."""
    return lambda results, model: layout(results, method_name(model))


def glue_tables(results: dict, model) -> str:
    """Table 5's layout for RoBERTa, Table 11's for DeBERTaV3 (# Params: the method's, without the GLUE head)."""
    if isinstance(model, M.Deberta):
        added = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head."))
        return table11(results, method_name(model), f"{added / 1e6:.2f}M")
    return glue_table(results, method_name(model))


def ppl_tables(results: dict, model) -> str:
    """Table 7's layout of results.json's perplexities, under the name of their protocol (one for all:
    it is in the results' key)."""
    protocol = next(iter(results["ppl"].values()))["protocol"]
    about = {"longlora": "LongLoRA's eval.py: every window's L − 1 tokens, windows averaged",
             "strided": "standard: every token scored once"}[protocol]
    return f"perplexity, {protocol} protocol ({about})\n" + ppl_table(results["ppl"], method_name(model))


EVALUATORS = {   # kind -> (evaluate, table)
    "llm-adapters": (partial(run_llama_tasks, entry=llm_adapters_entry), for_model(markdown_table)),  # Tables 4, 8
    "rank": (partial(run_llama_tasks, entry=rank_entry), for_model(markdown_table)),
    "quanta": (partial(run_llama_tasks, entry=quanta_entry), for_model(quanta_table)),   # Table 4's QuanTA rows, 8
    "glue": (run_glue, glue_tables),                                                     # Tables 5, 11
    "seq2seq": (run_seq2seq, for_model(seq2seq_table)),                                  # Table 10
    "ppl": (run_ppl, ppl_tables),                                                        # Table 7
}


# ----------------------------------------------------------------------------- the command line

def parser() -> argparse.ArgumentParser:
    """eval.py's flags. One that changes a prediction belongs in predictions.RUN_KEY_FLAGS as well."""
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
                   + "|".join(TASKS + list(GROUPS) + list(glue.TASKS) + list(seq2seq.TASKS))
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
    return p


def check_eval_args(args):
    """Flags that would evaluate nothing, or something else than asked, refused before any work."""
    check_device(args.device)
    for flag in ("batch_size", "num_beams", "max_new_tokens", "stride", "context_size", "limit"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            raise ValueError(f"--{flag} {v}: expected a positive number"
                             + (" (the first N examples of each task)" if flag == "limit" else ""))
    if args.protocol == "quanta" and (args.num_beams or 1) != 1:
        raise ValueError("--protocol quanta decodes greedily (--num_beams 1)")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise ValueError(f"--out_dir {args.out_dir}: is a file, not a folder")


def evaluator_kind(args) -> str:
    """Which of EVALUATORS evaluates --task: LLaMA's commonsense and math tasks under --protocol's;
    GLUE, XSum / WMT and ppl have one protocol each."""
    kind = ("ppl" if args.task == "ppl" else "glue" if args.task in glue.TASKS
            else "seq2seq" if args.task in seq2seq.TASKS else None)
    if kind and args.protocol != "default":
        raise ValueError(f"--protocol {args.protocol} is for LLaMA's commonsense and math tasks, not for {args.task}")
    return kind or {"default": "llm-adapters", "rank": "rank", "quanta": "quanta"}[args.protocol]


def results_suffix(args) -> str:
    """How a protocol's files are told apart: OUT_DIR/TASK{suffix}.jsonl and results{suffix}.json."""
    rank = ".rank" if args.rank_by == "label" else ".rank_text"
    return {"default": "", "quanta": ".quanta", "rank": rank}[args.protocol]


def main(argv=None):
    """Parse and check the flags, evaluate --task by its kind's evaluator into results.json, print the table."""
    args = parser().parse_args(argv)
    results_path = os.path.join(args.out_dir, f"results{results_suffix(args)}.json")
    try:
        check_eval_args(args)
        evaluate, table = EVALUATORS[evaluator_kind(args)]
        os.makedirs(args.out_dir, exist_ok=True)
        results, model = evaluate(args, read_results(results_path), results_path)
        write_results(results_path, results)
    except (ValueError, OSError, ImportError, CheckpointError) as e:      # OSError: a full or read-only disk
        sys.exit(f"error: {e}")
    print(table(results, model))
    return results


if __name__ == "__main__":
    main()
