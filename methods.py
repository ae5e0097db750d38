"""The method registry: every PEFT method of this project is one function, and METHODS names them.

A method is `method(model, **hyperparameters)`: it attaches modules to a model, in place. Its
keyword defaults are its hyperparameters, with the settings of its reference on LLaMA (LLM-Adapters,
the DoRA and QuanTA scripts, the paper's Table 19 for LMAM). The paper's settings for other models
and tasks are literal rows in presets.py. What trains is what the method attached: apply_method
freezes the model first, so only the new modules' parameters (and what a method unfreezes itself,
as BitFit does) train, and RoBERTa's classification head.

    apply_method(model, "lora", lora_r=4, target_modules="q_proj,v_proj")   # in place; returns model
    save_adapter(model, "out/adapter.safetensors"); load_adapter(base_model, "out/adapter.safetensors")

Add your own: write a function below and one line in METHODS (README, "Add your own method").
Every hyperparameter is also a command-line flag of train.py with the same name. Nothing else is
declared: which modules a method attaches and whether it trains the base model's own weights are
found by applying it to weightless twins of the models (anatomy), and train.py's precision and
export.py's formats follow from that.
"""
import dataclasses
import inspect
import json
import math
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F  # noqa: F401  (for methods pasted in here: README, "Add your own method")

import model as M
from adapters import AdapterFFN, BottleneckLinear, HoulsbyAdapter, PrefixEncoder, PrefixSlice
from adaptive import AdaLoRAAllocator, AdaLoRALinear, SoRAGates, SoRALinear
from checkpoint import read_safetensors, read_safetensors_header, read_safetensors_metadata, write_safetensors
from lmam import LMAM
from lora import DoRALinear, LoRALinear
from presets import METHOD_PRESETS, NAMED_PRESETS, TRAIN_DEFAULTS, TRAIN_DEFAULTS_SOURCE, TRAIN_PRESETS
from quanta import QuanTALinear


# ----------------------------------------------------------------------------- where methods attach

def linear_targets(model, target_modules: str):
    """(parent module, attribute name) of every nn.Linear whose name is one of `target_modules`
    (comma-separated), outside RoBERTa's classification head (which trains whole)."""
    names = [t.strip() for t in target_modules.split(",") if t.strip()]
    found = {n: [] for n in names}
    linear_names = set()
    for qualified, parent in model.named_modules():
        if qualified == "head" or qualified.startswith("head."):
            continue
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                linear_names.add(attr)
                if attr in found:
                    found[attr].append((parent, attr))
    for n, hits in found.items():
        if not hits:
            raise ValueError(f"target module {n!r} does not exist in this model; its linear layers are: "
                             f"{', '.join(sorted(linear_names))}")
    return [hit for n in names for hit in found[n]]


def attention_sites(model) -> dict:
    """Where prefix tuning attaches, one prefix encoder per site: {attribute: attention modules}.
    LLaMA, RoBERTa: self-attention. BART/mBART: encoder self-attention, decoder self-attention and
    cross-attention, each with its own encoder (He et al.'s three-way prefix)."""
    if isinstance(model, M.Bart):
        return {"prefix_encoder": [l.self_attn for l in model.encoder.layers],
                "prefix_decoder": [l.self_attn for l in model.decoder.layers],
                "prefix_cross": [l.encoder_attn for l in model.decoder.layers]}
    return {"prefix_encoder": [l.self_attn for l in model.layers]}


def device_of(model):
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- the methods

def full(model):
    """Full fine-tuning: every parameter trains."""
    model.requires_grad_(True)


def bitfit(model):
    """BitFit (Ben Zaken et al. 2022): every bias trains (LLaMA has none)."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(True)


LLAMA_TARGETS = "q_proj,k_proj,v_proj,up_proj,down_proj"      # LLM-Adapters' and DoRA's LoRA targets


def lora(model, lora_r=32, lora_alpha=64.0, lora_dropout=0.05, target_modules=LLAMA_TARGETS):
    """LoRA (lora.py) on the named linear layers; LLM-Adapters' / DoRA's LLaMA settings."""
    for parent, name in linear_targets(model, target_modules):
        setattr(parent, name, LoRALinear(getattr(parent, name), lora_r, lora_alpha, lora_dropout))


def dora(model, lora_r=32, lora_alpha=64.0, lora_dropout=0.05, target_modules=LLAMA_TARGETS):
    """DoRA (lora.py) on the named linear layers; the DoRA scripts' LLaMA settings."""
    for parent, name in linear_targets(model, target_modules):
        setattr(parent, name, DoRALinear(getattr(parent, name), lora_r, lora_alpha, lora_dropout))


def quanta(model, quanta_dims="16-8-8-4", target_modules="q_proj,v_proj"):
    """QuanTA (quanta.py); its commonsense scripts: q_proj, v_proj, 16-8-8-4 for d = 4096."""
    dims = [int(d) for d in str(quanta_dims).replace(",", "-").split("-")]
    for parent, name in linear_targets(model, target_modules):
        setattr(parent, name, QuanTALinear(getattr(parent, name), dims))


