"""Fine-tune a checkpoint with a PEFT method: LLaMA on LLM-Adapters-format data, RoBERTa on GLUE,
BART on XSum, mBART on WMT16 en-ro.

    python train.py                                                 # the CPU demo (demo.py)
    python train.py --method lorada_q --model llama-7b              # downloads huggyllama/llama-7b and commonsense_170k
    python train.py --model llama-7b --method lorada_q --dry_run    # parameter report, no weights
    python train.py --model /ckpt/llama-7b-hf --method lorada_la --data commonsense_170k --out_dir runs/la
    python train.py --model /ckpt/llama-2-7b-hf --method lorada_q --data math_10k --protocol quanta   # QuanTA's pipeline
    python train.py --model /ckpt/roberta-base --method lorada_a --task sst2 --preset table5-0.06 ...  # a named preset
    python train.py ... --out_dir runs/la --resume                  # continue exactly where it stopped
    torchrun --standalone --nproc_per_node 8 train.py --model ... --method lorada_la --out_dir runs/la   # 8 GPUs
    python train.py --model /ckpt/roberta-base --method lorada_a --task sst2 --data glue_data/SST-2
    python train.py --model /ckpt/bart-large --method lorada_a --task xsum --data xsum_dir
    python train.py --model /ckpt/mbart-large-cc25 --method lorada_a --task wmt16-en-ro --data wmt_en_ro_dir

Every setting defaults to the paper's (or the method's reference's) value for the method, model and
task: presets.py has them, one row each, with their source; a flag overrides it.

Everything a run writes goes to --out_dir: checkpoint.pt (the latest step: trainable tensors,
optimizer, scheduler, data position, RNG), best.safetensors (best validation score),
adapter.safetensors (the result: best by validation if there is a validation split, else the
last), log.jsonl and args.json. Ctrl-C or SIGTERM saves a checkpoint before exiting.

A run owns its folder: train.lock (its pid) keeps a second run out while it runs; a new run into a
folder that holds a run is refused (--resume continues it, --overwrite starts over); --resume
loads checkpoint.pt as plain data (no code runs from it) and refuses another base model, other data
or other settings than the checkpoint's, naming the difference. A finished run is not run again:
a larger --max_steps / --num_epochs extends it, keeping the best adapter by validation.

Several GPUs (or CPU processes, over gloo): start it with torchrun. Data parallel with the same
global batch: each process runs its share of every step's micro-batches, then the gradients are
summed across processes once per step, so the update is the single-process one (dropout masks
aside). Process 0 validates, logs and writes every file; --resume needs the same process count.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import pickle
import random
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

import fsdp
import hub
import methods
import model as M
from checkpoint import CheckpointError, build, load
from data import glue, llm_adapters
from lmam import map_sizes
from pipelines import PIPELINES, improves, pipeline_name, task_of
from presets import NAMED_PRESETS, TRAIN_DEFAULTS
from runs import atomic_write, check_device, content_hash, default_precision, pid_alive
from tokenizer import load_tokenizer

# ----------------------------------------------------------------------------- the command line

# Training flags: what each means. Their values come from presets.py's rows for the method, model and
# task (--dry_run prints each, and the row it came from).
TRAIN_HELP = {
    "batch_size": "examples per optimizer step",
    "micro_batch_size": "examples per forward/backward; gradients accumulate up to batch_size",
    "num_epochs": "passes over the training set",
    "learning_rate": "AdamW's peak learning rate",
    "cutoff_len": "tokens per example, the source's for seq2seq",
    "val_set_size": "held-out training examples for validation (the medium models: the first N dev examples)",
    "eval_step": "validate every N steps, 0: once per epoch",
    "save_step": "write checkpoint.pt every N steps, 0: once per epoch",
    "warmup_steps": "linear warmup steps",
    "weight_decay": "AdamW's decoupled weight decay (not on biases and norms)",
    "max_grad_norm": "gradient clipping by global norm",
    "seed": "seed of the method's initialisation, the data order and dropout",
    "max_steps": "stop after N steps, 0: num_epochs decides",
    "warmup_ratio": "warmup as a share of the steps, instead of warmup_steps (0: warmup_steps)",
    "label_smoothing": "label smoothing of the seq2seq loss",
    "max_target_len": "target tokens for seq2seq, 0: cutoff_len",
    "max_tokens": "token budget per micro-batch for MT, 0: by examples",
    "update_freq": "micro-batches per step with max_tokens",
    "adam_beta2": "AdamW's β2",
    "adam_eps": "AdamW's ε",
    "lr_schedule": "linear (decay to 0 after the warmup; transformers' default) or constant (LongLoRA)",
    "s2_ratio": "LongLoRA's shifted sparse attention in training, groups of ratio × length tokens (0: full attention)",
    "lmam_lr_scale": "LMAM's learning rate as a multiple of learning_rate (1: the paper's single rate; "
                     "not in the paper: for studies of how much the map learns)",
}
# Method flags: what each means. A hyperparameter of a new method needs no entry (method_flag_help).
METHOD_HELP = {
    "lora_r": "LoRA / DoRA rank r",
    "lora_alpha": "LoRA / DoRA α, the update is scaled by α/r",
    "lora_dropout": "dropout on the LoRA input",
    "target_modules": "comma-separated linear layers the method wraps (q_proj, o_proj, down_proj, fc2, ...)",
    "adapter_r": "adapter bottleneck width",
    "adapter_scale": "adapter output scale s",
    "adapter_dropout": "dropout inside the adapter",
    "prefix_len": "prefix length l",
    "prefix_mid_dim": "prefix reparametrisation MLP width, 0: none",
    "quanta_dims": "QuanTA's factorisation of the input width, e.g. 16-8-8-4",
    "lmam_heads": "LMAM h_s, the number of maps; head i uses map i mod h_s (Eq. 17); divides the heads",
    "lmam_rank": "LMAM rank r of Wa (h_s, n, r) and Wb (h_s, r, n)",
    "lmam_len": "LMAM n, the token positions the map covers (Eq. 14-16)",
    "lmam_scale": "LMAM s in Attn_s = s·(Wa + PE)(Wb + PE) (Eq. 10)",
    "lmam_variant": "LMAM ablation (§4.3, Table 9): default, pre_softmax (¬N), softmax_map (¬S), "
                    "full_rank (¬L, FMAM), no_pos (¬P)",
    "lmam_mode": "LMAM placement: head (the first n tokens, Eq. 14-15) or tail (the last n, Eq. 16)",
    "lmam_init": "LMAM initialisation (the paper gives none): zero (Attn_s = 0, √s absorbed into the "
                 "factors; learns at the paper's lr) or paper (N(0, 1) factors, the literal s)",
    "context_len": "LongLoRA: the training length; RoPE positions are interpolated by ceil(context_len / the "
                   "model's length) (--task lm: --cutoff_len)",
    "adalora_init_r": "AdaLoRA's initial rank of every layer",
    "adalora_target_r": "AdaLoRA's average rank after pruning",
    "adalora_tinit": "AdaLoRA: steps before the budget starts to shrink",
    "adalora_tfinal": "AdaLoRA: last steps at the final budget",
    "adalora_delta_t": "AdaLoRA: steps between two rank allocations",
    "adalora_beta1": "AdaLoRA: EMA of the sensitivity",
    "adalora_beta2": "AdaLoRA: EMA of the uncertainty",
    "adalora_orth_reg": "AdaLoRA's orthogonality regulariser weight",
    "sora_lambda": "SoRA's L1 weight on the gates in the loss",
    "sora_lambda2": "SoRA's proximal threshold after each step",
    "sora_threshold": "SoRA's proximal threshold: fixed (ξ = sora_lambda2, their code) or lr (lr·sora_lambda2)",
    "sora_schedule": "SoRA's λ2 schedule: none, linear, log_linear or exp_linear",
    "sora_max_lambda": "SoRA's largest λ of the schedule",
    "sora_lambda_num": "SoRA's number of λ steps in the schedule",
    "sora_prox": "SoRA's proximal step: released (their code's masks) or soft (the paper's soft threshold)",
}


def method_flag_help(name: str) -> str:
    """--help of a method flag: its meaning (METHOD_HELP), else what methods.py says of it: the
    methods that take it, with their defaults."""
    if name in METHOD_HELP:
        return METHOD_HELP[name]
    takes = {m: methods.hyperparameters(f)[name] for m, f in methods.METHODS.items()
             if name in methods.hyperparameters(f)}
    return "hyperparameter of " + ", ".join(f"{m} (default {v!r})" for m, v in takes.items()) + " (methods.py)"


def given(args, names) -> dict:
    """The flags among `names` that the command line (or --preset) set."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def print_settings(args, model, kind: str | None):
    """--dry_run: every hyperparameter of the method and of training (pipeline `kind`), its value
    and where it comes from: methods.py, a presets.py row, --preset or the command line
    (methods.method_hparam_sources / train_hparam_sources, which give a run its values)."""
    cli = {k: v for k, v in given(args, methods.flag_types()).items() if k not in getattr(args, "preset_flags", ())}
    rows = methods.method_hparam_sources(args.method, methods.model_keys(model.cfg), cli, args.task, args.preset)
    print(f"{args.method} on {model.cfg.name or 'a ' + type(model).__name__}, task {args.task}:")
    print("\n".join(methods.source_lines(rows)))
    if kind is None:
        print("training: the settings depend on the task; give --task")
        return
    print(f"training ({kind} pipeline):")
    print("\n".join(methods.source_lines(methods.train_hparam_sources(args.method, model.cfg.name, kind, args.task,
                                                                    given(args, TRAIN_DEFAULTS)))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-tiny",
                   help=f"a local checkpoint (directory or llama2.c .bin; always wins), a Hugging Face Hub id "
                        f"(org/name, downloaded once: pip install -r requirements-hub.txt; HF_TOKEN for gated ones) "
                        f"or a paper name, which downloads its hub id ({', '.join(f'{k}: {v}' for k, v in hub.PAPER_MODELS.items())}). "
                        f"With --dry_run a preset name ({', '.join([*M.LLAMA_PRESETS, *M.ENCDEC_PRESETS])}) "
                        f"builds the shapes only, nothing downloaded")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the one in the checkpoint directory)")
    p.add_argument("--method", default="lorada_la", help=f"one of: {', '.join(methods.METHODS)}")
    p.add_argument("--data", default="commonsense_170k",
                   help="LLaMA: a JSON file or a name (" + ", ".join(llm_adapters.TRAIN_SETS) + "; from "
                        "$LLM_ADAPTERS_DATA/ft-training_set/, else downloaded once from LLM-Adapters' repository at "
                        "a pinned commit, hash-checked, cached in $LORADA_CACHE or ~/.cache/lorada); GLUE: the "
                        "task's folder of TSVs; XSum / WMT: a folder of train/val JSON lines or .source/.target")
    p.add_argument("--task", default=None,
                   help="picks the task's presets. LLaMA: commonsense or math (default: math for math_* data), "
                        "or lm (plain text in rows of --cutoff_len tokens: LongLoRA); "
                        "RoBERTa: a GLUE task (" + ", ".join(glue.TASKS) + "); BART: xsum; mBART: wmt16-en-ro")
    p.add_argument("--out_dir", default="out", help="where the run writes its files (see above)")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="apply the method to the model's shapes (nothing loaded), print every method and training "
                        "setting with where its value comes from and the trainable-parameter line (peft's format), exit")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT_DIR/checkpoint.pt: the same base model, data and settings (checked); "
                        "--max_steps / --num_epochs may grow to extend a finished run")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out_dir that holds a run (its checkpoint, adapters, log and args are "
                        "deleted first); also takes over a lock left by a run that no longer runs (with --resume: "
                        "only that)")
    t = p.add_argument_group("training (default: presets.py's row for the method, model and task; --dry_run prints "
                             "each value and where it comes from)")
    for name, value in TRAIN_DEFAULTS.items():
        t.add_argument(f"--{name}", type=type(value), default=None, help=TRAIN_HELP[name])
    t.add_argument("--mask_prompt", action="store_true",
                   help="loss on the response only (LLM-Adapters' train_on_inputs=False; default: on everything)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--gradient_checkpointing", action="store_true", help="recompute each layer in the backward")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    t.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                   help="bf16: frozen weights in bf16, the method's tensors, the GLUE head and AdamW in fp32 "
                        "(a method that trains base weights, as full fine-tuning, BitFit, LongLoRA: fp32 weights "
                        "under bf16 autocast); the same recipe on "
                        "CPU and GPU. Default: bf16 on a GPU and on a CPU with native bf16 (AVX512-BF16, "
                        "AMX), where it is faster; fp32 elsewhere (LORADA_PRECISION sets the default)")
    t.add_argument("--s2_wrap", action="store_true",
                   help="S²-Attn as the LongLoRA paper's Algorithm 1 (a roll: the first G/2 tokens see the last) "
                        "instead of LongLoRA's current code (no wrap-around)")
    t.add_argument("--text_layout", choices=("document", "longlora"), default="document",
                   help="--task lm: how documents become the token stream (data/text.py): document (each "
                        "between BOS and EOS, the default) or longlora (LongLoRA's fine-tune.py: each batch of "
                        "1,000 documents joined by EOS after one BOS, padded with the [PAD] token that "
                        "--method longlora adds, which gets no loss)")
    t.add_argument("--fsdp", action="store_true",
                   help="shard the model, the frozen base included, over the torchrun processes (FSDP2, fsdp.py): "
                        "for models no single device holds, e.g. LLaMA2-70B (docs/performance.md, memory plan)")
    t.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms where torch has them (README: what is bit-exact on a GPU)")
    t.add_argument("--protocol", choices=("default", "quanta"), default="default",
                   help="whose pipeline trains. default: the benchmark's reference (LLaMA: LLM-Adapters' finetune.py; "
                        "RoBERTa, BART: He et al.). quanta (LLaMA): QuanTA's run.py, where Table 4's QuanTA rows and "
                        "Table 8 come from: commonsense trained as classification over the answer candidates, math "
                        "on the answer tokens of '{q}\\nAnswer: {output}', 400 dev examples drawn as its split "
                        "does, ft_com.sh's settings (5 epochs, lr 5e-5, batch 4, seed 31415); evaluate with "
                        "eval.py --protocol quanta")
    t.add_argument("--group_by_length", action="store_true",
                   help="LLaMA (LLM-Adapters' pipeline): batches of similar lengths (a seeded shuffle, then each "
                        "group of 50 batches sorted by length: less padding, faster; transformers' group_by_length, "
                        "which LLM-Adapters leaves off). Default: random batches, as LLM-Adapters trains")
    t.add_argument("--token_weighted_loss", action="store_true",
                   help="LLaMA: a step's loss is the mean over all its labelled tokens, however they fall into "
                        "micro-batches. Default: the mean of each micro-batch's mean token loss (the Hugging Face "
                        "Trainer that LLM-Adapters and QuanTA train with), where a token of a short micro-batch "
                        "weighs more")
    t.add_argument("--preset", default=None,
                   help="a named preset of presets.NAMED_PRESETS over the method's rows (the command line still "
                        "wins): " + "; ".join(f"{k}: {v['about']}" for k, v in NAMED_PRESETS.items()).replace("%", "%%"))
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    h = p.add_argument_group("method hyperparameters (default: the method's, methods.py, or its row in presets.py "
                             "for the model and task; --dry_run prints each value and where it comes from)")
    for name, typ in methods.flag_types().items():
        h.add_argument(f"--{name}", type=typ, default=None, help=method_flag_help(name).replace("%", "%%"))
    return apply_named_preset(p.parse_args(argv))


