"""The method registry: one dict from a method name to the parts it attaches, the parameters that
train, and its hyperparameters (defaults, then per-model presets, then the caller's overrides).

    apply_method(model, "lora", lora_r=4, target_modules="q_proj,v_proj")   # in place; returns model
    save_adapter(model, "out/adapter.safetensors"); load_adapter(base_model, "out/adapter.safetensors")

train.py and eval.py use exactly these. Every hyperparameter is also a command-line flag of
train.py with the same name (LLM-Adapters' flag names).
"""
import json
import math
import warnings

import torch
import torch.nn as nn

import model as M
from adapters import AdapterFFN, BottleneckLinear, PrefixEncoder, PrefixSlice
from lmam import LMAM
from lora import DoRALinear, LoRALinear
from quanta import QuanTALinear

# name -> type of the command-line value
HPARAMS = {
    "lora_r": int, "lora_alpha": float, "lora_dropout": float, "target_modules": str,
    "adapter_r": int, "adapter_scale": float, "adapter_dropout": float,
    "prefix_len": int, "prefix_mid_dim": int, "quanta_dims": str,
    "lmam_heads": int, "lmam_rank": int, "lmam_len": int, "lmam_scale": float, "lmam_variant": str,
    "lmam_mode": str, "lmam_init": str,
}

# A part attaches one kind of module. Each takes (model, hyperparameters) and returns nothing.

def linear_targets(model, target_modules: str):
    """(parent module, attribute name) of every nn.Linear whose name is one of `target_modules`,
    outside RoBERTa's classification head (which trains whole)."""
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


def add_lora(model, hp, cls=LoRALinear):
    for parent, attr in linear_targets(model, hp["target_modules"]):
        setattr(parent, attr, cls(getattr(parent, attr), hp["lora_r"], hp["lora_alpha"], hp["lora_dropout"]))


def add_dora(model, hp):
    add_lora(model, hp, cls=DoRALinear)


def add_quanta(model, hp):
    dims = [int(d) for d in str(hp["quanta_dims"]).replace(",", "-").split("-")]
    for parent, attr in linear_targets(model, hp["target_modules"]):
        setattr(parent, attr, QuanTALinear(getattr(parent, attr), dims))


def add_series(model, hp):
    """LLaMA: LLM-Adapters' series (bottleneck) adapter, before gate_proj/up_proj, after anything
    else. RoBERTa/BART: He et al.'s Houlsby adapter after the projection (out_proj: every attention,
    with a LayerNorm on its input; fc2: the FFN), ReLU, with biases."""
    for parent, attr in linear_targets(model, hp["target_modules"]):
        if isinstance(model, M.Llama):
            kind, extra = ("series_in" if attr in ("gate_proj", "up_proj") else "series_out"), {}
        else:
            kind, extra = "series_out", dict(act="relu", bias=True, layer_norm=attr == "out_proj")
        setattr(parent, attr, BottleneckLinear(getattr(parent, attr), hp["adapter_r"], kind,
                                               scale=hp["adapter_scale"], dropout=hp["adapter_dropout"], **extra))


def add_parallel(model, hp):
    for parent, attr in linear_targets(model, hp["target_modules"]):
        setattr(parent, attr, BottleneckLinear(getattr(parent, attr), hp["adapter_r"], "parallel",
                                               scale=hp["adapter_scale"], dropout=hp["adapter_dropout"]))


def device_of(model):
    return next(model.parameters()).device


def add_adapter_ffn(model, hp):
    """He et al.'s scaled parallel adapter on every FFN (LLaMA's MLP; every encoder and decoder layer)."""
    for ffn in [m for m in model.modules() if isinstance(m, (M.MLP, M.FFN))]:
        ffn.adapter = AdapterFFN(model.cfg.dim, hp["adapter_r"], hp["adapter_scale"], hp["adapter_dropout"],
                                 device_of(model))