def series(model, adapter_r=256, adapter_scale=1.0, adapter_dropout=0.0, target_modules="down_proj"):
    """Series adapter. LLaMA: LLM-Adapters' bottleneck (256, tanh) before gate_proj/up_proj and
    after any other target (after down_proj: 0.99% of LLaMA-7B). RoBERTa/BART: He et al.'s Houlsby
    adapter after the sub-block that `out_proj` (every attention, with a LayerNorm on its input)
    or `fc2` (the FFN) ends: the attention's before the block's dropout, the FFN's after it, as in
    He et al.'s code (model.EncoderLayer.residual)."""
    if not isinstance(model, M.Llama):
        targets = {t.strip() for t in target_modules.split(",")}
        if not targets <= {"out_proj", "fc2"}:
            raise ValueError(f"series adapters on RoBERTa/BART follow out_proj (attention) and fc2 (FFN); "
                             f"got target_modules={target_modules!r}")
        for block in list(model.modules()):
            attention = isinstance(block, M.MultiHeadAttention)
            if attention and "out_proj" in targets or isinstance(block, M.FFN) and "fc2" in targets:
                block.adapter = HoulsbyAdapter(model.cfg.dim, adapter_r, adapter_dropout, layer_norm=attention,
                                               device=device_of(model))
        return
    for parent, name in linear_targets(model, target_modules):
        kind = "series_in" if name in ("gate_proj", "up_proj") else "series_out"
        setattr(parent, name, BottleneckLinear(getattr(parent, name), adapter_r, kind, adapter_scale, adapter_dropout))


def parallel(model, adapter_r=256, adapter_scale=1.0, adapter_dropout=0.0, target_modules="up_proj,down_proj"):
    """LLM-Adapters' parallel bottleneck adapter on up_proj and down_proj (3.54% of LLaMA-7B)."""
    for parent, name in linear_targets(model, target_modules):
        setattr(parent, name, BottleneckLinear(getattr(parent, name), adapter_r, "parallel", adapter_scale,
                                               adapter_dropout))


def adapter_ffn(model, adapter_r=16, adapter_scale=2.0, adapter_dropout=0.0):
    """He et al.'s FFN scaled parallel adapter (Adapter-FFN) on every FFN: LLaMA's MLP, every
    encoder and decoder layer of RoBERTa/BART. r=16, s=2: their GLUE script."""
    for ffn in [m for m in model.modules() if isinstance(m, (M.MLP, M.FFN))]:
        ffn.adapter = AdapterFFN(model.cfg.dim, adapter_r, adapter_scale, adapter_dropout, device_of(model))


def prefix(model, prefix_len=10, prefix_mid_dim=0):
    """Prefix tuning (adapters.py). LLaMA: peft's PrefixTuningConfig(num_virtual_tokens=10) without
    projection, as LLM-Adapters ran it; BART: a prefix for each of the three attention sites."""
    c = model.cfg
    for site, attns in attention_sites(model).items():
        enc = PrefixEncoder(len(attns), getattr(c, "n_kv_heads", c.n_heads), c.head_dim, c.dim, prefix_len,
                            prefix_mid_dim, device=device_of(model))
        setattr(model, site, enc)
        for i, attn in enumerate(attns):
            attn.prefix = PrefixSlice(enc, i)


def mam(model, prefix_len=30, prefix_mid_dim=800, adapter_r=512, adapter_scale=4.0, adapter_dropout=0.0):
    """He et al.'s MAM adapter: prefix tuning (l=30, mid_dim 800) + the FFN scaled PA (r=512, s=4)."""
    prefix(model, prefix_len, prefix_mid_dim)
    adapter_ffn(model, adapter_r, adapter_scale, adapter_dropout)


def lmam(model, lmam_heads=32, lmam_rank=2, lmam_len=128, lmam_scale=1 / (4096 * 600), lmam_variant="default",
         lmam_mode="head", lmam_init="zero"):
    """LMAM (lmam.py) in self-attention: every layer of LLaMA (causal) and RoBERTa, BART/mBART's
    encoder (Table 15, "Where/LMAM: Encoder"). Defaults: Table 19, LLaMA-7B."""
    if lmam_mode not in ("head", "tail"):
        raise ValueError(f"lmam_mode must be 'head' (Eq. 14-15) or 'tail' (Eq. 16), got {lmam_mode!r}")
    layers = model.encoder.layers if isinstance(model, M.Bart) else model.layers
    for layer in layers:
        layer.self_attn.attn_map = LMAM(model.cfg.n_heads, lmam_heads, lmam_rank, lmam_len, lmam_scale,
                                        causal=isinstance(model, M.Llama), variant=lmam_variant,
                                        tail=lmam_mode == "tail", init=lmam_init, device=device_of(model))


