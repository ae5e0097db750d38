"""Fine-tune a LLaMA checkpoint with a PEFT method on LLM-Adapters-format data.

    python train.py                                                 # the embedded CPU demo (demo.py)
    python train.py --model llama-7b --method lorada_q --dry-run    # parameter report, no weights
    python train.py --model /ckpt/llama-7b-hf --method lorada_la --data commonsense_170k --out_dir runs/la
    python train.py ... --out_dir runs/la --resume                  # continue exactly where it stopped

Everything a run writes goes to --out_dir: checkpoint.pt (the latest step: trainable tensors,
optimizer, scheduler, data position, RNG), best.safetensors (best validation loss), adapter.safetensors
(the result: best by validation loss if there is a validation split, else the last), log.jsonl and
args.json. Ctrl-C or SIGTERM saves a checkpoint before exiting.
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
import torch.nn.functional as F

import methods
import model as M
from data import llm_adapters as D


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny", help=f"a checkpoint path, or a preset ({', '.join(M.LLAMA_PRESETS)}) for --dry-run")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in the checkpoint directory)")
    p.add_argument("--method", default="lorada_la", help=f"one of: {', '.join(methods.METHODS)}")
    p.add_argument("--data", default="commonsense_170k", help="a JSON file or a name: " + ", ".join(D.TRAIN_SETS))
    p.add_argument("--out_dir", default="out")
    p.add_argument("--dry-run", action="store_true", help="apply the method, print the trainable-parameter line, exit")
    p.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint.pt")
    p.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    t = p.add_argument_group("training (default: the registry's preset for the method and model)")
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
    """Sum of next-token cross-entropies over the labelled tokens of a micro-batch."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids, attention_mask=mask)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")


@torch.no_grad()
def validation_loss(model, examples, micro, pad_id, device, autocast):
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), micro):
        batch = D.collate(examples[i:i + micro], pad_id)
        total += float(token_loss_sum(model, batch, device, autocast))
        n += int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    return total / max(n, 1)


