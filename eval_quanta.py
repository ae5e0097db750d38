"""QuanTA's evaluation protocol (quanta-fine-tuning/quanta @14f02f4: run/run.py and its metrics.py),
which eval.py runs for --protocol quanta: Table 4's QuanTA rows and Table 8 come from it.
data/quanta.py has its prompts, candidates and tokens.

Commonsense is rank classification: each candidate of a question ("true", "false"; "answer1", ...)
completes "{question}\nAnswer: the correct answer is {candidate}.", is scored by the mean
log-probability of its tokens after "Answer:" (option_scores), and the best one is the prediction.
Math (AQuA, GSM8K, MAWPS, SVAMP) decodes greedily, at most 50 tokens up to a newline
(quanta_generate), and is scored twice: by the correct metric and, labelled, by the released one,
which also counts any prediction above the gold answer, and any response without a number, as
correct (quanta_math_correct). Predictions go to OUT_DIR/TASK.quanta.jsonl, the numbers to
OUT_DIR/results.quanta.json.

    python eval.py --model /ckpt/llama-2-7b-hf --adapter runs/q/adapter.safetensors --task math --protocol quanta
"""
import re

import torch

from data import llm_adapters, quanta
from generate import generate
from predictions import predict_resumably

QUANTA_MATH = ["AQuA", "gsm8k", "mawps", "SVAMP"]         # QuanTA's math test sets (tasks.py), Table 8's columns
QUANTA_GROUPS = {"commonsense": llm_adapters.COMMONSENSE, "math": QUANTA_MATH}


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


def quanta_generate(model, tokenizer, prompts: list, max_new_tokens: int = quanta.MAX_NEW_TOKENS,
                    max_length: int = quanta.MAX_LENGTH) -> list[str]:
    """run.py's generation: greedy, at most min(max_new_tokens, max_length − prompt length) new
    tokens, ending at the first newline token (the last token of encode("\\n")) or EOS, decoded
    without special tokens and stripped. The batch decodes with EOS off and each row is cut at its
    own first stop token: greedy rows do not depend on each other, so that is what stopping there gives."""
    newline = (tokenizer.encode("\n", bos=False) or [tokenizer.eos_id])[-1]    # (a tokenizer without "\n": EOS)
    stops = {newline, tokenizer.eos_id}
    limits = [max(0, min(max_new_tokens, max_length - len(p))) for p in prompts]
    batch = llm_adapters.collate([{"input_ids": p} for p in prompts], tokenizer.pad_id, side="left")
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
    samples = [quanta.choice_sample(r, f"{task} record {i}") for i, r in enumerate(records)]
    examples = {i: quanta.tokenize_choices(tokenizer, s) for i, s in enumerate(samples)}
    device = next(model.parameters()).device

    def predict(idx):
        batch = quanta.collate_choices([examples[i] for i in idx], tokenizer.pad_id)
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
                         max_new_tokens=quanta.MAX_NEW_TOKENS, progress=True) -> dict:
    """Greedy answers to "{question}\\nAnswer:" (quanta_generate), scored by quanta_math_correct:
    {"correct", "correct_released_metric", "total"}. Resumes from out_path's lines."""
    samples = [quanta.math_sample(r) for r in records]
    prompts = {i: quanta.prompt_ids(tokenizer, s["question"]) for i, s in enumerate(samples)}

    def predict(idx):
        for i, response in zip(idx, quanta_generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens)):
            ok, released = quanta_math_correct(samples[i]["answer"], response)
            yield {"index": i, "response": response, "label": samples[i]["answer"], "correct": ok,
                   "correct_released_metric": released}
    done = predict_resumably(prompts, predict, out_path, "response", task, batch_size, progress)
    scored = [quanta_math_correct(samples[i]["answer"], done[i]) for i in range(len(samples))]
    return {"correct": sum(a for a, _ in scored), "correct_released_metric": sum(b for _, b in scored),
            "total": len(samples)}


def evaluate_quanta(model, tokenizer, task, records, out_path=None, batch_size=8, max_new_tokens=None) -> dict:
    """One task under QuanTA's protocol -> its results.json entry (predictions to out_path, eval.py's
    OUT_DIR/TASK.quanta.jsonl; resumed). Math entries carry both metrics."""
    if task in llm_adapters.COMMONSENSE:
        correct, total = evaluate_quanta_choices(model, tokenizer, task, records, out_path, batch_size)
        return {"accuracy": correct / total, "correct": correct, "total": total, "protocol": "quanta"}
    r = evaluate_quanta_math(model, tokenizer, task, records, out_path, batch_size,
                             max_new_tokens or quanta.MAX_NEW_TOKENS)
    return {"accuracy": r["correct"] / r["total"], "correct": r["correct"], "total": r["total"],
            "accuracy_released_metric": r["correct_released_metric"] / r["total"],
            "correct_released_metric": r["correct_released_metric"], "protocol": "quanta"}