def attention_sites(model) -> dict:
    """Where prefix tuning attaches, one prefix encoder per site: {attribute: attention modules}.
    LLaMA, RoBERTa: self-attention. BART/mBART: encoder self-attention, decoder self-attention and
    cross-attention, each with its own encoder (He et al.'s three-way prefix)."""
    if isinstance(model, M.Bart):
        return {"prefix_encoder": [l.self_attn for l in model.encoder.layers],
                "prefix_decoder": [l.self_attn for l in model.decoder.layers],
                "prefix_cross": [l.encoder_attn for l in model.decoder.layers]}
    return {"prefix_encoder": [l.self_attn for l in model.layers]}


def add_prefix(model, hp):
    c = model.cfg
    for name, attns in attention_sites(model).items():
        enc = PrefixEncoder(len(attns), getattr(c, "n_kv_heads", c.n_heads), c.head_dim, c.dim, hp["prefix_len"],
                            hp["prefix_mid_dim"], device=device_of(model))
        setattr(model, name, enc)
        for i, attn in enumerate(attns):
            attn.prefix = PrefixSlice(enc, i)


def add_lmam(model, hp):
    """LMAM in self-attention: every layer of LLaMA (causal) and RoBERTa; BART/mBART's encoder
    (Table 15, "Where/LMAM: Encoder")."""
    if hp["lmam_mode"] not in ("head", "tail"):
        raise ValueError(f"lmam_mode must be 'head' (Eq. 14-15) or 'tail' (Eq. 16), got {hp['lmam_mode']!r}")
    layers = model.encoder.layers if isinstance(model, M.Bart) else model.layers
    for layer in layers:
        layer.self_attn.attn_map = LMAM(model.cfg.n_heads, hp["lmam_heads"], hp["lmam_rank"], hp["lmam_len"],
                                        hp["lmam_scale"], causal=isinstance(model, M.Llama),
                                        variant=hp["lmam_variant"], tail=hp["lmam_mode"] == "tail",
                                        init=hp["lmam_init"], device=device_of(model))


def no_module(model, hp):
    pass


# part -> (attach function, hyperparameters it reads, names of the parameters that train)
PARTS = {
    "full":        (no_module, (), None),                      # None: every parameter trains
    "bitfit":      (no_module, (), ("bias",)),
    "lora":        (add_lora, ("lora_r", "lora_alpha", "lora_dropout", "target_modules"), ("lora_A", "lora_B")),
    "dora":        (add_dora, ("lora_r", "lora_alpha", "lora_dropout", "target_modules"),
                    ("lora_A", "lora_B", "magnitude")),
    "quanta":      (add_quanta, ("quanta_dims", "target_modules"), ("quanta_T.",)),
    "series":      (add_series, ("adapter_r", "adapter_scale", "adapter_dropout", "target_modules"), ("adapter_",)),
    "parallel":    (add_parallel, ("adapter_r", "adapter_scale", "adapter_dropout", "target_modules"), ("adapter_",)),
    "adapter_ffn": (add_adapter_ffn, ("adapter_r", "adapter_scale", "adapter_dropout"), ("adapter_",)),
    "prefix":      (add_prefix, ("prefix_len", "prefix_mid_dim"), ("prefix_",)),
    "lmam":        (add_lmam, ("lmam_heads", "lmam_rank", "lmam_len", "lmam_scale", "lmam_variant", "lmam_mode",
                               "lmam_init"), (".wa", ".wb", "attn_map.w")),
}

