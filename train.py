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

A run owns its folder (run_folder.py): train.lock (its pid) keeps a second run out while it runs; a new run into a
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
import functools
import math
import os
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
from run_folder import LOCK, Run, check_settings, release_locks
from runs import check_device, default_precision
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
        args.task = task_of(model, args)   # as a real run infers it (LLaMA: from --data)
        kind = pipeline_name(model, args) if args.task else None     # an encoder's training rows need a --task
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
