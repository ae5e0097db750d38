"""The benchmarks train.py trains on, as data: for each, a function that reads its files and returns
a Pipeline, the few small functions in which the benchmarks differ (the examples, how they are
batched, the loss, the validation score). train.py's loop is the same for all of them.

    llm      LLaMA on LLM-Adapters' commonsense / arithmetic data (their finetune.py)
    quanta   LLaMA as QuanTA's run.py trains it (--protocol quanta)
    glue     RoBERTa, DeBERTaV3 on a GLUE task (He et al.'s run_glue.sh)
    xsum/mt  BART on XSum, mBART on WMT16 en-ro (He et al.)
    lm       LLaMA on plain text in rows of L tokens (LongLoRA)
"""
import math
import os
import random
from array import array
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import model as M
from data import glue, llm_adapters, quanta, seq2seq, text
from eval import MAIN_METRIC, glue_metric, glue_predictions
from eval_quanta import option_scores, quanta_generate, quanta_math_correct
from loss import lm_loss


@dataclass
class Pipeline:
    """What differs between the benchmarks, as data: the examples, how to batch them, the loss and
    the validation score. Each field is a small function, built by one of the *_pipeline
    functions below.

    loss_sum(model, batch) sums the loss over the batch's units (labelled tokens; examples for
    GLUE), and units(examples) counts them, so that a step's loss is the mean over its units
    whatever the micro-batching. validate(model) -> (the metric's name, its value): "loss", lower
    is better, or a metric such as "accuracy", higher is better (improves() compares them)."""
    train_set: list
    val_set: list
    collate: Callable          # examples -> a batch of tensors
    loss_sum: Callable         # (model, batch) -> the summed loss (a scalar tensor)
    units: Callable            # examples -> how many loss terms they hold
    tokens: Callable           # examples -> tokens processed (for tokens/s)
    epoch_batches: Callable    # epoch -> its optimizer steps, each a list of micro-batches of indices
    validate: Callable         # model -> (metric name, value)


# ----------------------------------------------------------------------------- batches