def apply_named_preset(args):
    """--preset NAME: the method's row of presets.NAMED_PRESETS[NAME] fills the method flags the
    command line left unset (so prepare() takes them as overrides, after the model's and the task's
    rows; args.preset_flags names them for --dry_run). A name without a row for the method is an
    error."""
    if args.preset is None:
        return args
    if args.preset not in NAMED_PRESETS:
        raise SystemExit(f"error: --preset {args.preset!r}: unknown; valid: {', '.join(NAMED_PRESETS)}")
    rows = NAMED_PRESETS[args.preset]["rows"]
    if args.method not in rows:
        raise SystemExit(f"error: --preset {args.preset} has settings for {', '.join(rows)}, not for {args.method}")
    args.preset_flags = [k for k in rows[args.method] if getattr(args, k) is None]
    for k in args.preset_flags:
        setattr(args, k, rows[args.method][k])
    return args


# ----------------------------------------------------------------------------- schedule, RNG, processes

def linear_schedule(warmup: int, total: int, decay: bool = True):
    """Linear warmup from 0, then linear decay to 0 at `total` (transformers' default schedule), or
    constant after the warmup (decay=False: transformers' constant_with_warmup, LongLoRA's)."""
    def f(step):
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup)) if decay else 1.0
    return f


def rng_state():
    """This process's RNG states as tensors and plain values (Python's is a tuple of ints), which
    torch.load(weights_only=True) reads back: checkpoint.pt holds nothing that could run code."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"].cpu())            # (map_location may have put it on the GPU)
    random.setstate(s["python"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


def setup_distributed(args):
    """(rank, world size): (0, 1) unless torchrun started several processes (WORLD_SIZE > 1); then
    one process per GPU over NCCL (args.device becomes cuda:LOCAL_RANK), or over gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def sum_across_processes(params, loss_sum, stopping, world, bucket=2 ** 24, reduce_gradients=True):
    """Data parallel: add up every process's gradients (its micro-batches' share of the step), the
    step's loss (a tensor) and the stop flags, so that all processes take the same step, or all
    stop. A process with no micro-batch this step contributes zeros. Gradients go in buckets of up
    to `bucket` elements, so the extra memory stays at one bucket (64 MB) even for full fine-tuning.
    Sharded (FSDP) the gradients are already summed: reduce_gradients=False."""
    if world == 1:
        return loss_sum, stopping
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    extra = torch.stack([loss_sum.float(), torch.tensor(float(stopping), device=loss_sum.device)])
    dist.all_reduce(extra)
    if not reduce_gradients:
        return extra[0], bool(extra[1] > 0)
    group, size = [], 0
    for p in [*params, None]:
        if p is None or (group and size + p.numel() > bucket):
            flat = torch.cat([g.grad.reshape(-1).float() for g in group])
            dist.all_reduce(flat)                                        # sum
            for g, part in zip(group, flat.split([g.numel() for g in group])):
                g.grad.copy_(part.view_as(g.grad))
            group, size = [], 0
        if p is not None:
            group.append(p)
            size += p.numel()
    return extra[0], bool(extra[1] > 0)


