"""Where LLM-Adapters' evaluation prompt puts each token, against its training prompt, per tokenizer.

    python scripts/prompt_offsets.py                 # the README's table, a few seconds
    python scripts/prompt_offsets.py --per_file 50 --tokenizer demo=.cache/demo/base

LLM-Adapters trains with finetune.py's prompt and evaluates with commonsense_evaluate.py's /
evaluate.py's, which differ in whitespace only (data/llm_adapters.py):
  - after "request." the training prompt has two spaces, the evaluation prompt one;
  - after the instruction the training prompt has a line of 16 spaces, the evaluation prompt an
    empty line;
  - both then end in "### Response:\\n" and 16 spaces.
LMAM's map is indexed by token position (Eq. 14), so what matters for it is how these few
characters change the positions of the tokens, and that depends on the tokenizer. For each test
record this compares the training layout (train_prompt with an empty response, the prompt the
model was trained on up to the answer) with the evaluation layout (eval_prompt), token by token,
aligned with difflib:

  header       tokens before the instruction's first token (BOS included), in the training layout;
  first diff   the first position at which the two layouts hold different tokens, and whether the
               evaluation layout *substitutes* a token there (same length up to the next difference:
               later tokens keep their positions) or *drops* one (later tokens move one earlier);
  same/128     of the first 128 positions of prompt + gold answer (LoRaDA-LA's n on LLaMA is 128),
               how many hold the same token in both layouts;
  moved        prompt tokens of the evaluation layout that also occur in the training layout, but
               at another position;
  instruction  the shift of the instruction's tokens (evaluation position − training position);
  answer       the shift of the answer's first position (len(eval) − len(train)).

The records are the first --per_file (default 21) of each LLM-Adapters test file in
../shared/data/llm_adapters/dataset (or $LLM_ADAPTERS_DATA) for the 14 benchmarks of Tables 4
and 8 that are there (HellaSwag's is not): 294 records.
"""
import argparse
import difflib
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import llm_adapters        # noqa: E402
from tokenizer import load_tokenizer        # noqa: E402

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
TOKENIZERS = {"LLaMA-2 (sentencepiece)": os.path.join(SHARED, "llama2-tokenizer", "tokenizer.model"),
              "LLaMA-3 (tiktoken)": os.path.join(SHARED, "llama3-tokenizer", "tokenizer.model"),
              "SmolLM2 (byte-level BPE)": os.path.join(SHARED, "smollm2-135m-instruct",
                                                       "SmolLM2-135M-Instruct.Q4_1.gguf")}
N_MAP = 128