def shuffled_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch of index batches in a seeded random order (transformers' default sampler)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def micro_batches(steps, micro_batch_size):
    """Split each step's examples into micro-batches."""
    return [[b[i:i + micro_batch_size] for i in range(0, len(b), micro_batch_size)] for b in steps]


def shuffled_epochs(n: int, hp: dict):
    """epoch_batches for the random sampler: epoch e's order seeded with seed + e (so a resumed run
    finds it again), each step's examples split into micro-batches."""
    def epoch_batches(epoch):
        return micro_batches(shuffled_batches(n, hp["batch_size"], hp["seed"] + epoch), hp["micro_batch_size"])
    return epoch_batches


# ----------------------------------------------------------------------------- validation, the loss

def improves(metric: str, value: float, best: float | None) -> bool:
    """Whether a validation score beats the best so far (None: no score yet). A loss is better
    lower; every other metric (accuracy, Matthews correlation, Pearson) is better higher. NaN never
    improves."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def validation_loss(val_set, collate, loss_sum, units, micro_batch_size):
    """validate(model) for the pipelines scored by their loss on held-out examples."""
    def validate(model):
        total, n = 0.0, 0
        for i in range(0, len(val_set), micro_batch_size):
            part = val_set[i:i + micro_batch_size]
            total += float(loss_sum(model, collate(part)))
            n += units(part)
        return "loss", total / max(n, 1)
    return validate


def micro_batch_mean(total, batch):
    """The Hugging Face Trainer's loss with gradient accumulation, as LLM-Adapters (transformers
    4.28-era) and QuanTA (4.41.1) ran it: the model returns each micro-batch's mean over its own
    labelled tokens, and the Trainer divides it by gradient_accumulation_steps before backward, so
    a step's gradient is that of the mean of its micro-batches' means: a token in a micro-batch
    with few labelled tokens weighs more than one in a long micro-batch. (transformers >= 4.46
    divides by the step's token count instead, which is --token_weighted_loss.)

    Returned as the micro-batch's mean times its number of examples, with the pipeline's units
    counting examples: the loop's division by the step's units then gives the mean of the
    micro-batch means, each weighted by its examples, which are equal but for an epoch's last,
    shorter micro-batch (the Trainer divides that one by gradient_accumulation_steps all the same).
    `total` is the summed token loss of `batch`; the count is read from the CPU labels."""
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    return total / max(n_tokens, 1) * batch["labels"].shape[0]


# ----------------------------------------------------------------------------- the benchmarks

def llm_pipeline(args, model, tokenizer, hp, device, autocast):
    """LLaMA on LLM-Adapters' data: next-token cross-entropy over the prompt and the response
    (train_on_inputs=True, their default), validation by loss on val_set_size held-out examples.
    As their finetune.py trains (the Hugging Face Trainer): the held-out examples are the ones
    datasets' train_test_split(test_size=val_set_size, shuffle=True, seed=42) holds out, batches
    are drawn at random (--group_by_length: of similar lengths), and the loss is the mean of the
    micro-batches' mean token losses (--token_weighted_loss: the mean over the step's tokens)."""
    records = llm_adapters.load_records(llm_adapters.resolve(args.data, split="train"))
    n_val = min(hp["val_set_size"], len(records) // 2)
    train_idx, val_idx = llm_adapters.train_test_split(len(records), n_val)     # seed 42, whatever --seed is
    tokenize = lambda i: llm_adapters.tokenize(tokenizer, records[i], hp["cutoff_len"], not args.mask_prompt)
    train_set, val_set = [tokenize(i) for i in train_idx], [tokenize(i) for i in val_idx]

    def collate(ex):
        return llm_adapters.collate(ex, tokenizer.pad_id)

    def loss_sum(model, batch):
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        if bool(batch["attention_mask"].all()):   # (checked on the CPU copy) no padding: no mask,
            mask = None                           # one graph for torch.compile
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            hidden = model(ids, attention_mask=mask, return_hidden=True)
            total = lm_loss(hidden[:, :-1], model.lm_head, labels[:, 1:])    # the LM head fused with the loss
        return total if args.token_weighted_loss else micro_batch_mean(total, batch)

    def units(ex):
        if not args.token_weighted_loss:
            return len(ex)                                 # micro_batch_mean's units: examples
        return sum(sum(1 for x in e["labels"][1:] if x != -100) for e in ex)

    def grouped_by_length(epoch):
        lengths = [len(e["input_ids"]) for e in train_set]
        steps = llm_adapters.length_grouped_batches(lengths, hp["batch_size"], hp["seed"] + epoch)
        return micro_batches(steps, hp["micro_batch_size"])
    # the Trainer's random sampler, or its --group_by_length
    epoch_batches = grouped_by_length if args.group_by_length else shuffled_epochs(len(train_set), hp)

    return Pipeline(train_set, val_set, collate, loss_sum, units, lambda ex: sum(len(e["input_ids"]) for e in ex),
                    epoch_batches, validation_loss(val_set, collate, loss_sum, units, hp["micro_batch_size"]))


def quanta_pipeline(args, model, tokenizer, hp, device, autocast):
    """LLaMA on LLM-Adapters' data under QuanTA's protocol (--protocol quanta; its run.py with
    ft_com.sh, data/quanta.py). The dev set: the last val_set_size (400) examples of a permutation
    of the file seeded with 271828; the rest trains, in random batches.
    Commonsense (--train_as_classification): each example is all its candidates, each scored by the
    mean log-probability of its answer tokens (eval_quanta.option_scores), and the loss is the
    cross-entropy of those scores against the gold candidate, one term per example; validation by
    rank-classification accuracy on the dev set (QuanTA selects its best checkpoint by it).
    Math: cross-entropy over the answer tokens only, the Trainer's mean of micro-batch means;
    validation by the accuracy of greedy answers on the dev set, with the correct metric (QuanTA
    selects by its released one, which counts any prediction >= gold as correct)."""
    records = llm_adapters.load_records(llm_adapters.resolve(args.data, split="train"),
                                        fields=("instruction", "output", "answer"))
    n_dev = min(hp["val_set_size"], len(records) // 2)
    train_idx, dev_idx = quanta.split(len(records), n_dev)
    build = quanta_choice_pipeline if args.task == "commonsense" else quanta_math_pipeline
    return build(args, records, train_idx, dev_idx, tokenizer, hp, device, autocast)


def quanta_choice_pipeline(args, records, train_idx, dev_idx, tokenizer, hp, device, autocast):
    """QuanTA's commonsense, trained as classification over each example's candidates (quanta_pipeline)."""
    where = lambda i: f"{args.data} record {i}"
    prepared = {}
    for i in train_idx + dev_idx:
        e = quanta.tokenize_choices(tokenizer, quanta.choice_sample(records[i], where(i)), hp["cutoff_len"])
        e["candidates"] = [array("i", c) for c in e["candidates"]]      # 4 bytes a token, not a Python int
        prepared[i] = e
    train_set, val_set = [prepared[i] for i in train_idx], [prepared[i] for i in dev_idx]

    def collate(ex):
        return quanta.collate_choices(ex, tokenizer.pad_id)

    def loss_sum(model, batch):
        scores = option_scores(model, batch, device, autocast)
        labels, total, start = batch["labels"].to(scores.device), 0, 0
        for j, n in enumerate(batch["counts"]):      # utils.forward_wrap_with_option_len, per example
            total = total + F.cross_entropy(scores[start:start + n][None], labels[j:j + 1], reduction="sum")
            start += n
        return total

    def validate(model):
        correct = 0
        for s in range(0, len(val_set), 8):
            part = val_set[s:s + 8]
            batch = collate(part)
            scores, start = option_scores(model, batch, device, autocast).tolist(), 0
            for e, n in zip(part, batch["counts"]):
                row = scores[start:start + n]
                correct += max(range(n), key=row.__getitem__) == e["label"]
                start += n
        return "accuracy", correct / max(len(val_set), 1)

    tokens = lambda ex: sum(len(c) for e in ex for c in e["candidates"])
    return Pipeline(train_set, val_set, collate, loss_sum, len, tokens, shuffled_epochs(len(train_set), hp),
                    validate)                                             # the Trainer's random sampler


def quanta_math_pipeline(args, records, train_idx, dev_idx, tokenizer, hp, device, autocast):
    """QuanTA's math, trained on the answer tokens, validated by greedy answers (quanta_pipeline)."""
    max_length = hp["cutoff_len"]
    samples = {i: quanta.math_sample(records[i]) for i in train_idx + dev_idx}
    train_set = [quanta.tokenize_target(tokenizer, samples[i], max_length - quanta.MAX_NEW_TOKENS) for i in train_idx]
    dev = [samples[i] for i in dev_idx]
    val_set = [{"prompt": quanta.prompt_ids(tokenizer, s["question"], max_length - quanta.MAX_NEW_TOKENS),
                "answer": s["answer"]} for s in dev]

    def collate(ex):
        return llm_adapters.collate(ex, tokenizer.pad_id)

    def loss_sum(model, batch):
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        mask = None if bool(batch["attention_mask"].all()) else mask
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            hidden = model(ids, attention_mask=mask, return_hidden=True)
            total = lm_loss(hidden[:, :-1], model.lm_head, labels[:, 1:])
        return micro_batch_mean(total, batch)

    def validate(model):
        correct = 0
        for s in range(0, len(val_set), 8):
            part = val_set[s:s + 8]
            for e, response in zip(part, quanta_generate(model, tokenizer, [e["prompt"] for e in part],
                                                          max_length=max_length)):
                correct += quanta_math_correct(e["answer"], response)[0]
        return "accuracy", correct / max(len(val_set), 1)

    return Pipeline(train_set, val_set, collate, loss_sum, len, lambda ex: sum(len(e["input_ids"]) for e in ex),
                    shuffled_epochs(len(train_set), hp), validate)          # the Trainer's random sampler