# The LoRaDA variants and the plug-in pairs: LMAM plus a method for the rest of the layer. Each
# takes LMAM's hyperparameters as **lmam_hp, with lmam()'s defaults unless it names one.

def lorada_la(model, lora_r=1, lora_alpha=2.0, lora_dropout=0.05, target_modules="o_proj,down_proj",
              adapter_r=18, adapter_scale=4.0, adapter_dropout=0.0, **lmam_hp):
    """LoRaDA-LA (Table 19, LLaMA-7B): LMAM + LoRA on o_proj, down_proj + Adapter-FFN."""
    lmam(model, **lmam_hp)
    lora(model, lora_r, lora_alpha, lora_dropout, target_modules)
    adapter_ffn(model, adapter_r, adapter_scale, adapter_dropout)


def lorada_q(model, quanta_dims="16-8-8-4", target_modules="q_proj,v_proj", lmam_rank=1, **lmam_hp):
    """LoRaDA-Q (Table 17): LMAM with rank 1 + QuanTA 16-8-8-4 on q_proj, v_proj."""
    lmam(model, lmam_rank=lmam_rank, **lmam_hp)
    quanta(model, quanta_dims, target_modules)


def lorada_a(model, adapter_r=16, adapter_scale=2.0, adapter_dropout=0.1, **lmam_hp):
    """LoRaDA-A (§4.2, Tables 15 and 16): LMAM + Adapter-FFN."""
    lmam(model, **lmam_hp)
    adapter_ffn(model, adapter_r, adapter_scale, adapter_dropout)


def lora_lmam(model, lora_r=4, lora_alpha=8.0, lora_dropout=0.05, target_modules=LLAMA_TARGETS, **lmam_hp):
    """LoRA + LMAM, the plug-in of Tables 6 and 18 (LoRA r=4)."""
    lora(model, lora_r, lora_alpha, lora_dropout, target_modules)
    lmam(model, **lmam_hp)


def dora_lmam(model, lora_r=4, lora_alpha=8.0, lora_dropout=0.05, target_modules=LLAMA_TARGETS, **lmam_hp):
    """DoRA + LMAM, the plug-in of Table 18 (DoRA r=4)."""
    dora(model, lora_r, lora_alpha, lora_dropout, target_modules)
    lmam(model, **lmam_hp)


def series_lmam(model, adapter_r=2, adapter_scale=1.0, adapter_dropout=0.0, target_modules="down_proj", **lmam_hp):
    """Series adapter + LMAM, the plug-in of Table 18 (adapter rank 2)."""
    series(model, adapter_r, adapter_scale, adapter_dropout, target_modules)
    lmam(model, **lmam_hp)


def parallel_lmam(model, adapter_r=256, adapter_scale=1.0, adapter_dropout=0.0, target_modules="up_proj,down_proj",
                  **lmam_hp):
    """Parallel adapter + LMAM, the plug-in of Table 6."""
    parallel(model, adapter_r, adapter_scale, adapter_dropout, target_modules)
    lmam(model, **lmam_hp)


# LongLoRA (Chen et al. 2024), Table 7's long-sequence baseline. Its S²-Attn is a training setting,
# not a module: train.py --s2_ratio (1/4 in its presets), model.shifted_sparse_attention.

def longlora(model, lora_r=8, lora_alpha=16.0, lora_dropout=0.0, target_modules="q_proj,k_proj,v_proj,o_proj",
             context_len=8192):
    """LongLoRA's trainable parts (its fine-tune.py): LoRA r=8, α=16 on the attention projections,
    the embeddings and every norm trainable (the LM head frozen), a [PAD] token whose rows start at
    the mean embedding, and RoPE position interpolation by ceil(context_len / trained length)."""
    lora(model, lora_r, lora_alpha, lora_dropout, target_modules)
    add_pad_token(model)
    factor = math.ceil(context_len / model.cfg.max_seq_len)
    if factor > 1 and model.cfg.rope_scaling is None:                    # linear position interpolation
        model.cfg.rope_scaling = {"rope_type": "linear", "factor": float(factor)}
    for name, p in model.named_parameters():
        if "embed" in name or "norm" in name:                             # LongLoRA's trainable_params
            p.requires_grad_(True)


def longlora_lmam(model, lora_r=8, lora_alpha=16.0, lora_dropout=0.0, target_modules="q_proj,k_proj,v_proj,o_proj",
                  context_len=8192, lmam_mode="tail", lmam_len=256, **lmam_hp):
    """LongLoRA + LMAM (Table 7): the map on the last n = 256 tokens (Eq. 16, §4.2.2), Table 19's LMAM."""
    longlora(model, lora_r, lora_alpha, lora_dropout, target_modules, context_len)
    lmam(model, lmam_mode=lmam_mode, lmam_len=lmam_len, **lmam_hp)