LLAMA_LORA = dict(lora_r=32, lora_alpha=64, lora_dropout=0.05, target_modules="q_proj,k_proj,v_proj,up_proj,down_proj")
TINY = ("llama-tiny", "llama-tiny-gqa")
MEDIUM = ("roberta", "bart", "mbart")         # model families: presets apply to any size
# He et al.'s settings for the medium models (adapters.md): LoRA r=16, alpha 32, dropout 0.1 on
# q_proj, v_proj; Houlsby adapters with bottleneck 200 after every attention and FFN; prefix l=200
# (GLUE baseline) or 30 (MAM on XSum/MT) with mid_dim 800; FFN scaled PA r=16 s=2 (GLUE), r=512 s=4.
HE_LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.1, target_modules="q_proj,v_proj")
HE_SERIES = dict(adapter_r=200, adapter_scale=1.0, adapter_dropout=0.1, target_modules="out_proj,fc2")
HE_PA = {"roberta": dict(adapter_r=16, adapter_scale=2.0, adapter_dropout=0.1),
         "bart": dict(adapter_r=512, adapter_scale=4.0, adapter_dropout=0.1),
         "mbart": dict(adapter_r=512, adapter_scale=4.0, adapter_dropout=0.1)}

# The registry. defaults: LLM-Adapters' LLaMA settings (llm_adapters.md; math_running_commands)
# unless noted; presets: per model name (model.preset_name) where a setting differs.
METHODS = {
    "full":     dict(parts=("full",), defaults={}),
    "bitfit":   dict(parts=("bitfit",), defaults={}),
    # peft PrefixTuningConfig(num_virtual_tokens=10), prefix_projection=False, as LLM-Adapters ran it
    "prefix":   dict(parts=("prefix",), defaults=dict(prefix_len=10, prefix_mid_dim=0),
                     presets={"roberta": dict(prefix_len=200, prefix_mid_dim=800),
                              "bart": dict(prefix_len=30, prefix_mid_dim=800),
                              "mbart": dict(prefix_len=30, prefix_mid_dim=800)}),
    # bottleneck 256, tanh, scaling 1: series after down_proj (0.99% of LLaMA-7B), parallel on up/down (3.54%)
    "series":   dict(parts=("series",), defaults=dict(adapter_r=256, adapter_scale=1.0, adapter_dropout=0.0,
                                                     target_modules="down_proj"),
                     presets={m: HE_SERIES for m in MEDIUM}),
    "parallel": dict(parts=("parallel",), defaults=dict(adapter_r=256, adapter_scale=1.0, adapter_dropout=0.0,
                                                       target_modules="up_proj,down_proj")),
    # He et al.'s FFN scaled PA; r=16, s=2 as their GLUE script (the LoRaDA presets set their own)
    "adapter_ffn": dict(parts=("adapter_ffn",), defaults=dict(adapter_r=16, adapter_scale=2.0, adapter_dropout=0.0),
                        presets=HE_PA),
    # He et al.'s MAM: prefix l=30 (mid_dim 800) + FFN scaled PA r=512, s=4
    "mam":      dict(parts=("prefix", "adapter_ffn"), defaults=dict(prefix_len=30, prefix_mid_dim=800, adapter_r=512,
                                                                    adapter_scale=4.0, adapter_dropout=0.0),
                     presets={"roberta": dict(prefix_len=16, adapter_r=16, adapter_scale=2.0, adapter_dropout=0.1),
                              "bart": dict(adapter_dropout=0.1), "mbart": dict(adapter_dropout=0.1)}),
    "lora":     dict(parts=("lora",), defaults=LLAMA_LORA, presets={m: HE_LORA for m in MEDIUM}),
    "dora":     dict(parts=("dora",), defaults=LLAMA_LORA, presets={m: HE_LORA for m in MEDIUM}),
    # QuanTA's commonsense scripts: q_proj, v_proj; 16-8-8-4 (d=4096), 16-8-8-5 (d=5120)
    "quanta":   dict(parts=("quanta",), defaults=dict(quanta_dims="16-8-8-4", target_modules="q_proj,v_proj"),
                     presets={"llama-13b": dict(quanta_dims="16-8-8-5"), "llama2-13b": dict(quanta_dims="16-8-8-5"),
                              "llama2-70b": dict(quanta_dims="16-8-8-8"),
                              **{t: dict(quanta_dims="4-4-4") for t in TINY}}),
}