def glue_pipeline(args, model, tokenizer, hp, device, autocast):
    """RoBERTa or DeBERTa on a GLUE task: cross-entropy (squared error for STS-B) over the examples,
    validation by the task's metric on the first val_set_size dev examples (He et al.)."""
    first_dev = next(iter(glue.EVAL_SPLITS[args.task]))
    train_set, val_set = ([glue.tokenize(tokenizer, r, hp["cutoff_len"])
                           for r in glue.load_glue(args.task, glue.split_file(args.task, args.data, split))]
                          for split in ("train", first_dev))
    val_set = val_set[:hp["val_set_size"]]

    def loss_sum(model, batch):
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids, attention_mask=mask).float()
        if logits.shape[-1] == 1:                                         # STS-B: regression
            return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
        return F.cross_entropy(logits, labels, reduction="sum")

    def validate(model):
        preds = glue_predictions(model, val_set, tokenizer.pad_id, hp["micro_batch_size"], device)
        main = MAIN_METRIC[args.task]
        return main, glue_metric(args.task, preds, [e["label"] for e in val_set])[main]

    return Pipeline(train_set, val_set, lambda ex: glue.collate(ex, tokenizer.pad_id), loss_sum, len,
                    lambda ex: sum(len(e["input_ids"]) for e in ex), shuffled_epochs(len(train_set), hp), validate)