class Progress:
    """One status line on stderr: step, loss, lr, tokens/s (real tokens), ETA."""

    def __init__(self, total, start=0, quiet=False):
        self.total, self.start, self.quiet, self.t0 = total, start, quiet, time.time()
        self.tty, self.closed = sys.stderr.isatty(), False

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
        if self.tty and not self.quiet and not self.closed:
            print(file=sys.stderr)            # end the status line
        self.closed = True


# ----------------------------------------------------------------------------- setting up a run

def prepare(args, before_data=None):
    """Model (method applied), pipeline (data, batches, loss), training hyperparameters.
    before_data(model, hp, pipeline name), when given, runs before the data is read (train.py's
    checks of the settings and of a resumed run)."""
    overrides = given(args, methods.flag_types())
    methods.method_hparams(args.method, (), overrides)       # fail early on an unknown method or flag
    preset = args.model in M.LLAMA_PRESETS or args.model in M.ENCDEC_PRESETS
    if args.dry_run:                     # a preset name: its shapes on the meta device, nothing downloaded
        model = build(args.model if preset else hub.resolve_model(args.model))
        # the task as a real run infers it (LLaMA: from --data); an encoder's training rows need a --task
        kind = pipeline_name(model, args) if args.task or isinstance(model, M.Llama) else None
        methods.apply_method(model, args.method, task=args.task, **overrides)
        print_settings(args, model, kind)
        return model, None, None
    # --model: a local checkpoint, a Hub id or a paper name (hub.PAPER_MODELS: downloaded once)
    if preset and args.model not in hub.PAPER_MODELS and not os.path.exists(args.model):
        raise ValueError(f"--model {args.model} is a shape preset without weights: give a checkpoint path "
                         f"(or use --dry_run)")
    paper, args.model = hub.paper_name(args.model), hub.resolve_model(args.model)
    if args.fsdp and not os.path.exists(os.path.join(args.model, "config.json")):
        raise ValueError(f"--fsdp reads Hugging Face checkpoints (config.json + safetensors); {args.model} is not one")
    if args.task in (None, "commonsense", "math") and args.data in llm_adapters.TRAIN_SETS:
        args.data = llm_adapters.resolve(args.data, split="train")      # downloaded once if not local
    tokenizer = load_tokenizer(args.tokenizer or hub.tokenizer_source(args.model))
    # The bf16 recipe (the default on a GPU): frozen weights in bf16, the method's tensors in fp32.
    # A method that trains base weights (methods.trains_base: full fine-tuning, BitFit, LongLoRA, one
    # of yours that unfreezes a norm) keeps the model in fp32 and bf16 autocast does the bf16 work.
    precision = args.precision or default_precision(args.device)
    print(f"precision: {precision}" + ("" if args.precision else
          f" (the default on this {'GPU' if args.device.startswith('cuda') else 'CPU'}; --precision to choose)"))
    bf16 = precision == "bf16"
    dtype = torch.bfloat16 if bf16 and not methods.trains_base(args.method) else torch.float32
    num_labels = glue.num_labels(args.task) if args.task in glue.TASKS else None
    torch.manual_seed(args.seed if args.seed is not None else TRAIN_DEFAULTS["seed"])   # a fresh GLUE head
    if args.fsdp:                        # memory-mapped, nothing read yet: fsdp.shard reads each process's rows
        model = load(args.model, dtype=None, device=None, num_labels=num_labels)
    else:
        model = load(args.model, dtype=dtype, device=args.device, num_labels=num_labels)
    args.task = task_of(model, args)           # LLaMA's from --data when not given
    model.cfg.name = paper or model.cfg.name   # the paper's name when given: its rows of presets.py
    kind = pipeline_name(model, args)
    hp = methods.train_hparams(args.method, model.cfg.name, kind, args.task, given(args, TRAIN_DEFAULTS))
    if num_labels is not None and model.head is not None and model.head.dense.weight.dtype != torch.float32:
        model.head.float()                   # a fresh head trains in fp32 next to bf16 frozen weights
    takes = methods.hyperparameters(methods.METHODS[args.method])
    if "context_len" in takes and "context_len" not in overrides and kind == "lm":
        overrides["context_len"] = hp["cutoff_len"]       # LongLoRA: interpolate positions for the rows' length
    if hp["s2_ratio"]:
        if not isinstance(model, M.Llama):
            raise ValueError("--s2_ratio (LongLoRA's S²-Attn) is for LLaMA")
        model.s2_ratio, model.s2_wrap = hp["s2_ratio"], args.s2_wrap
    torch.manual_seed(hp["seed"])        # the method's initialisation, then dropout: one seeded stream
    methods.apply_method(model, args.method, task=args.task, **overrides)
    if dtype == torch.bfloat16 and methods.trained_base(model):    # trains_base probed the defaults, not these
        raise ValueError(f"--method {args.method} with these settings trains base weights, which bf16 would train "
                         f"in bf16 ({', '.join(methods.trained_base(model)[:3])}, ...); use --precision fp32")
    if args.fsdp:
        if methods.update_hooks(model):
            raise ValueError(f"--fsdp with {args.method}: its update hook needs whole tensors, not shards")
        model = fsdp.shard(model, dtype, args.device)
    print(f"presets: {args.method} on {model.cfg.name or 'a ' + type(model).__name__ + ' of no preset shape'}, "
          f"task {args.task}")
    autocast = bf16 and dtype == torch.float32                            # full / bitfit under bf16
    if args.gradient_checkpointing:
        model.gradient_checkpointing = True
    if before_data is not None:
        before_data(model, hp, kind)
    pipe = PIPELINES[kind][2](args, model, tokenizer, hp, args.device, autocast)
    check_training_data(args, pipe, hp)          # none to train on, or none with a token to learn from: refused
    return model, pipe, hp