def add_pad_token(model):
    """One more token row in the embedding and the LM head, set to the mean of the others (LongLoRA's
    smart_tokenizer_and_embedding_resize); its id is the old vocabulary size."""
    if not isinstance(model, M.Llama) or model.cfg.tie_embeddings:
        raise ValueError("a [PAD] token is added to LLaMA checkpoints with separate embedding and LM head")
    for owner, name in ((model, "embed_tokens"), (model, "lm_head")):
        old = getattr(owner, name).weight
        new = torch.cat([old.detach(), old.detach().float().mean(0, keepdim=True).to(old.dtype)])
        getattr(owner, name).weight = nn.Parameter(new, requires_grad=False)
    model.embed_tokens.num_embeddings = model.lm_head.out_features = model.cfg.vocab_size = new.shape[0]


# Adaptive-rank LoRA (adaptive.py), Table 11's baselines: besides their layers they attach an update
# hook, which train.py calls around every optimizer step (update_hooks).

def adalora(model, adalora_init_r=12, adalora_target_r=8, lora_alpha=8.0, lora_dropout=0.0,
            target_modules="q_proj,v_proj", adalora_tinit=0, adalora_tfinal=0, adalora_delta_t=1,
            adalora_beta1=0.85, adalora_beta2=0.85, adalora_orth_reg=0.5):
    """AdaLoRA (adaptive.py): SVD-form LoRA of initial rank init_r whose triplets are pruned to an
    average target_r by importance, on a cubic budget schedule over the run (tinit steps before it,
    tfinal after it, an allocation every delta_t steps); orthogonality regulariser orth_reg.
    Defaults: peft's AdaLoraConfig (its LLaMA targets q_proj, v_proj)."""
    for parent, name in linear_targets(model, target_modules):
        setattr(parent, name, AdaLoRALinear(getattr(parent, name), adalora_init_r, lora_alpha, lora_dropout))
    model.update_hooks = [AdaLoRAAllocator(adalora_target_r, adalora_tinit, adalora_tfinal, adalora_delta_t,
                                           adalora_beta1, adalora_beta2, adalora_orth_reg)]


def sora(model, lora_r=8, lora_alpha=16.0, lora_dropout=0.0,
         target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", sora_lambda=10.0,
         sora_lambda2=3e-4, sora_threshold="fixed", sora_schedule="none", sora_max_lambda=10.0, sora_lambda_num=10,
         sora_prox="released"):
    """SoRA (adaptive.py): LoRA with a gate between A and B, the gate trained by its own proximal
    step (L1 weight sora_lambda in the loss, threshold sora_lambda2 after each Adam step). Defaults:
    SoRA's run_glue_sora_no_schedule.sh (r 8, λ 10, λ2 3e-4; α 16 of config/lora_config.json) on
    every linear layer of a block (their default_modified_modules). sora_prox: "released" (their
    sparse_optimizer.py's three masks: every gate with |z| < 2·λ2 goes to 0) or "soft" (the paper's
    soft threshold at λ2)."""
    for parent, name in linear_targets(model, target_modules):
        setattr(parent, name, SoRALinear(getattr(parent, name), lora_r, lora_alpha, lora_dropout))
    model.update_hooks = [SoRAGates(sora_lambda, sora_lambda2, sora_threshold, sora_schedule, sora_max_lambda,
                                    sora_lambda_num, prox=sora_prox)]


def update_hooks(model) -> list:
    """The update hooks a method attached (adaptive.py's protocol); [] for most methods."""
    return list(getattr(model, "update_hooks", ()))


def no_decay_names(model) -> set:
    """The parameters AdamW's weight decay leaves alone, by the Hugging Face Trainer's rule, which
    the Trainers of He et al., AdaLoRA and SoRA apply (transformers' get_parameter_names(model,
    [nn.LayerNorm]) less every name containing "bias"): every bias, and every parameter of a
    LayerNorm module (the Houlsby adapter's own included). LLaMA's RMSNorm counts as a LayerNorm,
    as in later transformers (its name patterns "norm", "rmsnorm"); LLaMA's references train with
    no weight decay, so this only matters there when --weight_decay is set."""
    names = {n for n, _ in model.named_parameters() if "bias" in n}
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, M.RMSNorm)):
            names |= {f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()}
    return names


def param_groups(model, learning_rate: float, weight_decay: float, lmam_lr_scale: float = 1.0,
                 exclude=()) -> list[dict]:
    """AdamW's parameter groups for the trainable parameters of `model` (those in `exclude`, e.g.
    SoRA's gates, stepped by their hook, aside): LMAM's factors at learning_rate·lmam_lr_scale,
    the rest at learning_rate; within each, weight decay on all but no_decay_names (biases and
    norms: weight decay 0). With weight_decay = 0 nothing is split. Empty groups are left out; the
    order is fixed (rest before LMAM, decayed before not), so --resume finds the same groups."""
    skip, no_decay = {id(p) for p in exclude}, no_decay_names(model)
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad or id(p) in skip:
            continue
        is_map, decays = ".attn_map." in n, weight_decay > 0 and n not in no_decay
        groups.setdefault((is_map, not decays), []).append(p)
    return [{"params": groups[key], "lr": learning_rate * (lmam_lr_scale if key[0] else 1.0),
             "weight_decay": 0.0 if key[1] else weight_decay} for key in sorted(groups)]