def seq2seq_pipeline(args, model, tokenizer, hp, device, autocast):
    """BART on XSum, mBART on WMT16 en-ro: label-smoothed cross-entropy over the target tokens
    (transformers' LabelSmoother), validation by loss; MT batches by a token budget (fairseq)."""
    mt = args.task != "xsum"
    langs = ("en_XX", "ro_RO") if mt and model.cfg.model_type == "mbart" else (None, None)
    tgt_len = hp["max_target_len"] or hp["cutoff_len"]

    def read(split):
        return [seq2seq.tokenize(tokenizer, p, hp["cutoff_len"], tgt_len, *langs)
                for p in seq2seq.load_pairs(args.task, args.data, split)]
    train_set = read("train")
    try:
        val_set = read("val")[:hp["val_set_size"]]
    except FileNotFoundError:
        val_set = []
    # BART's decoder starts from decoder_start_token_id; mBART's (None) from the target's
    # language code, wrapped around to the front (shift_tokens_right)
    generation = model.cfg.generation or {}
    start = None if model.cfg.model_type == "mbart" else generation.get("decoder_start_token_id", model.cfg.eos_id)

    def collate(ex):
        return seq2seq.collate(ex, tokenizer.pad_id)

    def loss_sum(model, batch):
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        dec = M.shift_tokens_right(labels, model.cfg.pad_id, start)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            hidden = model(ids, mask, dec, return_hidden=True)
            return lm_loss(hidden, model.shared.weight, labels, model.final_logits_bias, hp["label_smoothing"])

    def units(ex):
        return sum(len(e["labels"]) for e in ex)

    def epoch_batches(epoch):
        if mt and hp["max_tokens"]:
            lengths = [max(len(e["input_ids"]), len(e["labels"])) for e in train_set]
            micro = seq2seq.token_batches(lengths, hp["max_tokens"], hp["seed"] + epoch)
            k = hp["update_freq"]
            return [micro[i:i + k] for i in range(0, len(micro), k)]
        return shuffled_epochs(len(train_set), hp)(epoch)

    return Pipeline(train_set, val_set, collate, loss_sum, units,
                    lambda ex: sum(len(e["input_ids"]) + len(e["labels"]) for e in ex), epoch_batches,
                    validation_loss(val_set, collate, loss_sum, units, hp["micro_batch_size"]))