def test_records(per_file=21, root=None):
    """[(benchmark, record)]: the first `per_file` records of each LLM-Adapters test file there."""
    root = root or os.path.join(llm_adapters.DEFAULT_ROOT, "dataset")
    out = []
    for name in llm_adapters.COMMONSENSE + llm_adapters.MATH:
        path = os.path.join(root, name, "test.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                out += [(name, r) for r in json.load(f)[:per_file]]
    return out


def header_tokens(tok, ids, header_text):
    """How many leading tokens of `ids` decode to text inside `header_text` (the prompt before the
    instruction): the instruction's first token is ids[header]."""
    skip = int(bool(ids) and ids[0] == getattr(tok, "bos_id", None))     # BOS: counted, not decoded
    k = skip
    while k < len(ids) and header_text.startswith(tok.decode(ids[skip:k + 1])):
        k += 1
    return k


def compare(tok, record):
    """The measurements above for one record (a dict)."""
    rec = {**record, "input": record.get("input", "")}
    train, evl = tok.encode(llm_adapters.train_prompt_only(rec)), tok.encode(llm_adapters.eval_prompt(rec))
    answer = record.get("output", "")
    train_full, eval_full = tok.encode(llm_adapters.train_prompt(rec)), tok.encode(llm_adapters.eval_prompt(rec) + answer)
    template = llm_adapters.TRAIN_PROMPT_INPUT if rec["input"] else llm_adapters.TRAIN_PROMPT
    header = header_tokens(tok, train, template.split("{instruction}")[0])
    first = next((i for i in range(min(len(train), len(evl))) if train[i] != evl[i]), min(len(train), len(evl)))
    ops = difflib.SequenceMatcher(None, train, evl, autojunk=False).get_opcodes()
    kind = "none"
    for op, i1, i2, j1, j2 in ops:
        if op != "equal":
            kind = "substitution" if i2 - i1 == j2 - j1 else ("dropped" if i2 - i1 > j2 - j1 else "inserted")
            break
    moved, instruction_shift = 0, None
    for op, i1, i2, j1, j2 in ops:
        if op == "equal":
            if j1 != i1:
                moved += i2 - i1
            if i1 <= header < i2:                      # the block that holds the instruction's first token
                instruction_shift = j1 - i1
    n = min(N_MAP, len(train_full), len(eval_full))
    same = sum(a == b for a, b in zip(train_full[:n], eval_full[:n]))
    return {"header": header, "first": first, "kind": kind, "same128": same, "of128": n, "moved": moved,
            "instruction": instruction_shift, "answer": len(evl) - len(train)}


def measure(tok, records):
    """Per-record comparisons and their summary (medians, extremes, counts)."""
    rows = [compare(tok, r) for _, r in records]
    med = lambda k: statistics.median(r[k] for r in rows)                       # noqa: E731
    shifts, answers = [r["instruction"] for r in rows], [r["answer"] for r in rows]
    return rows, {"records": len(rows),
                  "header": sorted({r["header"] for r in rows}),
                  "first": sorted({r["first"] for r in rows}),
                  "kind": sorted({r["kind"] for r in rows}),
                  "same128_median": med("same128"), "same128_min": min(r["same128"] for r in rows),
                  "moved_median": med("moved"), "moved_max": max(r["moved"] for r in rows),
                  "instruction_shift": sorted(set(shifts), key=lambda s: (s is None, s)),
                  "answer_shift_median": med("answer"),
                  "answer_shift_count": {s: answers.count(s) for s in sorted(set(answers))}}


def fmt_set(values):
    return ", ".join(str(v) for v in values)


def table(results):
    lines = ["| tokenizer | header tokens | first difference | same token, first 128 positions (median, min) "
             "| prompt tokens moved (median, max) | instruction moves by | answer moves by (records) |",
             "|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        answer = ", ".join(f"{a:+d} ({c})" if a else f"0 ({c})" for a, c in s["answer_shift_count"].items())
        lines.append(f"| {name} | {fmt_set(s['header'])} | token {fmt_set(s['first'])}, {fmt_set(s['kind'])} "
                     f"| {s['same128_median']:g}, {s['same128_min']} | {s['moved_median']:g}, {s['moved_max']} "
                     f"| {fmt_set(s['instruction_shift'])} | {answer} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per_file", type=int, default=21, help="records per test file (default 21: 294 records)")
    p.add_argument("--data", default=None, help="LLM-Adapters' dataset/ folder (default: ../shared's)")
    p.add_argument("--tokenizer", action="append", default=[],
                   help="NAME=PATH, another tokenizer to measure (a file or a checkpoint directory); repeatable")
    args = p.parse_args(argv)
    records = test_records(args.per_file, args.data)
    if not records:
        sys.exit(f"no LLM-Adapters test files under {args.data or os.path.join(llm_adapters.DEFAULT_ROOT, 'dataset')}")
    paths = {k: v for k, v in TOKENIZERS.items() if os.path.exists(v)}
    for spec in args.tokenizer:
        name, _, path = spec.partition("=")
        paths[name] = path
    results = {name: measure(load_tokenizer(path), records)[1] for name, path in paths.items()}
    print(f"{len(records)} records, the first {args.per_file} of each of "
          f"{len({b for b, _ in records})} test files\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