METHODS = {
    "full": full, "bitfit": bitfit, "prefix": prefix, "series": series, "parallel": parallel,
    "adapter_ffn": adapter_ffn, "mam": mam, "lora": lora, "dora": dora, "quanta": quanta, "lmam": lmam,
    "lorada_la": lorada_la, "lorada_q": lorada_q, "lorada_a": lorada_a,
    "lora+lmam": lora_lmam, "dora+lmam": dora_lmam, "series+lmam": series_lmam, "parallel+lmam": parallel_lmam,
    "adalora": adalora, "sora": sora, "longlora": longlora, "longlora+lmam": longlora_lmam,
}


# ----------------------------------------------------------------------------- hyperparameters

def hyperparameter_defaults(method) -> dict:
    """{name: (default, the function whose signature gives it)}: a method's keyword arguments, and
    LMAM's where it takes **lmam_hp."""
    params = inspect.signature(method).parameters
    hp = {n: (p.default, method) for n, p in params.items() if p.default is not inspect.Parameter.empty}
    return {**hyperparameter_defaults(lmam), **hp} if "lmam_hp" in params else hp


def hyperparameters(method) -> dict:
    """A method's hyperparameters with their defaults."""
    return {n: default for n, (default, _) in hyperparameter_defaults(method).items()}


def flag_types() -> dict:
    """Every hyperparameter of every method -> the type of its value (train.py's flags; a bool's
    flag reads true/false/1/0, since bool("false") would be True)."""
    types = {}
    for method in METHODS.values():
        for name, default in hyperparameters(method).items():
            types.setdefault(name, truth if isinstance(default, bool) else type(default))
    return types


def truth(text) -> bool:
    """A bool hyperparameter's value from the command line (or a bool itself)."""
    if isinstance(text, bool):
        return text
    if str(text).lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true, false, 1 or 0, got {text!r}")
    return str(text).lower() in ("true", "1")


def model_keys(cfg) -> tuple:
    """The preset keys of a model, most general first: its family, then its name (cfg.name, which
    the loader sets from the checkpoint's config)."""
    if isinstance(cfg, M.BartConfig):
        family = cfg.model_type
    elif isinstance(cfg, M.DebertaConfig):
        family = "deberta"
    else:
        family = "roberta" if isinstance(cfg, M.RobertaConfig) else "llama"
    return (family, getattr(cfg, "name", None))