def lm_pipeline(args, model, tokenizer, hp, device, autocast):
    """LLaMA on plain text (LongLoRA's pipeline, Table 7): the documents tokenized between BOS and
    EOS (--text_layout longlora: LongLoRA's own stream), joined, and cut into rows of exactly
    cutoff_len tokens (data/text.py; a token file in the run's folder, train_tokens.bin, read
    through a memory map and made again when the data or the tokenizer differ from what its
    train_tokens.bin.meta.json records), in random order; the loss on every next token.
    The last val_set_size rows are held out when asked for (LongLoRA has none)."""
    os.makedirs(args.out_dir, exist_ok=True)
    L, longlora = hp["cutoff_len"], args.text_layout == "longlora"
    pad = tokenizer.vocab_size if longlora else None              # LongLoRA's [PAD]: the id after the vocabulary
    if longlora and model.cfg.vocab_size <= pad:
        raise ValueError(f"--text_layout longlora pads with a [PAD] token (id {pad}) that this model's embedding "
                         f"does not have: use it with --method longlora or longlora+lmam, which add it")
    tokens = text.token_file(args.data, tokenizer, os.path.join(args.out_dir, "train_tokens.bin"),
                             args.text_layout, L if longlora else None)
    n = len(tokens) // L
    if n == 0:
        raise ValueError(f"{args.data}: {len(tokens)} tokens, fewer than one row of --cutoff_len {L}")
    n_val = min(hp["val_set_size"], n // 2)
    train_set, val_set = text.Rows(tokens, L, 0, n - n_val, pad), text.Rows(tokens, L, n - n_val, n, pad)

    def collate(ex):
        return llm_adapters.collate(ex, tokenizer.pad_id)

    def loss_sum(model, batch):
        ids = batch["input_ids"].to(device)                   # rows of exactly L tokens: no mask
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            labels = batch["labels"].to(device)[:, 1:]        # the next tokens ([PAD]: -100, no loss)
            return lm_loss(model(ids, return_hidden=True)[:, :-1], model.lm_head, labels)

    units = lambda ex: sum(sum(t != -100 for t in e["labels"][1:]) for e in ex)     # [PAD] is no unit
    return Pipeline(train_set, list(val_set), collate, loss_sum, units, lambda ex: len(ex) * L,
                    shuffled_epochs(len(train_set), hp),
                    validation_loss(list(val_set), collate, loss_sum, units, hp["micro_batch_size"]))


# pipeline name -> (the model class it trains, its tasks, the function that builds it)
PIPELINES = {"llm": (M.Llama, ("commonsense", "math"), llm_pipeline),
             "lm": (M.Llama, ("lm",), lm_pipeline),
             "glue": ((M.Roberta, M.Deberta), tuple(glue.TASKS), glue_pipeline),     # isinstance's tuple
             "xsum": (M.Bart, ("xsum",), seq2seq_pipeline),
             "mt": (M.Bart, ("wmt16-en-ro",), seq2seq_pipeline),
             "quanta": (M.Llama, ("commonsense", "math"), quanta_pipeline)}
# --protocol -> its pipeline; these pipelines run only when asked for
PROTOCOLS = {"quanta": "quanta"}


def task_of(model, args) -> str | None:
    """--task, or LLaMA's default when it is not given: math for math_* data, else commonsense."""
    if isinstance(model, M.Llama) and args.task is None:
        return "math" if os.path.basename(args.data).startswith("math") else "commonsense"
    return args.task


def pipeline_name(model, args) -> str:
    """Which benchmark a model and its task (task_of) train on (--protocol: whose pipeline)."""
    task = task_of(model, args)
    protocol = getattr(args, "protocol", "default")
    if protocol != "default":
        cls, tasks, _ = PIPELINES[PROTOCOLS[protocol]]
        if isinstance(model, cls) and task in tasks:
            return PROTOCOLS[protocol]
        raise ValueError(f"--protocol {protocol} trains {cls.__name__} on {' or '.join(tasks)}, not "
                         f"{type(model).__name__} on {task}")
    for name, (cls, tasks, _) in PIPELINES.items():
        if name not in PROTOCOLS.values() and isinstance(model, cls) and task in tasks:
            return name
    valid = [t for name, (cls, tasks, _) in PIPELINES.items()
             if name not in PROTOCOLS.values() and isinstance(model, cls) for t in tasks]
    raise ValueError(f"--task {task} is not a task for {type(model).__name__}; valid: {', '.join(valid)}")
