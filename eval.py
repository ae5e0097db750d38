"""Evaluate a base model with an adapter on LLM-Adapters' commonsense and arithmetic test sets.

    python eval.py --model /ckpt/llama-7b-hf --adapter runs/la/adapter.safetensors --task commonsense

As the reference (LLM-Adapters' commonsense_evaluate.py / evaluate.py, with DoRA's merged,
dropout-free model): the evaluation prompt, batched 4-beam search with left padding,
max_new_tokens 32 (commonsense) or 256 (math), the response cut after "### Response:", and the
answer taken by `extract_answer`. Predictions go to OUT_DIR/<task>.jsonl, one line per example;
a rerun skips the examples already there. A markdown table in the layout of the paper's Table 4
(commonsense) / Table 8 (math) is printed and the numbers are written to OUT_DIR/results.json.
"""
import argparse
import json
import os
import re
import sys

import torch

import methods
import model as M
from data import llm_adapters as D

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


@torch.no_grad()
def evaluate_task(model, tokenizer, task, records, out_path=None, batch_size=8, num_beams=4,
                  max_new_tokens=None, progress=True, prompt=D.eval_prompt):
    """Generate and score every record; returns (correct, total). Resumes from out_path's lines.
    `prompt` builds the prompt of a record (LLM-Adapters' evaluation prompt by default)."""
    if max_new_tokens is None:
        max_new_tokens = 32 if task in D.COMMONSENSE else 256
    done = {}
    if out_path and os.path.exists(out_path):
        with open(out_path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    done[r["index"]] = r["correct"]
    todo = [i for i in range(len(records)) if i not in done]
    prompts = {i: tokenizer.encode(prompt(records[i]), bos=True) for i in todo}
    todo.sort(key=lambda i: len(prompts[i]))                     # similar lengths share a batch
    device = next(model.parameters()).device
    out = open(out_path, "a") if out_path else None
    try:
        for b in range(0, len(todo), batch_size):
            idx = todo[b:b + batch_size]
            batch = D.collate([{"input_ids": prompts[i]} for i in idx], tokenizer.pad_id, side="left")
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            seqs = M.generate(model, ids, mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
            for row, i in enumerate(idx):
                gen = [t for t in seqs[row, ids.shape[1]:].tolist() if t not in (tokenizer.eos_id, tokenizer.pad_id)]
                response = response_of(tokenizer.decode(gen))
                pred = extract_answer(task, response)
                ok = is_correct(task, records[i]["answer"], pred)
                done[i] = ok
                if out:
                    out.write(json.dumps({"index": i, "response": response, "prediction": pred,
                                          "label": records[i]["answer"], "correct": ok}) + "\n")
                    out.flush()
            if progress:
                print(f"\r{task}: {len(done)}/{len(records)} | accuracy {sum(done.values()) / len(done):.3f}",
                      end="", file=sys.stderr, flush=True)
    finally:
        if out:
            out.close()
        if progress:
            print(file=sys.stderr)
    return sum(done.values()), len(records)


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
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", ""]
    return "\n".join(lines)


def load_for_eval(model_path, adapter=None, device="cpu", tokenizer=None):
    """Base model + adapter, in eval mode with the adapter merged where the method allows it."""
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = M.load(model_path, dtype=dtype, device=device)
    if adapter:
        methods.load_adapter(model, adapter)
    model.eval()
    for m in model.modules():
        if hasattr(m, "merge"):
            m.merge()
    tok = M.load_tokenizer(tokenizer or (model_path if os.path.isdir(model_path) else os.path.dirname(model_path)))
    return model, tok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--adapter", default=None, help="an adapter file from train.py (none: the base model)")
    p.add_argument("--task", required=True, help="|".join(TASKS + list(GROUPS)))
    p.add_argument("--data", default=None, help="a test file in LLM-Adapters' format (default: dataset/TASK/test.json)")
    p.add_argument("--out_dir", default="eval_out")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_beams", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    tasks = GROUPS.get(args.task, [args.task])
    try:
        for t in tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; valid: {', '.join(TASKS + list(GROUPS))}")
        if args.data and len(tasks) > 1:
            raise ValueError("--data names one file: use it with a single --task")
        files = {t: args.data or D.resolve(t) for t in tasks}
        missing = [f for f in files.values() if not os.path.exists(f)]
        if len(tasks) == 1 and missing:
            raise FileNotFoundError(f"{missing[0]}: no such test file for task {tasks[0]}")
        data = {t: D.load_records(f, fields=("instruction", "answer"))[:args.limit]
                for t, f in files.items() if os.path.exists(f)}
        model, tok = load_for_eval(args.model, args.adapter, args.device, args.tokenizer)
    except (ValueError, FileNotFoundError, M.CheckpointError) as e:
        sys.exit(f"error: {e}")
    for f in missing:
        print(f"skipping {f}: not found", file=sys.stderr)
    os.makedirs(args.out_dir, exist_ok=True)
    results_path = os.path.join(args.out_dir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    for t, records in data.items():
        correct, total = evaluate_task(model, tok, t, records, os.path.join(args.out_dir, f"{t}.jsonl"),
                                       args.batch_size, args.num_beams, args.max_new_tokens)
        results[t] = {"accuracy": correct / total, "correct": correct, "total": total}
    with open(results_path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(results_path + ".tmp", results_path)
    name = model.peft_method["name"] if getattr(model, "peft_method", None) else "base"
    print(markdown_table(results, name))
    return results


if __name__ == "__main__":
    main()