def method_hparam_sources(name: str, keys: tuple = (), overrides: dict | None = None, task: str | None = None,
                          preset: str | None = None) -> dict:
    """{hyperparameter: (value, where it comes from)}. Each source overrides the ones before it: the
    method's defaults (its signature), its presets.py rows for the model (family, then name), for
    the task, for the family on that task ("roberta/sst2"), the named preset's row (train.py
    --preset), then the caller's overrides (the command line), checked against the method's
    hyperparameters. Their values are checked where they are used (the modules' constructors)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    hp = {k: (v, f"methods.py {fn.__name__}()") for k, (v, fn) in hyperparameter_defaults(METHODS[name]).items()}
    rows = [(METHOD_PRESETS.where((name, key)), METHOD_PRESETS[(name, key)])
            for key in (*keys, task, f"{keys[0]}/{task}" if keys and task else None) if (name, key) in METHOD_PRESETS]
    if preset is not None:
        rows.append((f"presets.py NAMED_PRESETS[{preset!r}]", NAMED_PRESETS[preset]["rows"].get(name, {})))
    for source, row in rows:
        hp.update({k: (v, source) for k, v in row.items()})
    types = flag_types()
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in hp:
            raise ValueError(f"method {name!r} has no hyperparameter {k!r}; it takes: "
                             f"{', '.join(sorted(hp)) or 'none'}")
        if isinstance(v, (list, tuple)):
            v = ("-" if k == "quanta_dims" else ",").join(map(str, v))
        hp[k] = (types[k](v), "command line")
    return hp


def method_hparams(name: str, keys: tuple = (), overrides: dict | None = None, task: str | None = None) -> dict:
    """The method's hyperparameters for a model (its preset keys), a task and the caller's
    overrides: the values of method_hparam_sources."""
    return {k: v for k, (v, _) in method_hparam_sources(name, keys, overrides, task).items()}


def apply_method(model, name: str, task: str | None = None, **overrides):
    """Adapt `model` in place with method `name`: freeze it, attach the method (what it attaches
    trains). A RoBERTa classification head always trains, as with peft's modules_to_save (He et
    al.'s released code trains only their adapters' "ef_" parameters, so their GLUE head stays at
    its random initialisation). `task` picks the task's preset row. The model keeps what was
    there before (base_keys, its state dict's names) and what the method attached (attached)."""
    if getattr(model, "peft_method", None) is not None:
        raise ValueError(f"the model already has method {model.peft_method['name']!r} applied")
    hp = method_hparams(name, model_keys(model.cfg), overrides, task)
    base_keys, base_modules = set(model.state_dict().keys()), set(model.modules())
    model.fingerprint = base_fingerprint(model)    # the base's, before a method changes it (LongLoRA's [PAD])
    model.requires_grad_(False)
    METHODS[name](model, **hp)
    if getattr(model, "head", None) is not None:
        model.head.requires_grad_(True)
    model.train(model.training)        # new modules (their dropout) follow the model's train/eval mode
    if not any(p.requires_grad for p in model.parameters()):
        warnings.warn(f"method {name!r} leaves no parameter of this model trainable (e.g. BitFit on LLaMA, "
                      f"which has no biases)")
    model.peft_method = {"name": name, "hparams": hp}
    model.base_keys, model.attached = base_keys, attached_modules(model, base_modules)
    return model


def attached_modules(model, before: set) -> dict:
    """{qualified name: class} of the modules a method attached: those not in the model before (the
    set `before`) whose parent was: LoRALinear in place of an nn.Linear, not its dropout."""
    attached, new = {}, set()
    for qualified, module in model.named_modules():
        if module in before:
            continue
        new.add(qualified)
        if qualified.rpartition(".")[0] not in new:
            attached[qualified] = type(module)
    return attached


def trained_base(model) -> list[str]:
    """The names of the base model's own parameters that train with its method (full fine-tuning:
    all; BitFit: the biases; LongLoRA: the embeddings and norms), the GLUE head aside."""
    return [n for n, p in model.named_parameters()
            if p.requires_grad and n in model.base_keys and not n.startswith("head.")]


# ----------------------------------------------------------------------------- what a method is made of

PROBE_MODELS = ("llama-7b", "roberta-base", "bart-large", "deberta-v3-base")    # a model of each family
_anatomies = {}                  # method function -> its anatomy (the probes run once per process)


def probe_twin(name: str):
    """A weightless one-layer twin of model.py's preset `name`, on the meta device: its widths, its
    presets (cfg.name) and its module types, no memory."""
    cfg = M.LlamaConfig.from_name(name) if name in M.LLAMA_PRESETS else M.ENCDEC_PRESETS[name]
    depth = {f.name: 1 for f in dataclasses.fields(cfg) if f.name in ("n_layers", "encoder_layers", "decoder_layers")}
    cfg = dataclasses.replace(cfg, name=name, **depth)
    family = {M.LlamaConfig: M.Llama, M.RobertaConfig: M.Roberta, M.BartConfig: M.Bart, M.DebertaConfig: M.Deberta}
    with torch.device("meta"):
        return family[type(cfg)](cfg)


def anatomy(name: str) -> dict:
    """What method `name` does to a model, found by doing it: applied with its defaults and presets
    to a one-layer twin of each PROBE_MODELS family, {"attached": the classes of the modules it
    attaches, "base": the base parameters it trains (trained_base), "models": the probes it
    applies to}. A family the method does not apply to (LongLoRA on RoBERTa) is left out. Nothing
    is declared by the method: a new one is probed like the others."""
    method = METHODS[name]
    if method not in _anatomies:
        found = {"attached": set(), "base": set(), "models": []}
        for probe in PROBE_MODELS:
            twin = probe_twin(probe)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")              # (BitFit on LLaMA trains nothing)
                    apply_method(twin, name)
            except Exception:                 # settings for another family (QuanTA's dims, LongLoRA's o_proj)
                continue
            found["models"].append(probe)
            found["attached"] |= set(twin.attached.values())
            found["base"] |= set(trained_base(twin))
        _anatomies[method] = found
    return _anatomies[method]


def trains_base(name: str) -> bool:
    """Whether a method trains the base model's own weights (anatomy): full fine-tuning, BitFit,
    LongLoRA's embeddings and norms, a method of yours that unfreezes a norm. Then train.py loads
    them in fp32 and bf16 autocast does the bf16 work, so that no bf16 weight is trained."""
    return bool(anatomy(name)["base"])


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all): each parameter counted once (tied weights once), as peft does."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def parameter_report(model) -> str:
    t, a = count_parameters(model)
    return f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"


# ----------------------------------------------------------------------------- adapter files

ADAPTER_EXT = ".safetensors"


FINGERPRINT_SAMPLES = 4          # values read from each base tensor: 1,164 for LLaMA-7B, a few ms
FINGERPRINT_RTOL = 1e-2          # bf16 rounds a weight by at most 2^-9 of it: the same model in fp32 or bf16 matches