# ----------------------------------------------------------------------------- settings, the run's folder, resume

# Flags whose value would train nothing or fail deep inside the loop: refused before any work.
POSITIVE = ("batch_size", "micro_batch_size", "cutoff_len", "update_freq")
NON_NEGATIVE = ("num_epochs", "max_steps", "val_set_size", "eval_step", "save_step", "warmup_steps", "warmup_ratio",
                "weight_decay", "max_grad_norm", "label_smoothing", "max_target_len", "max_tokens", "s2_ratio")
# What a resumed run may change: the schedule's length and how often it validates and saves.
MAY_CHANGE_ON_RESUME = ("num_epochs", "max_steps", "eval_step", "save_step")
# The files a run writes into --out_dir (a new run refuses a folder holding any of them), its lock.
RUN_FILES = ("checkpoint.pt", "best" + methods.ADAPTER_EXT, "adapter" + methods.ADAPTER_EXT, "log.jsonl", "args.json")
LOCK = "train.lock"
_held_locks = []                       # lock files this process holds; main() removes them
_made_dirs = []                        # --out_dir folders this process made; main() removes them if still empty


def check_settings(values: dict, complete: bool = False):
    """Training settings (the command line's, or complete=True: after the presets) that would train
    nothing or fail inside the loop: a ValueError naming the flag and the value."""
    for k in POSITIVE:
        v = values.get(k)
        if v is not None and not v > 0:
            raise ValueError(f"--{k} {v}: expected a positive number")
    for k in NON_NEGATIVE:
        v = values.get(k)
        if v is not None and not v >= 0:                     # (NaN too)
            raise ValueError(f"--{k} {v}: expected 0 or more")
    if complete and values["num_epochs"] == 0 and not values["max_steps"]:
        raise ValueError("--num_epochs 0 and no --max_steps: no step to train")


