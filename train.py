"""Fine-tune a checkpoint with a PEFT method: LLaMA on LLM-Adapters-format data, RoBERTa on GLUE,
BART on XSum, mBART on WMT16 en-ro.

    python train.py                                                 # the embedded CPU demo (demo.py)
    python train.py --model llama-7b --method lorada_q --dry-run    # parameter report, no weights
    python train.py --model /ckpt/llama-7b-hf --method lorada_la --data commonsense_170k --out_dir runs/la
    python train.py ... --out_dir runs/la --resume                  # continue exactly where it stopped
    torchrun --standalone --nproc_per_node 8 train.py --model ... --method lorada_la --out_dir runs/la   # 8 GPUs
    python train.py --model /ckpt/roberta-base --method lorada_a --task sst2 --data glue_data/SST-2
    python train.py --model /ckpt/bart-large --method lorada_a --task xsum --data xsum_dir
    python train.py --model /ckpt/mbart-large-cc25 --method lorada_a --task wmt16-en-ro --data wmt_en_ro_dir

Everything a run writes goes to --out_dir: checkpoint.pt (the latest step: trainable tensors,
optimizer, scheduler, data position, RNG), best.safetensors (best validation score), adapter.safetensors
(the result: best by validation if there is a validation split, else the last), log.jsonl and
args.json. Ctrl-C or SIGTERM saves a checkpoint before exiting. Validation: LLaMA, BART, mBART by
loss on held-out examples; RoBERTa by the task's GLUE metric on the dev set.

Several GPUs (or CPU processes, over gloo): start it with torchrun. Data parallel with the same
global batch: each process runs its share of every step's micro-batches (micro-batch k goes to
process k mod N), then the gradients, already divided by the step's total tokens, are summed
across processes once per step, so the update is the single-process one (dropout masks aside).
Process 0 validates, logs and writes every file; a checkpoint holds each process's RNG state,
so --resume needs the same number of processes.
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import methods
import model as M
from data import glue as G
from data import llm_adapters as D
from data import seq2seq as S


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny", help=f"a checkpoint path, or a preset ({', '.join(M.LLAMA_PRESETS)}) for --dry-run")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in the checkpoint directory)")
    p.add_argument("--method", default="lorada_la", help=f"one of: {', '.join(methods.METHODS)}")
    p.add_argument("--data", default="commonsense_170k", help="LLaMA: a JSON file or a name (" + ", ".join(D.TRAIN_SETS)
                   + "); GLUE: the task's folder of TSVs; XSum / WMT: a folder of train/val JSON lines or .source/.target")
    p.add_argument("--task", default=None, help="RoBERTa: a GLUE task (" + ", ".join(G.TASKS) + "); BART: xsum; "
                   "mBART: wmt16-en-ro. Not for LLaMA.")
    p.add_argument("--out_dir", default="out")
    p.add_argument("--dry-run", action="store_true", help="apply the method, print the trainable-parameter line, exit")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    t = p.add_argument_group("training (default: the registry's preset for the method, model and task)")
    for name, value in methods.TRAIN_DEFAULTS.items():
        t.add_argument(f"--{name}", type=type(value), default=None)
    t.add_argument("--mask_prompt", action="store_true", help="loss on the response only (train_on_inputs=False)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--gradient_checkpointing", action="store_true")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    hp = p.add_argument_group("method hyperparameters (default: the registry's preset for the model)")
    for name, typ in methods.HPARAMS.items():
        hp.add_argument(f"--{name}", type=typ, default=None)
    return p.parse_args(argv)


class Progress:
    """One status line on stderr: step, loss, lr, tokens/s (real tokens), ETA."""

    def __init__(self, total, start=0, quiet=False):
        self.total, self.start, self.quiet, self.t0 = total, start, quiet, time.time()
        self.tty = sys.stderr.isatty()

    def update(self, step, loss, lr, tok_s):
        if self.quiet:
            return
        done = step - self.start
        eta = (time.time() - self.t0) / max(done, 1) * (self.total - step)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step % 10 == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.tty and not self.quiet:
            print(file=sys.stderr)


def setup_distributed(args):
    """(rank, world size): (0, 1) unless torchrun started several processes (WORLD_SIZE > 1); then
    one process per GPU over NCCL (args.device becomes cuda:LOCAL_RANK), or over gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def sum_across_processes(params, loss_sum, stopping, world):
    """Data parallel: add up every process's gradients (its micro-batches' share of the step), the
    step's loss and the stop flags, so that all processes take the same step, or all stop. A
    process with no micro-batch this step contributes zeros."""
    if world == 1:
        return loss_sum, stopping
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    extra = torch.tensor([loss_sum, float(stopping)], device=params[0].device)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params] + [extra])
    dist.all_reduce(flat)                                               # sum
    for p, g in zip(params, flat.split([p.numel() for p in params] + [2])):
        p.grad.copy_(g.view_as(p.grad))
    return float(flat[-2]), bool(flat[-1] > 0)