def base_fingerprint(model) -> dict:
    """What identifies the base model: its shapes (the config's), and for every tensor of its
    state dict (the GLUE head aside: a fresh one is random) its shape and FINGERPRINT_SAMPLES values
    at evenly spread positions, rounded to 5 significant digits: {"tensors": {name: [shape,
    values]}}. Deterministic and cheap (a 7B model: a few milliseconds, nothing else read from
    disk); the values match across fp32 and bf16 loads of one checkpoint within FINGERPRINT_RTOL,
    and two different models of one shape differ in nearly every tensor. "checksum" (16 embedding
    rows) is what adapters written before "tensors" recorded. apply_method computes it before the
    method changes anything (and a sharded model, fsdp.py, keeps that one)."""
    if getattr(model, "fingerprint", None) is not None:
        return model.fingerprint
    c = model.cfg
    fp = {k: getattr(c, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")
          if hasattr(c, k)}
    if not isinstance(model, M.Llama):
        fp["model"] = type(model).__name__
    w = (model.shared if isinstance(model, M.Bart) else model.embed_tokens).weight
    fp["checksum"] = None if w.is_meta else float(w.detach()[:16].double().abs().sum())
    tensors = {}
    for name, t in sorted(model.state_dict().items()):
        if name.startswith("head."):
            continue
        values = None
        if not t.is_meta:
            n, k = t.numel(), min(FINGERPRINT_SAMPLES, t.numel())
            flat = torch.tensor([(2 * i + 1) * n // (2 * k) for i in range(k)], dtype=torch.long, device=t.device)
            picked = t.detach()[torch.unravel_index(flat, t.shape)] if t.dim() else t.detach().reshape(1)[:k]
            values = [float(f"{v:.5g}") for v in picked.double().cpu().tolist()]
        tensors[name] = [list(t.shape), values]
    fp["tensors"] = tensors
    return fp


def fingerprint_difference(theirs: dict, ours: dict) -> str | None:
    """The first way two base fingerprints differ, in words (None when they match): a config
    shape, a tensor present in one only, a tensor's shape, or a tensor's sampled values beyond
    FINGERPRINT_RTOL. A fingerprint without "tensors" (written before them) is compared by its
    embedding checksum only; fingerprint_is_partial says so."""
    for k, v in theirs.items():
        if k not in ("checksum", "tensors") and v != ours.get(k):
            return f"{k}={v} there, {k}={ours.get(k)} here"
    close = lambda a, b: abs(a - b) <= FINGERPRINT_RTOL * max(abs(a), abs(b)) + 1e-6
    if "tensors" not in theirs or theirs["tensors"] is None or "tensors" not in ours:
        a, b = theirs.get("checksum"), ours.get("checksum")
        if None not in (a, b) and not close(a, b):
            return f"embedding checksum {a:.6g} there, {b:.6g} here"
        return None
    a, b = theirs["tensors"], ours["tensors"]
    if not isinstance(a, dict):
        return "its fingerprint's tensors are not a JSON object"
    for name in sorted(set(a) | set(b)):
        if name not in b:
            return f"tensor {name!r} there, none of that name here"
        if name not in a:
            return f"no tensor {name!r} there, one here"
        (shape_a, va), (shape_b, vb) = a[name], b[name]
        if list(shape_a) != list(shape_b):
            return f"tensor {name!r} of shape {tuple(shape_a)} there, {tuple(shape_b)} here"
        if va is not None and vb is not None and (len(va) != len(vb) or not all(map(close, va, vb))):
            return f"tensor {name!r} holds other values (sampled: {va} there, {vb} here)"
    return None


def fingerprint_is_partial(fp: dict) -> bool:
    """Whether a recorded fingerprint predates the per-tensor one (shapes and 16 embedding rows only)."""
    return not isinstance(fp.get("tensors"), dict)


def adapter_state(model) -> dict:
    """The tensors an adapter file holds: those the method added (parameters and buffers, such as
    QuanTA's frozen copy) and the base parameters it trains (BitFit, full fine-tuning)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in model.base_keys or k in trainable}


def save_adapter(model, path: str, tensors: dict | None = None):
    """Write the method's tensors (adapter_state, or `tensors`: a sharded model's, gathered by
    fsdp.full_tensors) and the method's configuration to one safetensors file."""
    if getattr(model, "peft_method", None) is None:
        raise ValueError("save_adapter: no method applied to this model (call apply_method first)")
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError("save_adapter: the adapter is merged into the weights; unmerge it first")
    meta = {"method": model.peft_method["name"], "hparams": json.dumps(model.peft_method["hparams"]),
            "base": json.dumps(base_fingerprint(model)), "base_name": getattr(model.cfg, "name", None) or ""}
    tensors = adapter_state(model) if tensors is None else tensors
    write_safetensors({k: v.detach() for k, v in tensors.items()}, path, metadata=meta)


def adapter_meta_json(path: str, meta: dict, key: str) -> dict:
    """A JSON object of an adapter file's metadata ("hparams", "base"), or an error naming the file
    and the key."""
    if key not in meta:
        raise ValueError(f"{path}: its metadata has no {key!r} (not an adapter file of this project's train.py?)")
    try:
        value = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({e.msg}): {meta[key][:80]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: metadata {key!r} is a JSON {type(value).__name__}, expected an object")
    return value


def check_shapes_before_applying(model, name: str, hp: dict, path: str):
    """The shapes the file's method and hyperparameters give, worked out on a weightless twin of
    the model (the meta device), against the file's own tensors: hyperparameters that do not fit
    the tensors (a lora_r of 100,000 beside rank-2 tensors) are refused before anything is
    allocated. A model that cannot be built as a twin is checked after applying, as before."""
    try:
        with torch.device("meta"):
            twin = type(model)(model.cfg)
        apply_method(twin, name, **hp)
    except Exception:                        # (an unusual model: the checks after applying still run)
        return
    shapes = {k: tuple(v["shape"]) for k, v in read_safetensors_header(path)[0].items() if k != "__metadata__"}
    for k, t in adapter_state(twin).items():
        if k in shapes and shapes[k] != tuple(t.shape):
            raise ValueError(f"{path}: tensor {k!r} has shape {shapes[k]}, but its metadata's {name} {hp} "
                             f"gives {tuple(t.shape)}")


def load_adapter(model, path: str):
    """Load an adapter file onto `model`: applies the file's method (with its hyperparameters) if
    none is applied yet, then its tensors. A different base model or method is an error."""
    meta = read_safetensors_metadata(path)
    if "method" not in meta:
        raise ValueError(f"{path}: not an adapter file of this project (no method in its metadata)")
    name, hp, base = meta["method"], adapter_meta_json(path, meta, "hparams"), adapter_meta_json(path, meta, "base")
    ours = base_fingerprint(model)
    # the models by name where known (presets.py's names, saved since base_name was added)
    theirs_name = f" ({meta['base_name']})" if meta.get("base_name") else ""
    ours_name = f" ({model.cfg.name})" if getattr(model.cfg, "name", None) else ""
    for k in base:
        if k not in ("checksum", "tensors") and base[k] != ours.get(k):
            raise ValueError(f"{path}: was trained on a base model{theirs_name} with {k}={base[k]}, this "
                             f"model{ours_name} has {ours.get(k)}")
    differs = fingerprint_difference(base, ours)
    if differs:
        raise ValueError(f"{path}: was trained on a different base model{theirs_name}, not on this one{ours_name}: "
                         f"{differs}")
    if fingerprint_is_partial(base):
        print(f"warning: {path} was written before adapters recorded every base tensor's fingerprint: only the "
              f"base model's shapes and 16 embedding rows could be checked against this model{ours_name}",
              file=sys.stderr)
    current = getattr(model, "peft_method", None)
    if current is None:
        check_shapes_before_applying(model, name, hp, path)
        apply_method(model, name, **hp)
    elif current["name"] != name or current["hparams"] != hp:
        raise ValueError(f"{path}: holds method {name!r} {hp}, but the model has {current['name']!r} "
                         f"{current['hparams']} applied")
    tensors = read_safetensors(path)
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing[:3]}, unexpected tensors {unexpected[:3]}")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(expected[k].shape)}")
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)
    return model