def prepare(args):
    """Model (method applied), tokenizer, train/validation examples, training hyperparameters."""
    overrides = {k: getattr(args, k) for k in methods.HPARAMS if getattr(args, k) is not None}
    methods.method_hparams(args.method, (), overrides)       # fail early on an unknown method or flag
    if args.dry_run:
        model = M.build(args.model)
        methods.apply_method(model, args.method, **overrides)
        return model, None, None, None, None
    if args.model in M.LLAMA_PRESETS:
        raise ValueError(f"--model {args.model} is a shape preset without weights: give a checkpoint path "
                         f"(or use --dry-run)")
    tokenizer = M.load_tokenizer(args.tokenizer or (args.model if os.path.isdir(args.model) else os.path.dirname(args.model)))
    records = D.load_records(D.resolve(args.data, split="train"))
    trains_base = methods.METHODS[args.method]["parts"][0] in ("full", "bitfit")
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda and not trains_base else torch.float32
    model = M.load(args.model, dtype=dtype, device=args.device)
    hp = methods.train_hparams(args.method, M.preset_name(model.cfg))
    hp.update({k: getattr(args, k) for k in methods.TRAIN_DEFAULTS if getattr(args, k) is not None})
    hp["micro_batch_size"] = min(hp["micro_batch_size"], hp["batch_size"])
    torch.manual_seed(hp["seed"])        # the method's initialisation, then dropout: one seeded stream
    methods.apply_method(model, args.method, **overrides)
    # validation split: a seeded shuffle, as LLM-Adapters' train_test_split(seed=42)
    order = list(range(len(records)))
    random.Random(hp["seed"]).shuffle(order)
    n_val = min(hp["val_set_size"], len(records) // 2)
    examples = [D.tokenize(tokenizer, records[i], hp["cutoff_len"], not args.mask_prompt) for i in order]
    return model, tokenizer, examples[n_val:], examples[:n_val], hp


def train(args):
    model, tokenizer, train_set, val_set, hp = prepare(args)
    print(methods.parameter_report(model))
    if args.dry_run:
        return None
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "checkpoint.pt")
    device, cuda = args.device, args.device.startswith("cuda")
    autocast = cuda and next(model.parameters()).dtype == torch.float32   # full / bitfit on GPU
    if args.gradient_checkpointing:
        model.gradient_checkpointing = True
    forward_model = torch.compile(model, dynamic=True) if args.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {args.method!r} trains no parameter of this model")
    optimizer = torch.optim.AdamW(params, lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    per_epoch = math.ceil(len(train_set) / hp["batch_size"])
    total = per_epoch * hp["num_epochs"]
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(hp["warmup_steps"], total))
    lengths = [len(e["input_ids"]) for e in train_set]
    state = {"step": 0, "best_val": float("inf")}

    if args.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: {ckpt_path} does not exist")
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["method"] != model.peft_method:
            raise ValueError(f"--resume: {ckpt_path} was written for {ck['method']}, not {model.peft_method}")
        with torch.no_grad():
            current = methods.adapter_state(model)
            for k, t in ck["tensors"].items():
                current[k].copy_(t)
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        state = ck["state"]
        set_rng_state(ck["rng"])
        print(f"resumed from {ckpt_path} at step {state['step']}")
    with open(os.path.join(args.out_dir, "args.json"), "w") as f:
        json.dump({"args": vars(args), "train": hp, "method": model.peft_method}, f, indent=2)

    def save_checkpoint():
        atomic_save({"tensors": {k: v.detach().cpu() for k, v in methods.adapter_state(model).items()},
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "state": dict(state), "rng": rng_state(), "method": model.peft_method}, ckpt_path)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log = open(os.path.join(args.out_dir, "log.jsonl"), "a")
    progress = Progress(total, state["step"], args.quiet)
    model.train()
    micro = hp["micro_batch_size"]
    try:
        while state["step"] < total:
            epoch, index = divmod(state["step"], per_epoch)
            batch_ids = D.length_grouped_batches(lengths, hp["batch_size"], hp["seed"] + epoch)[index]
            examples = [train_set[i] for i in batch_ids]
            n_tokens = sum(sum(1 for x in e["labels"][1:] if x != -100) for e in examples)
            t0 = time.time()
            loss_sum = 0.0
            for i in range(0, len(examples), micro):
                batch = D.collate(examples[i:i + micro], tokenizer.pad_id)
                loss = token_loss_sum(forward_model, batch, device, autocast) / max(n_tokens, 1)
                loss.backward()
                loss_sum += float(loss.detach())
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"loss is {loss_sum} at step {state['step'] + 1}; stopping. The last "
                                         f"good checkpoint is {ckpt_path if os.path.exists(ckpt_path) else 'none'}")
            torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            real = sum(len(e["input_ids"]) for e in examples)
            tok_s = real / max(time.time() - t0, 1e-9)
            lr = scheduler.get_last_lr()[0]
            record = {"step": state["step"], "loss": loss_sum, "lr": lr, "tokens_per_s": tok_s, "tokens": real}
            if val_set and (state["step"] % hp["eval_step"] == 0 or state["step"] == total):
                record["val_loss"] = validation_loss(model, val_set, micro, tokenizer.pad_id, device, autocast)
                if record["val_loss"] < state["best_val"]:
                    state["best_val"] = record["val_loss"]
                    methods.save_adapter(model, os.path.join(args.out_dir, "best" + methods.ADAPTER_EXT))
            log.write(json.dumps(record) + "\n")
            log.flush()
            progress.update(state["step"], loss_sum, lr, tok_s)
            if state["step"] % hp["save_step"] == 0 or stop["signal"] is not None:
                save_checkpoint()
            if stop["signal"] is not None:
                progress.close()
                print(f"stopped by signal {stop['signal']} at step {state['step']}; checkpoint saved to {ckpt_path}; "
                      f"continue with --resume", file=sys.stderr)
                sys.exit(128 + stop["signal"])
        save_checkpoint()
    finally:
        progress.close()
        log.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    final = os.path.join(args.out_dir, "adapter" + methods.ADAPTER_EXT)
    best = os.path.join(args.out_dir, "best" + methods.ADAPTER_EXT)
    if val_set and os.path.exists(best):
        os.replace(best, final)          # the checkpoint with the lowest validation loss
        print(f"best validation loss {state['best_val']:.4f}; adapter written to {final}")
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


if __name__ == "__main__":
    main()