def linear_schedule(warmup: int, total: int):
    """Linear warmup from 0, then linear decay to 0 at `total` (transformers' default schedule)."""
    def f(step):
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def token_loss_sum(model, batch, device, autocast):
    """Sum of next-token cross-entropies over the labelled tokens of a micro-batch (LLaMA)."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    if bool(batch["attention_mask"].all()):       # (checked on the CPU copy) no padding: no mask,
        mask = None                               # one graph for torch.compile
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = model(ids, attention_mask=mask, return_hidden=True)
        return M.lm_loss(hidden[:, :-1], model.lm_head, labels[:, 1:])      # the LM head fused with the loss


def glue_loss_sum(model, batch, device, autocast):
    """Sum over the examples: cross-entropy, or squared error for STS-B's regression (num_labels 1)."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids, attention_mask=mask).float()
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum")


def decoder_start(model):
    """BART: the decoder starts from decoder_start_token_id; mBART (None): the target's language
    code is wrapped around to the front (shift_tokens_right)."""
    return None if model.cfg.pre_norm else (model.cfg.generation or {}).get("decoder_start_token_id", model.cfg.eos_id)


def seq2seq_loss_sum(model, batch, device, autocast, smoothing=0.0):
    """Sum over the target tokens of the label-smoothed cross-entropy (transformers' LabelSmoother:
    (1 - ε)·NLL + ε·mean over the vocabulary of -log p)."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    dec = M.shift_tokens_right(labels, model.cfg.pad_id, decoder_start(model))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        hidden = model(ids, mask, dec, return_hidden=True)
        return M.lm_loss(hidden, model.shared.weight, labels, model.final_logits_bias, smoothing)   # tied LM head


class Pipeline:
    """What differs between the benchmarks: examples, batches, the loss and validation.

    loss_sum(model, batch) sums the loss over `units(examples)` (labelled tokens, or examples for
    GLUE), so that a step's loss is the mean over its units whatever the micro-batching.
    validate(model) -> (score, its name): a loss, or a GLUE metric negated (lower is better)."""

    def __init__(self, kind, train_set, val_set, hp, pad_id, device, autocast, task=None, model=None):
        self.kind, self.train_set, self.val_set, self.hp, self.task = kind, train_set, val_set, hp, task
        self.pad_id, self.device, self.autocast = pad_id, device, autocast
        self.collate = {"llm": lambda ex: D.collate(ex, pad_id), "glue": lambda ex: G.collate(ex, pad_id)}.get(
            kind, lambda ex: S.collate(ex, pad_id))
        if kind in ("xsum", "mt"):
            self.start = decoder_start(model)

    def loss_sum(self, model, batch):
        if self.kind == "llm":
            return token_loss_sum(model, batch, self.device, self.autocast)
        if self.kind == "glue":
            return glue_loss_sum(model, batch, self.device, self.autocast)
        return seq2seq_loss_sum(model, batch, self.device, self.autocast, self.hp["label_smoothing"])

    def units(self, examples):
        if self.kind == "llm":
            return sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
        if self.kind == "glue":
            return len(examples)
        return sum(len(e["labels"]) for e in examples)

    def tokens(self, examples):
        return sum(len(e["input_ids"]) + len(e.get("labels", [])) * (self.kind in ("xsum", "mt")) for e in examples)

    def steps_per_epoch(self):
        return len(self.epoch_batches(0))

    def epoch_batches(self, epoch):
        """The optimizer steps of one epoch, each a list of micro-batches (lists of example indices)."""
        hp, seed = self.hp, self.hp["seed"] + epoch
        if self.kind == "mt" and hp["max_tokens"]:
            lengths = [max(len(e["input_ids"]), len(e["labels"])) for e in self.train_set]
            micro = S.token_batches(lengths, hp["max_tokens"], seed)
            k = hp["update_freq"]
            return [micro[i:i + k] for i in range(0, len(micro), k)]
        if self.kind == "llm":
            steps = D.length_grouped_batches([len(e["input_ids"]) for e in self.train_set], hp["batch_size"], seed)
        else:
            steps = G.shuffled_batches(len(self.train_set), hp["batch_size"], seed)
        m = hp["micro_batch_size"]
        return [[b[i:i + m] for i in range(0, len(b), m)] for b in steps]

    @torch.no_grad()
    def validate(self, model):
        model.eval()
        try:
            if self.kind == "glue":
                import eval as E
                preds = E.glue_predictions(model, self.val_set, self.pad_id, self.hp["micro_batch_size"], self.device)
                metric = E.glue_metric(self.task, preds, [e["label"] for e in self.val_set])
                main = E.MAIN_METRIC[self.task]
                return -metric[main], main                     # negated: lower is better
            total, n = 0.0, 0
            for i in range(0, len(self.val_set), self.hp["micro_batch_size"]):
                part = self.val_set[i:i + self.hp["micro_batch_size"]]
                total += float(self.loss_sum(model, self.collate(part)))
                n += self.units(part)
            return total / max(n, 1), "loss"
        finally:
            model.train()


def pipeline_kind(model, task):
    if isinstance(model, M.Llama):
        if task is not None:
            raise ValueError(f"--task {task} is for RoBERTa (GLUE) or BART/mBART (xsum, wmt16-en-ro); "
                             f"LLaMA trains on --data")
        return "llm"
    if isinstance(model, M.Roberta):
        if task not in G.TASKS:
            raise ValueError(f"RoBERTa trains on GLUE: give --task, one of {', '.join(G.TASKS)} (got {task})")
        return "glue"
    if task not in S.TASKS:
        raise ValueError(f"BART/mBART train on --task xsum or wmt16-en-ro (got {task})")
    return "xsum" if task == "xsum" else "mt"


def prepare(args):
    """Model (method applied), tokenizer, pipeline (data, batches, loss), training hyperparameters."""
    overrides = {k: getattr(args, k) for k in methods.HPARAMS if getattr(args, k) is not None}
    methods.method_hparams(args.method, (), overrides)       # fail early on an unknown method or flag
    if args.dry_run:
        model = M.build(args.model)
        methods.apply_method(model, args.method, task=args.task, **overrides)
        return model, None, None
    if args.model in M.LLAMA_PRESETS or args.model in M.ENCDEC_PRESETS:
        raise ValueError(f"--model {args.model} is a shape preset without weights: give a checkpoint path "
                         f"(or use --dry-run)")
    tokenizer = M.load_tokenizer(args.tokenizer or (args.model if os.path.isdir(args.model) else os.path.dirname(args.model)))
    trains_base = methods.METHODS[args.method]["parts"][0] in ("full", "bitfit")
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda and not trains_base else torch.float32
    num_labels = G.num_labels(args.task) if args.task in G.TASKS else None
    torch.manual_seed(args.seed if args.seed is not None else methods.TRAIN_DEFAULTS["seed"])   # a fresh GLUE head
    model = M.load(args.model, dtype=dtype, device=args.device, num_labels=num_labels)
    kind = pipeline_kind(model, args.task)
    hp = methods.train_hparams(args.method, methods.model_names(model.cfg), kind, args.task)
    hp.update({k: getattr(args, k) for k in methods.TRAIN_DEFAULTS if getattr(args, k) is not None})
    hp["micro_batch_size"] = min(hp["micro_batch_size"], hp["batch_size"])
    if num_labels is not None and model.head is not None and model.head.dense.weight.dtype != torch.float32:
        model.head.float()                   # a fresh head trains in fp32 next to bf16 frozen weights
    torch.manual_seed(hp["seed"])        # the method's initialisation, then dropout: one seeded stream
    methods.apply_method(model, args.method, task=args.task, **overrides)
    autocast = cuda and next(model.parameters()).dtype == torch.float32   # full / bitfit on GPU
    if kind == "llm":
        records = D.load_records(D.resolve(args.data, split="train"))
        # validation split: a seeded shuffle, as LLM-Adapters' train_test_split(seed=42)
        order = list(range(len(records)))
        random.Random(hp["seed"]).shuffle(order)
        n_val = min(hp["val_set_size"], len(records) // 2)
        examples = [D.tokenize(tokenizer, records[i], hp["cutoff_len"], not args.mask_prompt) for i in order]
        train_set, val_set = examples[n_val:], examples[:n_val]
    elif kind == "glue":
        first_dev = next(iter(G.EVAL_SPLITS[args.task]))
        train_set, val_set = ([G.tokenize(tokenizer, r, hp["cutoff_len"]) for r in
                               G.load_glue(args.task, G.split_file(args.task, args.data, split))]
                              for split in ("train", first_dev))
        val_set = val_set[:hp["val_set_size"]]
    else:
        langs = ("en_XX", "ro_RO") if kind == "mt" and model.cfg.pre_norm else (None, None)
        tgt_len = hp["max_target_len"] or hp["cutoff_len"]
        load = lambda split: [S.tokenize(tokenizer, p, hp["cutoff_len"], tgt_len, *langs)
                              for p in S.load_pairs(args.task, args.data, split)]
        train_set = load("train")
        try:
            val_set = load("val")[:hp["val_set_size"]]
        except FileNotFoundError:
            val_set = []
    pipe = Pipeline(kind, train_set, val_set, hp, tokenizer.pad_id, args.device, autocast, args.task, model)
    return model, pipe, hp


def train(args):
    rank, world = (0, 1) if args.dry_run else setup_distributed(args)
    model, pipe, hp = prepare(args)
    if rank == 0:
        print(methods.parameter_report(model))
    if args.dry_run:
        return None
    if world > 1:
        torch.manual_seed(hp["seed"] + rank)       # the same initialisation everywhere, then own dropout masks
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    if args.gradient_checkpointing:
        model.gradient_checkpointing = True
    forward_model = torch.compile(model, dynamic=True) if args.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {args.method!r} trains no parameter of this model")
    optimizer = torch.optim.AdamW(params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"],
                                  betas=(0.9, hp["adam_beta2"]), eps=hp["adam_eps"])
    per_epoch = pipe.steps_per_epoch()
    total = per_epoch * hp["num_epochs"]
    if hp["max_steps"]:
        total = min(total, hp["max_steps"]) if hp["num_epochs"] else hp["max_steps"]
    warmup = math.ceil(hp["warmup_ratio"] * total) if hp["warmup_ratio"] else hp["warmup_steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total))
    every = lambda k: k if k > 0 else per_epoch                     # 0: once per epoch
    state = {"step": 0, "best_val": float("inf")}

    if args.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: {ckpt_path} does not exist")
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["method"] != model.peft_method:
            raise ValueError(f"--resume: {ckpt_path} was written for {ck['method']}, not {model.peft_method}")
        rngs = ck["rng"]                                          # one RNG state per process
        if len(rngs) != world:
            raise ValueError(f"--resume: {ckpt_path} was written by {len(rngs)} process(es) and this run has "
                             f"{world}: resume with the same number (torchrun --nproc_per_node {len(rngs)})")
        with torch.no_grad():
            current = methods.adapter_state(model)
            for k, t in ck["tensors"].items():
                current[k].copy_(t)
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        state = ck["state"]
        set_rng_state(rngs[rank])
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {state['step']}")
    if rank == 0:
        with open(os.path.join(args.out_dir, "args.json"), "w") as f:
            json.dump({"args": vars(args), "train": hp, "method": model.peft_method, "processes": world}, f, indent=2)

    def save_checkpoint():                          # every process calls it (it gathers their RNG states)
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if rank == 0:
            atomic_save({"tensors": {k: v.detach().cpu() for k, v in methods.adapter_state(model).items()},
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "state": dict(state), "rng": rngs, "method": model.peft_method}, ckpt_path)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if rank == 0 else None
    progress = Progress(total, state["step"], args.quiet or rank > 0)
    model.train()
    epoch_cache = {}
    try:
        while state["step"] < total:
            epoch, index = divmod(state["step"], per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = pipe.epoch_batches(epoch)
            micro_batches = [[pipe.train_set[i] for i in b] for b in epoch_cache[epoch][index]]
            examples = [e for b in micro_batches for e in b]
            n_units = pipe.units(examples)
            t0 = time.time()
            loss_sum = 0.0
            for part in micro_batches[rank::world]:            # this process's share of the step
                loss = pipe.loss_sum(forward_model, pipe.collate(part)) / max(n_units, 1)
                loss.backward()
                loss_sum += float(loss.detach())
            loss_sum, stopping = sum_across_processes(params, loss_sum, stop["signal"] is not None, world)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss is {loss_sum} at step {state['step'] + 1}; stopping. The last "
                                         f"good checkpoint is {ckpt_path if os.path.exists(ckpt_path) else 'none'}")
            torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            real = pipe.tokens(examples)
            tok_s = real / max(time.time() - t0, 1e-9)
            lr = scheduler.get_last_lr()[0]
            record = {"step": state["step"], "loss": loss_sum, "lr": lr, "tokens_per_s": tok_s, "tokens": real}
            if rank == 0 and pipe.val_set and (state["step"] % every(hp["eval_step"]) == 0 or state["step"] == total):
                score, what = pipe.validate(model)
                record["val_" + what] = score if what == "loss" else -score
                state["val_what"] = what
                if score < state["best_val"]:
                    state["best_val"] = score
                    methods.save_adapter(model, os.path.join(args.out_dir, "best" + methods.ADAPTER_EXT))
            if rank == 0:
                log.write(json.dumps(record) + "\n")
                log.flush()
            progress.update(state["step"], loss_sum, lr, tok_s)
            if state["step"] % every(hp["save_step"]) == 0 or stopping:
                save_checkpoint()
            if stopping:
                progress.close()
                signum = int(stop["signal"] or signal.SIGTERM)         # (or another process got it)
                if rank == 0:
                    print(f"stopped by signal {signum} at step {state['step']}; checkpoint saved to {ckpt_path}; "
                          f"continue with --resume", file=sys.stderr)
                sys.exit(128 + signum)
        save_checkpoint()
    finally:
        progress.close()
        if log is not None:
            log.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    if rank > 0:
        return model
    final = os.path.join(args.out_dir, "adapter" + methods.ADAPTER_EXT)
    best = os.path.join(args.out_dir, "best" + methods.ADAPTER_EXT)
    if pipe.val_set and os.path.exists(best):
        os.replace(best, final)          # the checkpoint with the best validation score
        what, best_val = state.get("val_what", "loss"), state["best_val"]
        print(f"best validation {what} {best_val if what == 'loss' else -best_val:.4f}; adapter written to {final}")
    else:
        methods.save_adapter(model, final)
        print(f"adapter written to {final}")
    return model


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        import demo
        return demo.main()
    args = parse_args(argv)
    try:
        return train(args)
    except (ValueError, FileNotFoundError, FloatingPointError, M.CheckpointError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