# LMAM presets, Table 19 (LoRaDA-LA on LLaMA) with the underlined choices. Table 19 lists two LoRA
# placements, O+Down and O+Up+Down; the paper's # Params (%) tell which each model used (7B, 2-7B,
# 13B: O+Down; 3-8B, 2-70B: O+Up+Down).
LMAM_BASE = dict(lmam_heads=32, lmam_rank=2, lmam_len=128, lmam_scale=1 / (4096 * 600), lmam_variant="default",
                 lmam_mode="head", lmam_init="scaled")
LORADA_LA = dict(LMAM_BASE, lora_r=1, lora_alpha=2, lora_dropout=0.05, target_modules="o_proj,down_proj",
                 adapter_r=18, adapter_scale=4.0, adapter_dropout=0.0)
LORADA_LA_PRESETS = {
    "llama2-7b": dict(adapter_r=15),
    "llama3-8b": dict(lmam_scale=1 / (4096 * 1200), lora_r=2, lora_alpha=4, adapter_r=2,
                      target_modules="o_proj,up_proj,down_proj"),
    "llama-13b": dict(lmam_heads=40, lmam_scale=1 / (5120 * 600), adapter_r=12),
    "llama2-13b": dict(lmam_heads=40, lmam_scale=1 / (5120 * 600), adapter_r=12),
    "llama2-70b": dict(lmam_heads=64, lmam_scale=1 / (8192 * 1600), adapter_r=7, target_modules="o_proj,up_proj,down_proj"),
    **{t: dict(lmam_heads=2, lmam_len=16, lmam_scale=0.01, adapter_r=4) for t in TINY},
}
LMAM_PRESETS = {k: {h: v for h, v in p.items() if h.startswith("lmam_")} for k, p in LORADA_LA_PRESETS.items()}
# LMAM on the medium models: Table 16 (RoBERTa-base, GLUE: h_s=3, r=3, 1/s=255, n per task) and
# Table 15's underlined choices (BART-large XSum: h_s=16, r=22, n=512, s=1; mBART-large MT: h_s=16,
# r=64, s=1, n=128 (all of 128/256/512 are underlined; 128 is taken)).
LMAM_PRESETS.update({"roberta": dict(lmam_heads=3, lmam_rank=3, lmam_len=512, lmam_scale=1 / 255),
                     "bart": dict(lmam_heads=16, lmam_rank=22, lmam_len=512, lmam_scale=1.0),
                     "mbart": dict(lmam_heads=16, lmam_rank=64, lmam_len=128, lmam_scale=1.0)})
GLUE_LMAM_LEN = {t: dict(lmam_len=n) for t, n in (("mnli", 512), ("sst2", 512), ("mrpc", 256), ("cola", 512),
                                                  ("qnli", 256), ("qqp", 256), ("rte", 512), ("stsb", 256))}

METHODS.update({
    "lmam":      dict(parts=("lmam",), defaults=LMAM_BASE, presets=LMAM_PRESETS, task_presets=GLUE_LMAM_LEN),
    "lorada_la": dict(parts=("lmam", "lora", "adapter_ffn"), defaults=LORADA_LA, presets=LORADA_LA_PRESETS),
    # Table 17: LMAM r=1, n=128, h_s=32 (40 on 13B) + QuanTA 16-8-8-4 on q_proj, v_proj
    "lorada_q":  dict(parts=("lmam", "quanta"), defaults=dict(LMAM_BASE, lmam_rank=1, quanta_dims="16-8-8-4",
                                                            target_modules="q_proj,v_proj"),
                      presets={m: dict(p, **METHODS["quanta"]["presets"].get(m, {}))
                               for m, p in LMAM_PRESETS.items()}),
    # LoRaDA-A (Section 4.2): LMAM + Adapter-FFN on the medium models, LMAM_PRESETS' LMAM with Table 16's
    # adapter (r=16, s=2, dropout 0.1; RoBERTa) and Table 15's (r=512 XSum, 820 MT, s=4). On LLaMA, the
    # defaults: Table 19's LMAM with He et al.'s GLUE adapter (the paper gives none).
    "lorada_a":  dict(parts=("lmam", "adapter_ffn"),
                      defaults=dict(LMAM_BASE, adapter_r=16, adapter_scale=2.0, adapter_dropout=0.1),
                      presets={**LMAM_PRESETS,
                               "bart": dict(LMAM_PRESETS["bart"], adapter_r=512, adapter_scale=4.0),
                               "mbart": dict(LMAM_PRESETS["mbart"], adapter_r=820, adapter_scale=4.0)},
                      task_presets=GLUE_LMAM_LEN),
    # the plug-in pairs of Tables 6 and 18: the baseline's own preset plus LMAM
    **{f"{b}+lmam": dict(parts=(b, "lmam"), defaults=dict(METHODS[b]["defaults"], **LMAM_BASE),
                         presets={k: dict(METHODS[b].get("presets", {}).get(k, {}), **LMAM_PRESETS.get(k, {}))
                                  for k in {*METHODS[b].get("presets", {}), *LMAM_PRESETS}},
                         task_presets=GLUE_LMAM_LEN) for b in ("lora", "dora", "parallel", "series")},
})