def read_lock(path: str) -> dict | None:
    """A lock file's {pid, host, started}, or None when it cannot be read (written half)."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def take_lock(out_dir: str, overwrite: bool):
    """OUT_DIR/train.lock (created exclusively, holding this process's pid and host) keeps two live
    runs out of one folder. A lock whose process still runs (or runs on another host, where its pid
    cannot be checked) is never taken. One left by a process that no longer runs (killed) is
    reported, and taken over only with --overwrite."""
    path = os.path.join(out_dir, LOCK)
    host = socket.gethostname()
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_lock(path)
            who = (f"pid {holder['pid']} on {holder.get('host')}, started {holder.get('started')}" if holder
                   else "unreadable: its run was killed while taking it?")
            if holder and (holder.get("host") != host or pid_alive(holder["pid"])):
                raise ValueError(f"--out_dir {out_dir} is in use by another train.py run ({who}; {path}): wait for "
                                 f"it to finish or give another --out_dir. If no run uses the folder, delete {path}")
            if not overwrite:
                raise ValueError(f"{path}: left by a train.py run that no longer runs ({who}; killed?). If no other "
                                 f"run uses {out_dir}, delete {path} and run again, or give --overwrite to take the "
                                 f"lock over (with --resume that keeps the run and continues it)")
            print(f"--overwrite: taking over {path}, left by a run that no longer runs ({who})")
            os.remove(path)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        except OSError as e:                                     # a full disk: no half-written lock left
            os.remove(path)
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
        _held_locks.append(path)
        return


def release_locks():
    """Remove the lock files this process took (only those still holding its pid), and a folder it
    made for a run that failed before writing anything."""
    while _held_locks:
        path = _held_locks.pop()
        if (read_lock(path) or {}).get("pid") == os.getpid():
            os.remove(path)
    while _made_dirs:
        d = _made_dirs.pop()
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)


def claim_out_dir(args):
    """Make --out_dir this run's (process 0, before any work): a folder, not a file; locked; and
    without another run's files unless this run continues it (--resume) or replaces it
    (--overwrite, which deletes those files first)."""
    d = args.out_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"--out_dir {d}: is a file, not a folder")
    if not os.path.isdir(d):
        os.makedirs(d)
        _made_dirs.append(d)
    take_lock(d, args.overwrite)
    present = [f for f in RUN_FILES if os.path.exists(os.path.join(d, f))]
    if args.resume:
        if not os.path.exists(os.path.join(d, "checkpoint.pt")):
            raise FileNotFoundError(f"--resume: {os.path.join(d, 'checkpoint.pt')} does not exist")
    elif present and not args.overwrite:
        raise ValueError(f"--out_dir {d} already holds a run ({', '.join(present)}): continue it with --resume, "
                         f"start over with --overwrite (which deletes those files first), or give another --out_dir")
    elif present:
        for f in present:
            os.remove(os.path.join(d, f))
        print(f"--overwrite: removed the previous run's {', '.join(present)} from {d}")


def read_checkpoint(path: str, device) -> dict:
    """checkpoint.pt, loaded as plain data only (torch.load weights_only: tensors, numbers,
    strings, lists, dicts), so that a planted file runs no code; anything else is a ValueError
    naming the file."""
    if os.path.isdir(path):
        raise ValueError(f"--resume: {path} is a folder, not a checkpoint")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)   # map_location: not onto GPU 0 for every rank
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():                           # torch refused a global: code, or a class
            raise ValueError(f"--resume: {path} holds Python objects other than tensors and plain values, which "
                             f"no train.py writes; it was not loaded (loading it could run code)") from None
        raise ValueError(f"--resume: {path} cannot be read as a checkpoint (not a file torch.save wrote)") from None
    except Exception as e:                                             # empty, truncated, not a torch file
        reason = (str(e).strip().splitlines() or ["empty or truncated"])[0]
        raise ValueError(f"--resume: {path} cannot be read as a checkpoint ({type(e).__name__}: {reason}; empty, "
                         f"truncated or not written by torch.save?)") from None
    need = ("tensors", "optimizer", "scheduler", "state", "rng", "method")
    if not isinstance(ck, dict) or not all(k in ck for k in need):
        raise ValueError(f"--resume: {path} is not a train.py checkpoint (expected the entries {', '.join(need)})")
    if "run" not in ck:
        raise ValueError(f"--resume: {path} was written by an older train.py, which did not record the run's base "
                         f"model, data and settings, so this run cannot be checked against it: finish it with that "
                         f"version, or start over with --overwrite")
    return ck


def data_file(args) -> str:
    """The file or folder --data names (a sample or training set name resolved as the pipelines do)."""
    if os.path.exists(args.data):
        return args.data
    return llm_adapters.resolve(args.data, split="train")


def run_record(args, model, hp: dict, kind: str, world: int) -> dict:
    """What a resumed run must share with its checkpoint's (check_resume): the base model's
    fingerprint, the data's content hash, the tokenizer and every setting but MAY_CHANGE_ON_RESUME."""
    settings = {k: v for k, v in hp.items() if k not in MAY_CHANGE_ON_RESUME}
    settings.update(pipeline=kind, task=args.task, protocol=args.protocol, mask_prompt=args.mask_prompt,
                    group_by_length=args.group_by_length, token_weighted_loss=args.token_weighted_loss,
                    s2_wrap=args.s2_wrap, text_layout=args.text_layout,
                    precision=args.precision or default_precision(args.device),
                    tokenizer=content_hash(args.tokenizer) if args.tokenizer else None)
    return {"model": args.model, "base": methods.base_fingerprint(model), "data": args.data,
            "data_sha256": content_hash(data_file(args)), "settings": settings, "processes": world}


def check_resume(ck: dict, record: dict, path: str):
    """--resume continues the checkpoint's run, nothing else: another base model (by fingerprint),
    other data (by content), another tokenizer or batch, schedule or data setting is refused,
    naming the difference."""
    old = ck["run"]
    differs = methods.fingerprint_difference(old["base"], record["base"])
    if differs:
        raise ValueError(f"--resume: {path} was trained on another base model ({old['model']}) than this run's "
                         f"--model {record['model']}: {differs}")
    if old["data_sha256"] != record["data_sha256"]:
        raise ValueError(f"--resume: {path} was trained on --data {old['data']} (sha256 {old['data_sha256'][:12]}), "
                         f"this run's --data {record['data']} holds other data (sha256 {record['data_sha256'][:12]})")
    for k in sorted(set(old["settings"]) | set(record["settings"])):
        a, b = old["settings"].get(k), record["settings"].get(k)
        if a != b:
            raise ValueError(f"--resume: {path} was written with {k}={a!r}, this run has {k}={b!r}: a resumed run "
                             f"keeps its settings (only {', '.join('--' + x for x in MAY_CHANGE_ON_RESUME)} may "
                             f"change); start a new run in another --out_dir for other settings")


def trim_log(path: str, step: int):
    """Before a resumed run appends to log.jsonl: keep the records up to the checkpoint's step (the
    later ones are of steps the run redoes) and drop a last line a kill cut short. A corrupt line
    elsewhere is an error naming the file and the line."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    keep = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            s = record["step"]
        except (ValueError, TypeError, KeyError):
            if n >= len(lines) - 1:                                   # the last line: a write a kill cut short
                print(f"{path}: dropped its last line, cut short ({len(line)} bytes)")
                continue
            raise ValueError(f"{path}: line {n} is not a train.py log record (corrupt?); fix or delete that "
                             f"line to resume") from None
        if s <= step:
            keep.append(line + b"\n")
    if sum(map(len, keep)) != os.path.getsize(path):
        atomic_write(path, lambda f: f.write(b"".join(keep)))


def check_training_data(args, pipe, hp: dict):
    """The data a run would train on: none (an empty list, or all held out) is an error naming
    --data; examples with no labelled token left after --cutoff_len (the prompt fills it, and
    --mask_prompt masks the prompt) are refused when they are all, reported when they are some."""
    if len(pipe.train_set) == 0:
        raise ValueError(f"--data {args.data}: no training example ({len(pipe.val_set)} held out for validation, "
                         f"--val_set_size {hp['val_set_size']})")
    examples = pipe.train_set if isinstance(pipe.train_set, list) else []
    labelled = [e for e in examples if isinstance(e, dict) and isinstance(e.get("labels"), list)]
    empty = sum(1 for e in labelled if all(x == -100 for x in e["labels"][1:]))
    why = "the prompt fills it and --mask_prompt masks the prompt" if args.mask_prompt else "nothing follows BOS"
    if labelled and empty == len(labelled):
        raise ValueError(f"--cutoff_len {hp['cutoff_len']}: no training example keeps a token to learn from ({why}); "
                         f"raise --cutoff_len")
    if empty:
        print(f"warning: --cutoff_len {hp['cutoff_len']}: {empty} of {len(labelled)} training examples keep no token "
              f"to learn from ({why}); they add nothing to the loss", file=sys.stderr)


def check_schedule(args, state: dict, total: int, pipe, rank: int = 0):
    """A resumed run's schedule against its checkpoint's. A finished run (at its last step) is not
    run again and its adapter stays as it is, unless a larger --max_steps / --num_epochs extends
    it; then the best adapter so far is kept unless a later validation beats it. A schedule that
    ends before the checkpoint's step is refused."""
    d, step, before = args.out_dir, state["step"], state.get("total")
    ckpt, final = os.path.join(d, "checkpoint.pt"), os.path.join(d, "adapter" + methods.ADAPTER_EXT)
    if step > total:
        raise ValueError(f"--resume: {ckpt} is at step {step}, past this schedule's last step {total} "
                         f"(--max_steps / --num_epochs): give a schedule of at least {step} steps")
    if step == total:
        if os.path.exists(final):
            raise ValueError(f"--resume: the run in {d} finished at step {step} (its adapter: {final}); nothing to "
                             f"resume. To train longer, resume with a larger --max_steps or --num_epochs; to start "
                             f"over, --overwrite")
        if pipe.val_set and not os.path.exists(os.path.join(d, "best" + methods.ADAPTER_EXT)):
            raise ValueError(f"--resume: the run in {d} finished at step {step} but its adapter {final} is missing, "
                             f"and {ckpt} holds the last step's tensors, not the best by validation (step "
                             f"{state.get('best_step', '?')}); nothing was written. To train again, --overwrite")
        return                     # the adapter is written from the checkpoint (no validation) or best.safetensors
    if before is not None and before != total and rank == 0:
        kept = (f"; the run's best adapter so far ({final}, step {state.get('best_step', '?')}) is kept unless a "
                f"later validation beats it" if before == step and pipe.val_set and os.path.exists(final) else "")
        print(f"resume: the schedule changes from {before} to {total} steps (--max_steps / --num_epochs); the learning "
              f"rate follows the {total}-step schedule from step {step} on{kept}")


def write_args(path: str, run_info: dict, resumed_at: int | None):
    """args.json: the run's arguments and settings. A resumed run keeps the first run's and adds its
    own to "resumes" (the step it resumed at, its arguments)."""
    if resumed_at is not None and os.path.exists(path):
        try:
            with open(path) as f:
                first = json.load(f)
        except (OSError, ValueError):
            first = None
        if isinstance(first, dict):
            first.setdefault("resumes", []).append({"at_step": resumed_at, "args": run_info["args"],
                                                    "train": run_info["train"]})
            run_info = first
    atomic_write(path, lambda f: f.write(json.dumps(run_info, indent=2).encode()))


# ----------------------------------------------------------------------------- the run's folder while it trains

class Run:
    """The run's folder (--out_dir) and what training keeps there, so that train() reads as
    training: the claim (train.lock, and no other run's files), checkpoint.pt (read as plain data
    and checked on --resume, then loaded; written atomically), log.jsonl (on --resume trimmed to
    the checkpoint's step), args.json, the adapters, and Ctrl-C / SIGTERM, which only set a flag:
    the loop finishes its step, saves a checkpoint and exits, so nothing is lost.
    Process 0 writes every file; the methods that say "every process" gather from all of them."""

    def __init__(self, args, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        self.checkpoint = self.path("checkpoint.pt")
        if rank == 0:
            claim_out_dir(args)                     # locked, and no other run's files in it
        self.ck = read_checkpoint(self.checkpoint, args.device) if args.resume else None
        self.record = {}                            # run_record: what a checkpoint records of the run
        self.signal = None                          # the stop signal this process got, if any

    def path(self, name: str) -> str:
        return os.path.join(self.args.out_dir, name)

    def check(self, model, hp: dict, kind: str):
        """prepare()'s before_data: the settings after the presets; a resumed run's against its
        checkpoint's (base model, data, settings)."""
        check_settings(hp, complete=True)
        self.record = run_record(self.args, model, hp, kind, self.world)
        if self.ck is not None:
            check_resume(self.ck, self.record, self.checkpoint)

    def start(self, model, optimizer, scheduler, hp: dict, total: int, pipe) -> dict:
        """The loop's state: step 0, or the checkpoint's on --resume (every process calls it);
        args.json written."""
        if self.ck is None:
            state = {"step": 0, "best_score": None}                  # no validation score yet
        else:
            state = self.resume(model, optimizer, scheduler, total, pipe)
        state["total"] = total
        info = {"args": vars(self.args), "train": hp, "method": model.peft_method, "processes": self.world,
                "run": {k: self.record[k] for k in ("model", "data", "data_sha256")}}
        if self.args.fsdp:                          # what each process holds of the frozen weights
            info["fsdp_frozen_bytes"] = fsdp.frozen_bytes_per_process(model)
        if self.rank == 0:
            write_args(self.path("args.json"), info, state["step"] if self.ck is not None else None)
        return state

    def resume(self, model, optimizer, scheduler, total: int, pipe) -> dict:
        """The trainable tensors, AdamW's moments, the schedule's position, the step (which also
        says where in which epoch's shuffled order we are) and the RNG states, so that the resumed
        run continues bit for bit as if it had never stopped. Returns the loop's state."""
        ck, path = self.ck, self.checkpoint
        if ck["method"] != model.peft_method:
            raise ValueError(f"--resume: {path} was written for {ck['method']}, not {model.peft_method}")
        if len(ck["rng"]) != self.world:                         # one RNG state per process
            raise ValueError(f"--resume: {path} was written by {len(ck['rng'])} process(es) and this run has "
                             f"{self.world}: resume with the same number (torchrun --nproc_per_node {len(ck['rng'])})")
        current = methods.adapter_state(model)
        for k, t in ck["tensors"].items():
            if k not in current or current[k].shape != t.shape:
                raise ValueError(f"--resume: {path} holds {k} of shape {tuple(t.shape)}, this run's model has "
                                 f"{tuple(current[k].shape) if k in current else 'no such tensor'}")
        fsdp.load_full_tensors(model, ck["tensors"])             # (sharded: each process takes its chunks)
        fsdp.load_optimizer_state(model, optimizer, ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"][self.rank])
        state = ck["state"]
        if "best_val" in state:          # an older train.py's checkpoint: its best score negated unless a loss
            v = state.pop("best_val")
            state["best_score"] = None if math.isinf(v) else v if state.get("val_what", "loss") == "loss" else -v
        check_schedule(self.args, state, total, pipe, self.rank)
        if self.rank == 0:
            trim_log(self.path("log.jsonl"), state["step"])
            print(f"resumed from {path} at step {state['step']}")
        return state

    def save_adapter(self, model, name: str):
        """best.safetensors or adapter.safetensors: the method's tensors (every process calls it:
        a sharded model's are gathered), written by process 0."""
        tensors = fsdp.full_tensors(model, methods.adapter_state(model).keys())
        if self.rank == 0:
            methods.save_adapter(model, self.path(name + methods.ADAPTER_EXT), tensors)

    def save_checkpoint(self, model, optimizer, scheduler, state: dict):
        """checkpoint.pt: everything resume() loads (every process calls it: it gathers their RNG
        states, and a sharded model's tensors), written atomically: never a half-written file."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        tensors = fsdp.full_tensors(model, methods.adapter_state(model).keys())
        opt_state = fsdp.optimizer_state(model, optimizer)
        if self.rank == 0:
            snapshot = {"tensors": tensors, "optimizer": opt_state, "scheduler": scheduler.state_dict(),
                        "state": dict(state), "rng": rngs, "method": model.peft_method, "run": self.record}
            atomic_write(self.checkpoint, lambda f: torch.save(snapshot, f))

    @contextlib.contextmanager
    def open(self, state: dict):
        """While the loop runs: Ctrl-C and SIGTERM (a cluster's preemption) only set self.signal,
        log.jsonl is open for appending (process 0) and the progress line shows."""
        def on_signal(signum, frame):
            self.signal = signum
        old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.progress, self.log_file = Progress(state["total"], state["step"], self.args.quiet or self.rank > 0), None
        try:
            if self.rank == 0:
                self.log_file = open(self.path("log.jsonl"), "a")
            yield self
        finally:
            self.progress.close()
            if self.log_file is not None:
                self.log_file.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)

    @property
    def stop_requested(self) -> bool:
        return self.signal is not None

    def log(self, record: dict):
        """One step's record: a line of log.jsonl (process 0), and the progress line."""
        if self.log_file is not None:
            try:
                self.log_file.write(json.dumps(record) + "\n")
                self.log_file.flush()
            except OSError as e:                                   # a full disk: name the file
                raise OSError(e.errno, f"cannot write {self.log_file.name}: {e.strerror or e}") from None
        self.progress.update(record["step"], record["loss"], record["lr"], record["tokens_per_s"])

    def stop(self, step: int):
        """Exit after a stop signal, the checkpoint saved: status 128 + the signal's number, as a
        shell reports a process a signal ended."""
        self.progress.close()
        signum = int(self.signal or signal.SIGTERM)                # (or another process got it)
        if self.rank == 0:
            print(f"stopped by signal {signum} at step {step}; checkpoint saved to {self.checkpoint}; "
                  f"continue with --resume", file=sys.stderr)
        sys.exit(128 + signum)

    def finish(self, model, pipe, state: dict, hooks):
        """adapter.safetensors, the run's result: with a validation split, the best adapter by
        validation (an extended run that never beat its best keeps that one), else the last
        step's (every process calls it)."""
        final, best = self.path("adapter" + methods.ADAPTER_EXT), self.path("best" + methods.ADAPTER_EXT)
        last = not pipe.val_set or not (os.path.exists(best) or os.path.exists(final))
        if last:
            self.save_adapter(model, "adapter")
        if self.rank > 0:
            return
        what, score = state.get("val_what", "loss"), state.get("best_score")
        shown = "(none)" if score is None else f"{score:.4f}"
        if last:
            print(f"adapter written to {final}")
        elif os.path.exists(best):
            os.replace(best, final)                                # the best validation score's
            print(f"best validation {what} {shown}; adapter written to {final}")
        else:
            print(f"best validation {what} {shown} is still step {state.get('best_step', '?')}'s; its adapter "
                  f"{final} is kept")
        for h in hooks:                                            # the ranks AdaLoRA / SoRA kept, per layer
            print(h.summary(model))


# ----------------------------------------------------------------------------- the training loop

def check_command_line(args):
    """The command line's settings, before any work (no folder made, no process group)."""
    fsdp.check_flags(args)
    if args.dry_run:
        return
    check_device(args.device)
    check_settings({k: getattr(args, k) for k in TRAIN_DEFAULTS})
    if args.resume and args.overwrite and not os.path.exists(os.path.join(args.out_dir, LOCK)):
        raise ValueError("--resume continues the run in --out_dir and --overwrite starts it over: give one "
                         "(with --resume, --overwrite only takes over a lock left by a killed run)")


def configure_torch(args):
    """Numerics of the run: TF32 for the fp32 matrix products on a GPU (adapters, heads, QuanTA);
    --deterministic: deterministic algorithms where torch has one (a warning names the ops without)."""
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")     # cuBLAS's deterministic workspace
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def report_parameters(model, method: str):
    """The trainable-parameter line (peft's format); for a GLUE model also the method's share
    without the head, which is the share the paper's tables count."""
    print(methods.parameter_report(model))
    head = getattr(model, "head", None)
    if head is not None:
        t, a = methods.count_parameters(model)
        h = sum(p.numel() for p in head.parameters() if p.requires_grad)
        print(f"  of which {method}: {t - h:,d} ({100 * (t - h) / a:.4f}%, the share the paper's tables "
              f"count) + the GLUE head, which trains whole: {h:,d} ({100 * h / a:.4f}%)")


def build_optimizer(model, hp: dict, method: str):
    """(the trainable parameters, the method's update hooks, AdamW). AdamW sees only what the
    method attached (apply_method froze the rest): for LoRaDA-LA on LLaMA-7B that is 6.1M of 6.7B
    parameters, so its two moments are tiny too. One learning rate for everything, as the paper
    (--lmam_lr_scale gives LMAM's factors their own); weight decay spares biases and norms, as the
    references' Hugging Face Trainer (methods.param_groups). The update hooks (adaptive.py: AdaLoRA,
    SoRA) work around each update (the loop's step 3); the parameters a hook steps itself (SoRA's
    gates) are not AdamW's."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {method!r} trains no parameter of this model")
    hooks = methods.update_hooks(model)
    own = [p for h in hooks for p in h.own_parameters(model)]
    groups = methods.param_groups(model, hp["learning_rate"], hp["weight_decay"], hp["lmam_lr_scale"], exclude=own)
    optimizer = torch.optim.AdamW(groups, lr=hp["learning_rate"], weight_decay=hp["weight_decay"],
                                  betas=(0.9, hp["adam_beta2"]), eps=hp["adam_eps"])
    return params, hooks, optimizer


def make_schedule(optimizer, hp: dict, per_epoch: int):
    """(the run's number of steps, its learning-rate schedule): num_epochs passes over the data, or
    max_steps; warmup_steps (or warmup_ratio of the steps) of linear warmup from 0, then a linear
    decay to 0 at the last step (or constant: --lr_schedule constant)."""
    total = per_epoch * hp["num_epochs"]
    if hp["max_steps"]:
        total = min(total, hp["max_steps"]) if hp["num_epochs"] else hp["max_steps"]
    warmup = math.ceil(hp["warmup_ratio"] * total) if hp["warmup_ratio"] else hp["warmup_steps"]
    if hp["lr_schedule"] not in ("linear", "constant"):
        raise ValueError(f"--lr_schedule {hp['lr_schedule']!r}: expected linear or constant")
    return total, torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(warmup, total,
                                                                               hp["lr_schedule"] == "linear"))


def train(args):
    """Fine-tune --model with --method on --data: build the model and attach the method, read the
    data, train, save the adapter. Returns the model (None for --dry_run)."""
    check_command_line(args)
    configure_torch(args)
    rank, world = (0, 1) if args.dry_run else setup_distributed(args)
    run = None if args.dry_run else Run(args, rank, world)   # claims --out_dir; reads checkpoint.pt to resume
    model, pipe, hp = prepare(args, run.check if run else None)      # the model with the method, the data
    if rank == 0:
        report_parameters(model, args.method)
    if args.dry_run:
        return None
    if world > 1:
        torch.manual_seed(hp["seed"] + rank)       # the same initialisation everywhere, then own dropout masks
    # Compile with automatic dynamic shapes: the first micro-batch compiles for its shapes, the next
    # one of another length recompiles once with the lengths symbolic. (dynamic=True from the start
    # broke gradient checkpointing's graph in dynamo.)
    forward_model = torch.compile(model) if args.compile else model
    params, hooks, optimizer = build_optimizer(model, hp, args.method)    # AdamW over what the method attached
    epoch_batches = functools.lru_cache(maxsize=1)(pipe.epoch_batches)        # one epoch's order at a time
    per_epoch = len(epoch_batches(0))
    total, scheduler = make_schedule(optimizer, hp, per_epoch)
    state = run.start(model, optimizer, scheduler, hp, total, pipe)      # step 0, or the checkpoint's
    share = fsdp.micro_batch_share(rank, world, args.fsdp)     # this process's micro-batches of a step
    validates = rank == 0 or args.fsdp        # process 0 validates (sharded, all: each forward needs all)
    has_lmam = bool(map_sizes(model))
    model.train()                             # dropout on (load() returns eval mode)
    with run.open(state):
        while state["step"] < total:
            # 1. This step's examples. An epoch's order is a function of (seed, epoch) alone, so a
            #    resumed run finds the same batches from the step counter.
            epoch, index = divmod(state["step"], per_epoch)
            micro = [[pipe.train_set[i] for i in b] for b in epoch_batches(epoch)[index]]
            examples = [e for b in micro for e in b]
            n_units = pipe.units(examples)
            t0 = time.time()

            # 2. Forward and backward, one micro-batch at a time (gradient accumulation): backward()
            #    adds each micro-batch's gradient into .grad, and the update waits for the whole
            #    step, so a step of batch_size examples needs the memory of micro_batch_size. Each
            #    micro-batch's summed loss is divided by the step's number of units (tokens, or
            #    examples for GLUE), not by its own: the accumulated gradient is that of the step's
            #    mean loss however the step is split (the Trainer's mean of micro-batch means is a
            #    pipeline's own loss: pipelines.micro_batch_mean). With several processes, each runs
            #    its share, then the gradients (sharded: FSDP's backward summed them), losses and
            #    stop flags are summed once, so that all take the single-process step, or all stop.
            loss_sum = torch.zeros((), device=args.device)      # summed on the device: no sync per micro-batch
            for part, weight in share(micro):
                loss = pipe.loss_sum(forward_model, pipe.collate(part)) * (weight / max(n_units, 1))
                loss.backward()
                loss_sum += loss.detach().float()
            loss_sum, stopping = sum_across_processes(params, loss_sum, run.stop_requested, world,
                                                      reduce_gradients=not args.fsdp)
            loss_sum = float(loss_sum)                          # the step's one sync: for the log
            if not math.isfinite(loss_sum):
                last = run.checkpoint if os.path.exists(run.checkpoint) else "none"
                raise FloatingPointError(f"loss is {loss_sum} at step {state['step'] + 1}; stopping. The last good "
                                         f"checkpoint is {last}")

            # 3. The update. Clipping scales the gradient down when its global norm (all trainable
            #    tensors as one vector) exceeds max_grad_norm: a rare huge gradient cannot throw the
            #    weights far, and its direction is kept. Then one AdamW step, and the schedule's
            #    learning rate for the next: a linear warmup from 0 (AdamW's moment estimates are
            #    noisy for the first steps), then a linear decay to 0 at the last step (or constant).
            #    A method's update hooks (adaptive.py) add their regulariser's gradient before the
            #    clipping and do their own work after AdamW's step (AdaLoRA's rank allocation, SoRA's
            #    proximal gate step), while the gradients are still there.
            for h in hooks:
                h.before_update(model, state["step"] + 1, total)
            torch.nn.utils.clip_grad_norm_(params, hp["max_grad_norm"])
            optimizer.step()
            for h in hooks:
                h.after_update(model, state["step"] + 1, total, scheduler.get_last_lr()[0])
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)               # the next step accumulates from zero
            state["step"] += 1

            # 4. Log the step. For LMAM, also max |Attn_s| per layer: it starts at 0 (the base
            #    model) and should grow to the size of attention probabilities (README, "Why LMAM
            #    absorbs s"); a map stuck near 0 means it is not learning.
            real = pipe.tokens(examples)
            record = {"step": state["step"], "loss": loss_sum, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": real / max(time.time() - t0, 1e-9), "tokens": real}
            if has_lmam:
                record["lmam_max_abs"] = map_sizes(model)

            # 5. Validate now and then, keeping the best adapter so far: a loss is better lower,
            #    an accuracy (or GLUE's other metrics) higher (pipelines.improves).
            at_eval = state["step"] % (hp["eval_step"] or per_epoch) == 0 or state["step"] == total
            if pipe.val_set and at_eval and validates:
                model.eval()                                    # dropout off
                with torch.no_grad():
                    what, score = pipe.validate(model)
                model.train()
                record["val_" + what], state["val_what"] = score, what
                if improves(what, score, state["best_score"]):
                    state["best_score"], state["best_step"] = score, state["step"]
                    run.save_adapter(model, "best")
            run.log(record)                                     # log.jsonl and the progress line

            # 6. Checkpoint now and then, and on a stop signal (all processes stop after the same step).
            if state["step"] % (hp["save_step"] or per_epoch) == 0 or stopping:
                run.save_checkpoint(model, optimizer, scheduler, state)
            if stopping:
                run.stop(state["step"])                         # exits
        run.save_checkpoint(model, optimizer, scheduler, state)
    run.finish(model, pipe, state, hooks)                       # adapter.safetensors: the best, or the last
    return model


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except (ValueError, OSError, FloatingPointError, CheckpointError) as e:    # OSError: a full or read-only disk
        sys.exit(f"error: {e}")
    finally:
        release_locks()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) == 1:                # a bare `python train.py`: the CPU demo
        import demo
        demo.main()
    else:
        main()