# ----------------------------------------------------------------------------- training hyperparameters

def train_hparam_sources(method: str, model_name: str | None = None, pipeline: str = "llm", task: str | None = None,
                         overrides: dict | None = None) -> dict:
    """{setting: (value, where it comes from)}. Each source overrides the ones before it:
    TRAIN_DEFAULTS, the pipeline's row, the method's rows for the pipeline, the checkpoint and the
    task (presets.py), then the caller's overrides (the command line). A micro-batch is at most a
    batch."""
    hp = {k: (v, f"presets.py TRAIN_DEFAULTS ({TRAIN_DEFAULTS_SOURCE})") for k, v in TRAIN_DEFAULTS.items()}
    keys = [pipeline, *((method, key) for key in (pipeline, model_name, task))]
    rows = [(TRAIN_PRESETS.where(key), TRAIN_PRESETS[key]) for key in keys if key in TRAIN_PRESETS]
    rows.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}))
    for source, row in rows:
        hp.update({k: (v, source) for k, v in row.items()})
    if hp["micro_batch_size"][0] > hp["batch_size"][0]:
        hp["micro_batch_size"] = (hp["batch_size"][0], "batch_size (a micro-batch is at most a batch)")
    return hp


def train_hparams(method: str, model_name: str | None = None, pipeline: str = "llm", task: str | None = None,
                  overrides: dict | None = None) -> dict:
    """The training settings of a run: the values of train_hparam_sources."""
    return {k: v for k, (v, _) in train_hparam_sources(method, model_name, pipeline, task, overrides).items()}


def source_lines(sources: dict) -> list[str]:
    """A line per value of method_hparam_sources / train_hparam_sources: the name, the value, where it
    comes from (train.py --dry_run)."""
    show = lambda v: f"{v:.4g}" if isinstance(v, float) and len(repr(v)) > 10 else str(v)
    return [f"  {k:<18} {show(v):<10} {source}" for k, (v, source) in sources.items()]