def family(cfg) -> str:
    """llama, roberta, bart or mbart: presets keyed by a family apply to every size of it."""
    if isinstance(cfg, M.BartConfig):
        return "mbart" if cfg.pre_norm else "bart"
    return "roberta" if isinstance(cfg, M.RobertaConfig) else "llama"


def model_names(cfg) -> tuple:
    """The preset keys of a model, most general first: its family, then its preset name."""
    return (family(cfg), M.preset_name(cfg))


def method_hparams(name: str, model_names: tuple, overrides: dict, task: str | None = None) -> dict:
    """defaults ← the model's presets (family, then preset name) ← the task's preset ← overrides,
    checked against the method's hyperparameters."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    spec = METHODS[name]
    allowed = {k for part in spec["parts"] for k in PARTS[part][1]}
    hp = dict(spec["defaults"])
    for key in model_names:
        hp.update(spec.get("presets", {}).get(key, {}))
    hp.update(spec.get("task_presets", {}).get(task, {}))
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in allowed:
            raise ValueError(f"method {name!r} has no hyperparameter {k!r}; it takes: "
                             f"{', '.join(sorted(allowed)) or 'none'}")
        if isinstance(v, (list, tuple)):
            v = ("-" if k == "quanta_dims" else ",").join(map(str, v))
        hp[k] = HPARAMS[k](v)
    for k in ("lora_r", "adapter_r", "prefix_len"):
        if k in hp and hp[k] <= 0:
            raise ValueError(f"{k} must be positive, got {hp[k]}")
    return hp


def apply_method(model, name: str, task: str | None = None, **overrides):
    """Adapt `model` in place with method `name` and freeze everything but its parameters. A
    RoBERTa classification head always trains (as with LoRA and peft's modules_to_save; He et al.'s
    released code leaves it frozen, see ../shared/research/adapters.md). `task` picks task presets."""
    if getattr(model, "peft_method", None) is not None:
        raise ValueError(f"the model already has method {model.peft_method['name']!r} applied")
    hp = method_hparams(name, model_names(model.cfg), overrides, task)
    base_keys = set(model.state_dict().keys())
    trainable_names = []
    for part in METHODS[name]["parts"]:
        attach, _, names = PARTS[part]
        attach(model, hp)
        trainable_names.append(names)
    model.train(model.training)        # new modules (their dropout) follow the model's train/eval mode
    for n, p in model.named_parameters():
        p.requires_grad_(any(names is None or any(s in n for s in names) for names in trainable_names)
                         or n.startswith("head."))
    if not any(p.requires_grad for p in model.parameters()):
        warnings.warn(f"method {name!r} leaves no parameter of this model trainable (e.g. BitFit on LLaMA, "
                      f"which has no biases)")
    model.peft_method = {"name": name, "hparams": hp}
    model.base_keys = base_keys
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all): each parameter counted once (tied weights once), as peft does."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def parameter_report(model) -> str:
    t, a = count_parameters(model)
    return f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"


# ----------------------------------------------------------------------------- adapter files

ADAPTER_EXT = ".safetensors"


def base_fingerprint(model) -> dict:
    """What identifies the base model: its shapes and a checksum of a few embedding rows."""
    c = model.cfg
    fp = {k: getattr(c, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")
          if hasattr(c, k)}
    if not isinstance(model, M.Llama):
        fp["model"] = type(model).__name__
    w = (model.shared if isinstance(model, M.Bart) else model.embed_tokens).weight
    fp["checksum"] = None if w.is_meta else float(w.detach()[:16].double().abs().sum())
    return fp


def adapter_state(model) -> dict:
    """The tensors an adapter file holds: those the method added (parameters and buffers, such as
    QuanTA's frozen copy) and the base parameters it trains (BitFit, full fine-tuning)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in model.base_keys or k in trainable}


def save_adapter(model, path: str):
    if getattr(model, "peft_method", None) is None:
        raise ValueError("save_adapter: no method applied to this model (call apply_method first)")
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError("save_adapter: the adapter is merged into the weights; unmerge it first")
    meta = {"method": model.peft_method["name"], "hparams": json.dumps(model.peft_method["hparams"]),
            "base": json.dumps(base_fingerprint(model))}
    M.write_safetensors({k: v.detach() for k, v in adapter_state(model).items()}, path, metadata=meta)


def load_adapter(model, path: str):
    """Load an adapter file onto `model`: applies the file's method (with its hyperparameters) if
    none is applied yet, then its tensors. A different base model or method is an error."""
    import struct
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__", {})
    if "method" not in meta:
        raise ValueError(f"{path}: not an adapter file of this project (no method in its metadata)")
    name, hp = meta["method"], json.loads(meta["hparams"])
    base, ours = json.loads(meta["base"]), base_fingerprint(model)
    for k in base:
        if k == "checksum":
            if None not in (base[k], ours[k]) and not math.isclose(base[k], ours[k], rel_tol=1e-2):
                raise ValueError(f"{path}: was trained on a different base model (embedding checksum "
                                 f"{base[k]:.6g}, this model's is {ours[k]:.6g})")
        elif base[k] != ours.get(k):
            raise ValueError(f"{path}: was trained on a base model with {k}={base[k]}, this model has {ours.get(k)}")
    current = getattr(model, "peft_method", None)
    if current is None:
        apply_method(model, name, **hp)
    elif current["name"] != name or current["hparams"] != hp:
        raise ValueError(f"{path}: holds method {name!r} {hp}, but the model has {current['name']!r} "
                         f"{current['hparams']} applied")
    tensors = M.read_safetensors(path)
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


# ----------------------------------------------------------------------------- training presets

# LLM-Adapters' finetune.py commands (bs 16, micro-batch 4, lr 3e-4, 3 epochs, cutoff 256, 120
# validation examples, eval/save every 80 steps, 100 warmup steps, no weight decay, clip 1.0,
# seed 42) unless a method's reference says otherwise. The keys after seed are used by the
# RoBERTa/BART pipelines (0 = off): max_steps (overrides num_epochs), warmup_ratio (of the steps,
# instead of warmup_steps), label_smoothing, max_target_len (cutoff_len is the source's),
# max_tokens (token-budget micro-batches, MT) with update_freq of them per step, Adam's beta2, eps.
TRAIN_DEFAULTS = dict(batch_size=16, micro_batch_size=4, num_epochs=3, learning_rate=3e-4, cutoff_len=256,
                      val_set_size=120, eval_step=80, save_step=80, warmup_steps=100, weight_decay=0.0,
                      max_grad_norm=1.0, seed=42, max_steps=0, warmup_ratio=0.0, label_smoothing=0.0,
                      max_target_len=0, max_tokens=0, update_freq=1, adam_beta2=0.999, adam_eps=1e-8)
# The medium-model pipelines: He et al.'s scripts (adapters.md section 7). eval_step / save_step 0:
# once per epoch. val_set_size: their max_eval_samples (the first 1600 dev/validation examples).
PIPELINE_DEFAULTS = {
    "llm": {},
    "glue": dict(batch_size=32, micro_batch_size=32, num_epochs=10, learning_rate=1e-4, cutoff_len=512,
                 val_set_size=1600, eval_step=0, save_step=0, warmup_steps=0, warmup_ratio=0.06, weight_decay=0.1,
                 adam_beta2=0.98, adam_eps=1e-6),
    "xsum": dict(batch_size=64, micro_batch_size=16, num_epochs=30, max_steps=100_000, learning_rate=5e-5,
                 cutoff_len=512, max_target_len=128, val_set_size=1600, eval_step=3000, save_step=3000,
                 warmup_steps=0, weight_decay=0.01, max_grad_norm=0.1, label_smoothing=0.1),
    "mt": dict(batch_size=1, micro_batch_size=1, num_epochs=100, max_steps=50_000, learning_rate=5e-5,
               cutoff_len=150, max_target_len=150, max_tokens=4096, update_freq=4, val_set_size=1600,
               eval_step=5000, save_step=5000, warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
               label_smoothing=0.1, adam_beta2=0.98, adam_eps=1e-6),
}
TRAIN_PRESETS = {
    "prefix": dict(batch_size=8, num_epochs=5, learning_rate=3e-2, eval_step=10, save_step=10,   # math command
                   by_pipeline={"mt": dict(label_smoothing=0.0, weight_decay=0.0)}),  # He et al.'s run_en_ro note
    "dora": dict(learning_rate=2e-4, by_model={"llama3-8b": dict(learning_rate=1e-4)}),          # DoRA scripts
    "quanta": dict(batch_size=4, micro_batch_size=1, num_epochs=5, learning_rate=5e-5, warmup_steps=0),  # ft_com.sh
    "lorada_q": dict(batch_size=8, learning_rate=1e-4, warmup_steps=0),                           # Table 17
    "lorada_la": dict(batch_size=4, learning_rate=1e-4,                                           # Table 19
                      by_model={"llama3-8b": dict(learning_rate=2e-4), "llama-13b": dict(batch_size=3),
                                "llama2-13b": dict(batch_size=3), "llama2-70b": dict(batch_size=2)}),
    # Table 16 (GLUE, 20 epochs, per-task learning rates) and Table 15 (XSum, MT)
    "lorada_a": dict(by_pipeline={"glue": dict(num_epochs=20), "xsum": dict(learning_rate=5e-5),
                                  "mt": dict(learning_rate=5e-5)},
                     by_task={"mnli": dict(learning_rate=3e-4), "sst2": dict(learning_rate=3e-4),
                              "mrpc": dict(learning_rate=3e-4), "cola": dict(learning_rate=5e-4),
                              "qnli": dict(learning_rate=1e-4), "qqp": dict(learning_rate=1e-4),
                              "rte": dict(learning_rate=7e-4), "stsb": dict(learning_rate=5e-4)}),
}


def train_hparams(method: str, model_names: tuple = (), pipeline: str = "llm", task: str | None = None) -> dict:
    """Training hyperparameters: defaults ← pipeline ← method (its LLaMA settings apply to the
    LLaMA pipeline only, unless by_pipeline says otherwise) ← method and model ← method and task."""
    preset = dict(TRAIN_PRESETS.get(method, {}))
    by_model, by_pipeline, by_task = (preset.pop(k, {}) for k in ("by_model", "by_pipeline", "by_task"))
    hp = dict(TRAIN_DEFAULTS, **PIPELINE_DEFAULTS[pipeline])
    hp.update(preset if pipeline == "llm" else by_pipeline.get(pipeline, {}))
    for name in model_names:
        hp.update(by_model.get(name, {}))
    hp.update(by_task.get(task, {}))
    hp["micro_batch_size"] = min(hp["micro_batch_size"], hp["batch_size"])
    return hp
