"""The Hugging Face ecosystem: adapters out in peft's format, merged checkpoints out, peft adapters in.

    python export.py --model CKPT --adapter runs/lora/adapter.safetensors --format peft --out DIR
    python export.py --model CKPT --adapter runs/dora/adapter.safetensors --format hf --out DIR [--max_shard_size 5GB]

  - peft (LoRA, DoRA): DIR/adapter_config.json + DIR/adapter_model.safetensors, which
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(CKPT), DIR)` loads with the same
    logits as this project's model (vLLM and lm-eval's `peft=` read the same two files; vLLM has
    no DoRA).
  - Either is written whole into a new folder beside DIR (DIR.<pid>.tmp) and renamed to DIR when
    complete, so a failure (a full disk, Ctrl-C) leaves nothing; an existing DIR that holds files
    is refused unless --overwrite, and the base checkpoint's own folder always.
  - hf (LoRA, DoRA, QuanTA; full fine-tuning and BitFit, whose result is the weights themselves):
    the update merged into the weights, written as a Hugging Face checkpoint (config.json,
    model.safetensors or shards + model.safetensors.index.json, the tokenizer files) that
    from_pretrained loads with the same logits. Written by checkpoint.write_safetensors.
  - load_peft_adapter(model, DIR): a LoRA / DoRA adapter in peft's format onto this project's model
    (eval.py --adapter DIR), from peft (lora_magnitude_vector) or NVlabs/DoRA's released
    checkpoints (their peft fork: peft_type "DORA", adapter_model.bin, weight_m_wdecomp.weight).

Which method can go where is read from what it attached to the model (methods.apply_method
records it): LoRA / DoRA layers alone go to peft's format; other modules keep this project's
adapter file, and exporting them to peft is an error that says why (NO_PEFT_TYPE), as is merging
a method that adds modules (LMAM, the adapters, prefixes) instead of changing weights.

Key names. LLaMA: ours with "model." in front (lm_head.weight as it is). RoBERTa: the inverse of
checkpoint.ROBERTA_KEYS ("roberta." + BERT's module names, the GLUE head as classifier.*). BART /
mBART: "model." + ours, fc1 / fc2 without "ffn.", the tied embedding as model.shared.weight. peft
puts "base_model.model." before the module paths of the model it wraps.
"""
import argparse
import json
import math
import os
import re
import shutil
import sys

import torch
import torch.nn as nn

import hub
import methods
import model as M
from adapters import AdapterFFN, BottleneckLinear, HoulsbyAdapter, PrefixEncoder
from adaptive import AdaLoRALinear, SoRALinear
from checkpoint import (BART_KEYS, ROBERTA_KEYS, CheckpointError, load, read_hf_tensors, read_safetensors, read_tensors,
                        read_torch, write_safetensors)
from lmam import LMAM
from lora import AdditiveUpdate, DoRALinear, LoRALinear
from quanta import QuanTALinear
from runs import atomic_write, pid_alive, read_json_object

# -----------------------------------------------------------------------------
# Key names: ours <-> Hugging Face's

# checkpoint.py's maps, read in both directions; LLaMA's keys are ours with "model." in front (lm_head as it is).
HF_NAMES = {M.Roberta: ROBERTA_KEYS, M.Bart: BART_KEYS}


def hf_key(model, key: str) -> str:
    """Our state-dict key -> the key in a Hugging Face checkpoint of the same model."""
    if isinstance(model, M.Llama):
        return key if key == "lm_head.weight" else "model." + key
    if type(model) not in HF_NAMES:
        raise ValueError(f"export knows Hugging Face names for LLaMA, RoBERTa and BART / mBART, not {type(model).__name__}")
    out = HF_NAMES[type(model)].hf(key)
    if out is None:
        raise ValueError(f"{key!r} has no Hugging Face name")
    return out


def our_key(model, key: str) -> str | None:
    """A Hugging Face checkpoint key -> ours; None if this model has none."""
    if isinstance(model, M.Llama):
        return key.removeprefix("model.")
    return HF_NAMES[type(model)].ours(key) if type(model) in HF_NAMES else None


def hf_module(model, name: str) -> str:
    return hf_key(model, name + ".weight").removesuffix(".weight")


def our_module(model, hf_name: str) -> str | None:
    ours = our_key(model, hf_name + ".weight")
    return ours.removesuffix(".weight") if ours else None


def describe(model) -> str:
    return getattr(model.cfg, "name", None) or f"a {type(model).__name__} with dim={model.cfg.dim}"


# -----------------------------------------------------------------------------
# peft's format: export

PEFT_TASK = {M.Llama: "CAUSAL_LM", M.Bart: "SEQ_2_SEQ_LM"}     # RoBERTa: SEQ_CLS with a GLUE head
PEFT_TYPES = (LoRALinear, DoRALinear)          # the modules peft's LORA type holds (use_dora for DoRA)
NO_PEFT_TYPE = {                               # the modules it does not, and why
    LMAM: "LMAM adds a learned low-rank map to the attention probabilities, and peft has no tuner that changes "
          "the attention map",
    QuanTALinear: "peft has no QuanTA type (QuanTA's reference is its own code); its update is a weight delta, so "
                  "--format hf can merge it",
    BottleneckLinear: "LLM-Adapters' bottleneck adapters exist only in LLM-Adapters' own fork of peft, not in peft",
    HoulsbyAdapter: "He et al.'s Houlsby adapter has no peft type",
    AdapterFFN: "He et al.'s scaled parallel adapter (Adapter-FFN) has no peft type",
    PrefixEncoder: "peft's prefix tuning numbers the tokens from the prefix length and this project from 0 (He et "
                   "al.), so the same tensors would give different outputs there",
    AdaLoRALinear: "export.py writes peft's LORA type, not its ADALORA one; the update is a weight delta, so "
                   "--format hf can merge it",
    SoRALinear: "peft has no SoRA type (a gate between A and B); the update is a weight delta, so --format hf can "
                "merge it",
}


def why_not_peft(model) -> str | None:
    """Why the model's method cannot be written in peft's format, None if it can: what it attached
    (model.attached, recorded by methods.apply_method) must be LoRA / DoRA layers alone, and it
    must train none of the base model's own weights."""
    reasons = {cls.__name__: NO_PEFT_TYPE.get(cls, f"export.py knows no peft type for {cls.__name__}")
               for cls in model.attached.values() if cls not in PEFT_TYPES}
    base = methods.trained_base(model)
    if base:
        reasons["base weights"] = (f"it trains {len(base)} of the base model's own tensors ({', '.join(base[:2])}, "
                                   f"...), which a peft adapter does not hold; --format hf writes them as a checkpoint")
    elif not model.attached:
        reasons["nothing attached"] = "it attaches no LoRA layer"
    if not reasons:
        return None
    return (f"method {model.peft_method['name']!r} has no peft format "
            f"({'; '.join(f'{k}: {v}' for k, v in reasons.items())}); peft export is for LoRA and DoRA layers alone. "
            f"Its adapter file stays in this project's format (train.py writes it; eval.py --adapter reads it)")


def linear_paths(model) -> list[str]:
    """Hugging Face paths of every linear layer (wrapped or not): what peft's target_modules match."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, AdditiveUpdate)):
            try:
                out.append(hf_module(model, name))
            except ValueError:
                pass
    return out


def target_suffixes(model, paths: list[str]) -> list[str]:
    """peft's target_modules for exactly `paths`: for each, the shortest suffix of its module path
    (peft matches `name == t or name.endswith("." + t)`) that matches no other linear layer:
    q_proj for LLaMA, query for RoBERTa, 0.output.dense for RoBERTa's fc2 of layer 0."""
    universe, chosen, wanted = linear_paths(model), set(), set(paths)
    for p in paths:
        parts = p.split(".")
        for k in range(1, len(parts) + 1):
            s = ".".join(parts[-k:])
            if {u for u in universe if u == s or u.endswith("." + s)} <= wanted:
                chosen.add(s)
                break
    return sorted(chosen)


def lora_settings(model, layers: list) -> dict:
    """adapter_config.json's r, lora_alpha and lora_dropout: the method's where it names them
    (lora_alpha exactly as given), else read from its LoRA layers, which must share them."""
    hp = model.peft_method["hparams"]
    found = {(m.r, m.scaling, m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0) for m in layers}
    if len(found) != 1:
        raise ValueError(f"export to peft: the LoRA layers differ in rank, scale or dropout {sorted(found)}; peft's "
                         f"adapter_config.json has one of each")
    r, scaling, dropout = found.pop()
    return {"r": hp.get("lora_r", r), "lora_alpha": hp.get("lora_alpha", scaling * r),
            "lora_dropout": hp.get("lora_dropout", dropout)}


def export_peft(model, out_dir: str, base_model_name_or_path: str | None = None) -> list[str]:
    """Write the model's LoRA / DoRA adapter as peft's adapter_config.json + adapter_model.safetensors
    into out_dir; returns their paths."""
    name = (getattr(model, "peft_method", None) or {}).get("name")
    if name is None:
        raise ValueError("export to peft: no adapter on this model (give --adapter)")
    if why_not_peft(model):
        raise ValueError(why_not_peft(model))
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise ValueError("export to peft: the adapter is merged into the weights; export it unmerged")
    named = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    tensors, paths, layers = {}, [hf_module(model, n) for n in named], list(named.values())
    for p, m in zip(paths, layers):
        tensors[f"base_model.model.{p}.lora_A.weight"] = m.lora_A.detach()
        tensors[f"base_model.model.{p}.lora_B.weight"] = m.lora_B.detach()
        if isinstance(m, DoRALinear):
            tensors[f"base_model.model.{p}.lora_magnitude_vector"] = m.magnitude.detach()
    modules_to_save, task = None, PEFT_TASK.get(type(model))
    if isinstance(model, M.Roberta):
        task = "SEQ_CLS" if model.head is not None else "FEATURE_EXTRACTION"
        if model.head is not None:          # the GLUE head trains whole: peft's modules_to_save
            modules_to_save = ["classifier"]
            for k, v in model.head.state_dict().items():
                tensors[f"base_model.model.{hf_key(model, 'head.' + k)}"] = v.detach()
    config = {
        "peft_type": "LORA", "task_type": task, "base_model_name_or_path": base_model_name_or_path,
        "revision": None, **lora_settings(model, layers), "target_modules": target_suffixes(model, paths),
        "use_dora": any(isinstance(m, DoRALinear) for m in layers), "use_rslora": False,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": modules_to_save, "init_lora_weights": True,
        "inference_mode": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors({k: v.float().contiguous() for k, v in tensors.items()},
                      os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    atomic_write(os.path.join(out_dir, "adapter_config.json"),
                 lambda f: f.write(json.dumps(config, indent=2).encode()))
    return [os.path.join(out_dir, "adapter_config.json"), os.path.join(out_dir, "adapter_model.safetensors")]


# -----------------------------------------------------------------------------
# peft's format: import (peft, and NVlabs/DoRA's fork)

# adapter_config.json entries this project's LoRA cannot represent, with the value it has
UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "lora_bias": False, "layers_to_transform": None,
               "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "trainable_token_indices": None,
               "target_parameters": None, "use_qalora": False, "Wdecompose_target_modules": None,
               "enable_lora": None}
PEFT_KEY = [(re.compile(r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight"), None),
            (re.compile(r"(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?"), "magnitude"),   # peft
            (re.compile(r"(.+)\.weight_m_wdecomp\.weight"), "magnitude")]                            # NVlabs/DoRA
PEFT_HEAD = re.compile(r"classifier\.(?:modules_to_save\.default\.)?(dense|out_proj)\.(weight|bias)")


def read_peft_config(path: str) -> dict | None:
    """A peft directory's adapter_config.json (None without one); not a JSON object: an error
    naming the file."""
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        return None
    return read_json_object(cfg_file)


def read_peft_dir(path: str) -> tuple[dict, dict]:
    """(adapter_config.json, {key: tensor}) of a peft adapter directory."""
    cfg = read_peft_config(path)
    if cfg is None:
        raise ValueError(f"{path}: not a peft adapter directory (no adapter_config.json)")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return cfg, read_tensors(os.path.join(path, name))
    raise ValueError(f"{path}: has adapter_config.json but no adapter_model.safetensors or adapter_model.bin")


def peft_num_labels(path: str) -> int | None:
    """The GLUE head's outputs in a peft adapter (modules_to_save classifier), or None."""
    _, tensors = read_peft_dir(path)
    for k, t in tensors.items():
        if PEFT_HEAD.fullmatch(k.removeprefix("base_model.model.")) and k.endswith("out_proj.weight"):
            return t.shape[0]
    return None


def load_peft_adapter(model, path: str):
    """Apply a peft LoRA / DoRA adapter (a directory) to `model`, which has no method yet: the
    method, rank, α and target layers come from adapter_config.json and the tensors' names.
    use_rslora's scaling α/√r is kept by setting α' = α·√r (ours scales by α/r)."""
    cfg, tensors = read_peft_dir(path)
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "DORA"):
        raise ValueError(f"{path}: peft_type {kind!r}: only LoRA and DoRA adapters can be imported "
                         f"(peft's LORA, with use_dora for DoRA, or NVlabs/DoRA's DORA)")
    for key, ok in UNSUPPORTED.items():
        value = cfg.get(key)
        if value is not None and value != ok and value not in ({}, [], False):
            raise ValueError(f"{path}: adapter_config.json has {key}={value!r}, which this project's LoRA / DoRA "
                             f"cannot represent (it supports {key}={ok!r})")
    if getattr(model, "peft_method", None) is not None:
        raise ValueError(f"{path}: the model already has method {model.peft_method['name']!r} applied")
    base = cfg.get("base_model_name_or_path") or "an unnamed base model"
    dora = kind == "DORA" or bool(cfg.get("use_dora"))
    try:
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except KeyError as e:
        raise ValueError(f"{os.path.join(path, 'adapter_config.json')}: has no {e.args[0]!r} (a LoRA adapter's "
                         f"config has r and lora_alpha)") from None
    except (TypeError, ValueError):
        raise ValueError(f"{os.path.join(path, 'adapter_config.json')}: r={cfg['r']!r}, lora_alpha="
                         f"{cfg['lora_alpha']!r}: expected numbers") from None
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(r)
    layers, head, modules = {}, {}, dict(model.named_modules())
    for k, t in tensors.items():
        key = k.removeprefix("base_model.model.")
        if h := PEFT_HEAD.fullmatch(key):
            head[f"head.{h.group(1)}.{h.group(2)}"] = t
            continue
        for pattern, part in PEFT_KEY:
            if m := pattern.fullmatch(key):
                ours = our_module(model, m.group(1))
                if ours is None or ours not in modules:
                    raise ValueError(f"{path}: {k}: this model ({describe(model)}) has no layer {m.group(1)!r}; "
                                     f"the adapter was made for another architecture ({base})")
                layers.setdefault(ours, {})[part or m.group(2)] = t
                break
        else:
            raise ValueError(f"{path}: unexpected tensor {k!r} (LoRA / DoRA on linear layers is imported: "
                             f"lora_A, lora_B, lora_magnitude_vector or weight_m_wdecomp)")
    for name, parts in layers.items():
        need = {"lora_A", "lora_B"} | ({"magnitude"} if dora else set())
        if set(parts) != need:
            raise ValueError(f"{path}: layer {name!r} has {sorted(parts)}, a {'DoRA' if dora else 'LoRA'} "
                             f"adapter has {sorted(need)}")
    if not layers:
        raise ValueError(f"{path}: no LoRA tensors")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    methods.apply_method(model, "dora" if dora else "lora", lora_r=r, lora_alpha=alpha,
                         lora_dropout=float(cfg.get("lora_dropout") or 0.0), target_modules=",".join(leaves))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if set(wrapped) != set(layers):
        missing = sorted(set(wrapped) - set(layers))
        raise ValueError(f"{path}: adapts {len(layers)} of this model's {len(wrapped)} {', '.join(leaves)} layers "
                         f"(not {missing[:3]}...); only adapters on every such layer are imported")
    ours_name = describe(model)
    with torch.no_grad():
        for name, parts in layers.items():
            m = wrapped[name]
            for part, t in parts.items():
                target = {"lora_A": m.lora_A, "lora_B": m.lora_B, "magnitude": getattr(m, "magnitude", None)}[part]
                t = t.reshape(-1) if part == "magnitude" else t               # NVlabs: (out, 1)
                if tuple(t.shape) != tuple(target.shape):
                    raise ValueError(f"{path}: {hf_module(model, name)} {part} has shape {tuple(t.shape)}, this "
                                     f"model ({ours_name}) expects {tuple(target.shape)}: the adapter was trained "
                                     f"on another base model ({base})")
                target.copy_(t)
        if head:
            if getattr(model, "head", None) is None:
                raise ValueError(f"{path}: holds a classification head ({head['head.out_proj.weight'].shape[0]} "
                                 f"labels) and this model has none: load it with num_labels (eval.py --task)")
            current = model.head.state_dict()
            for k, t in head.items():
                if tuple(t.shape) != tuple(current[k.removeprefix("head.")].shape):
                    raise ValueError(f"{path}: classifier {k} has shape {tuple(t.shape)}, this model's head has "
                                     f"{tuple(current[k.removeprefix('head.')].shape)}")
                current[k.removeprefix("head.")].copy_(t)
    print(f"adapter: {'DoRA' if dora else 'LoRA'} r={r} on {', '.join(leaves)} from {path} "
          f"(peft format{', NVlabs/DoRA' if kind == 'DORA' else ''}; trained on {base})", flush=True)
    return model


def load_any_adapter(model, path: str):
    """A directory: peft's format (load_peft_adapter; LLM-Adapters' bottleneck adapters,
    load_bottleneck_adapter); a file: this project's (methods.load_adapter)."""
    if os.path.isdir(path):
        if peft_type(path) in LLM_ADAPTERS_TYPES:
            return load_bottleneck_adapter(model, path)
        return load_peft_adapter(model, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such adapter file or directory")
    return methods.load_adapter(model, path)


# -----------------------------------------------------------------------------
# LLM-Adapters' released adapters (their peft fork, AGI-Edgerunners/LLM-Adapters peft/src/peft).
# LoRA: peft 0.3's format (adapter_model.bin; keys base_model.model.model.layers.N.self_attn.q_proj.
# lora_A.weight; adapter_config.json with r, lora_alpha, target_modules, and merge_weights /
# enable_lora, which are null or false in their runs): load_peft_adapter reads it as it is. Their
# bottleneck adapters (peft_type BOTTLENECK, tuners/bottleneck.py) are this project's series and
# parallel methods (adapters.BottleneckLinear), imported here. Their prefix tuning is not: peft
# numbers the tokens from the prefix length, this project from 0, so the same prefixes would give
# another model (NO_PEFT_TYPE[PrefixEncoder]).

LLM_ADAPTERS_TYPES = ("BOTTLENECK",)
BOTTLENECK_KEY = re.compile(r"(.+)\.(adapter_down|adapter_up)\.weight|(.+)\.adapter_scaling")


def peft_type(path: str) -> str | None:
    """adapter_config.json's peft_type of a directory (None without one)."""
    return (read_peft_config(path) or {}).get("peft_type")


def load_bottleneck_adapter(model, path: str):
    """An LLM-Adapters bottleneck adapter directory (peft_type BOTTLENECK) onto a LLaMA model with
    no method yet. Their Linear: y = W x + s·up(f(down(dropout(·)))) with f = non_linearity, on
    the target's input (mh_adapter: gate_proj, up_proj; y = W(x + ·)), its output (output_adapter:
    down_proj) or beside it (use_parallel_adapter): `series` / `parallel` here, with
    adapter_r = bottleneck_size, adapter_scale = scaling. A learned scaling ("learned":
    adapter_scaling, one number per layer) is folded into up, which gives the same function.
    use_adapterp is read by nothing in their code and is ignored."""
    cfg, tensors = read_peft_dir(path)
    if not isinstance(model, M.Llama):
        raise ValueError(f"{path}: LLM-Adapters' bottleneck adapters are for LLaMA, not {describe(model)}")
    if getattr(model, "peft_method", None) is not None:
        raise ValueError(f"{path}: the model already has method {model.peft_method['name']!r} applied")
    if cfg.get("non_linearity", "tanh") != "tanh":
        raise ValueError(f"{path}: non_linearity {cfg['non_linearity']!r}: this project's bottleneck adapter is "
                         f"tanh (LLM-Adapters' default)")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={cfg['bias']!r}: only bias='none' (LLM-Adapters' runs) is imported")
    base = cfg.get("base_model_name_or_path") or "an unnamed base model"
    layers = {}
    for k, t in tensors.items():
        m = BOTTLENECK_KEY.fullmatch(k.removeprefix("base_model.model."))
        hf_name = m and (m.group(1) or m.group(3))
        ours = our_module(model, hf_name) if hf_name else None
        if ours is None:
            raise ValueError(f"{path}: unexpected tensor {k!r} (a bottleneck adapter has adapter_down, adapter_up "
                             f"and, with learned scaling, adapter_scaling on LLaMA's linear layers)")
        layers.setdefault(ours, {})[m.group(2) or "adapter_scaling"] = t
    if not layers:
        raise ValueError(f"{path}: no adapter tensors")
    learned = cfg.get("scaling") == "learned"
    need = {"adapter_down", "adapter_up"} | ({"adapter_scaling"} if learned else set())
    for name, parts in layers.items():
        if set(parts) != need:
            raise ValueError(f"{path}: layer {name!r} has {sorted(parts)}, expected {sorted(need)}")
    r = int(cfg.get("bottleneck_size") or next(iter(layers.values()))["adapter_down"].shape[0])
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    method = "parallel" if cfg.get("use_parallel_adapter") else "series"
    methods.apply_method(model, method, adapter_r=r, adapter_scale=1.0 if learned else float(cfg.get("scaling", 1.0)),
                         adapter_dropout=float(cfg.get("adapter_dropout") or 0.0), target_modules=",".join(leaves))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, BottleneckLinear)}
    if set(wrapped) != set(layers):
        raise ValueError(f"{path}: adapts {len(layers)} of this model's {len(wrapped)} {', '.join(leaves)} layers; "
                         f"only adapters on every such layer are imported")
    with torch.no_grad():
        for name, parts in layers.items():
            mod = wrapped[name]
            up = parts["adapter_up"].float() * (parts["adapter_scaling"].float() if learned else 1.0)
            for target, t in ((mod.adapter_down.weight, parts["adapter_down"]), (mod.adapter_up.weight, up)):
                if tuple(t.shape) != tuple(target.shape):
                    raise ValueError(f"{path}: {hf_module(model, name)} has an adapter of shape {tuple(t.shape)}, "
                                     f"this model ({describe(model)}) expects {tuple(target.shape)}: the adapter "
                                     f"was trained on another base model ({base})")
                target.copy_(t)
    print(f"adapter: LLM-Adapters' {method} bottleneck r={r} on {', '.join(leaves)} from {path} "
          f"(their peft fork; trained on {base})", flush=True)
    return model


# -----------------------------------------------------------------------------
# A merged Hugging Face checkpoint

NOT_MERGEABLE = {
    LMAM: "LMAM is an attention term, not a weight delta: it adds s·(Wa+PE)(Wb+PE) to the softmax of every "
          "attention layer, a change of the attention map that no weight matrix of the model can express, so "
          "it cannot be merged into a checkpoint. Keep the base checkpoint and the adapter file (eval.py "
          "--adapter), or export the method's mergeable part by training it without LMAM",
    BottleneckLinear: "the bottleneck adapters add a non-linear module (tanh) beside or after a layer, not a weight delta",
    HoulsbyAdapter: "the Houlsby adapter adds a non-linear module (ReLU) after a sub-block, not a weight delta",
    AdapterFFN: "the FFN adapter adds a non-linear module (ReLU) beside the FFN, not a weight delta",
    PrefixEncoder: "prefix tuning adds key/value vectors to every attention, not a weight delta",
}


def parse_size(text) -> int:
    """'5GB', '500MB', '2GiB', 1000 -> bytes (decimal units as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"--max_shard_size {text!r}: expected a size such as 5GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
             "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
    return int(float(m.group(1)) * scale)


def merged_state(model, dtype=None) -> dict:
    """The model's weights under Hugging Face's names, with every method's update merged in (the
    model is left merged). A method that attached anything but weight deltas (lora.AdditiveUpdate:
    LoRA, DoRA, QuanTA, AdaLoRA, SoRA) is an error saying why."""
    for cls in getattr(model, "attached", {}).values():
        if not issubclass(cls, AdditiveUpdate):
            why = next((why for c, why in NOT_MERGEABLE.items() if issubclass(cls, c)),
                       f"its {cls.__name__} is not a weight delta (lora.AdditiveUpdate) that export.py can merge")
            raise ValueError(f"cannot merge method {model.peft_method['name']!r}: {why}")
    for m in model.modules():
        if isinstance(m, AdditiveUpdate):
            m.merge()                                     # LoRA, DoRA, QuanTA: W + ΔW in fp32, rounded once
    base_keys = getattr(model, "base_keys", None)
    state = {k: v for k, v in model.state_dict().items() if base_keys is None or k in base_keys}
    if isinstance(model, M.Llama) and model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    dtype = dtype or state[next(iter(state))].dtype
    return {hf_key(model, k): v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in state.items()}


def write_sharded(tensors: dict, out_dir: str, max_shard_size: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when
    the tensors are larger than max_shard_size (a tensor larger than that gets a shard of its own)."""
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[k], size = t, size + n
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(part, os.path.join(out_dir, name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write(os.path.join(out_dir, "model.safetensors.index.json"),
                 lambda f: f.write(json.dumps(index, indent=2).encode()))
    return names + ["model.safetensors.index.json"]


DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(model, src: str, dtype) -> dict:
    """config.json for the merged checkpoint: the source's (a Hugging Face checkpoint), with the
    dtype and, for RoBERTa, the classification head's labels; for a Meta or llama2.c LLaMA one
    written from the model's config."""
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    file = os.path.join(src_dir, "config.json")
    if os.path.exists(file):
        with open(file) as f:
            config = json.load(f)
    elif isinstance(model, M.Llama):
        c = model.cfg
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
                  "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
                  "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps,
                  "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "max_position_embeddings": c.max_seq_len,
                  "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
                  "mlp_bias": False}
        try:                                   # the special ids, from the checkpoint's tokenizer
            from tokenizer import load_tokenizer
            tok = load_tokenizer(hub.tokenizer_source(src))
            config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
        except (ValueError, OSError, ImportError):
            pass
    else:
        raise ValueError(f"{src}: no config.json to write a Hugging Face checkpoint from")
    key = "dtype" if "dtype" in config else "torch_dtype"
    config[key] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if isinstance(model, M.Roberta):
        if model.head is not None:
            config["architectures"] = ["RobertaForSequenceClassification"]
            n = model.cfg.num_labels
            if len(config.get("id2label") or {}) != n:
                config["id2label"] = {str(i): f"LABEL_{i}" for i in range(n)}
                config["label2id"] = {f"LABEL_{i}": i for i in range(n)}
        else:
            config["architectures"] = ["RobertaModel"]
    return config


def copy_tokenizer(src: str, out_dir: str) -> list[str]:
    """The tokenizer and generation files next to the source checkpoint (hub.COMMON_FILES)."""
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    copied = []
    for name in hub.COMMON_FILES:
        if name != "config.json" and os.path.isfile(os.path.join(src_dir, name)):
            os.makedirs(os.path.dirname(os.path.join(out_dir, name)), exist_ok=True)
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
            copied.append(name)
    return copied


def export_merged(model, src: str, out_dir: str, max_shard_size="5GB", dtype=None) -> list[str]:
    """Merge the model's method into its weights and write a Hugging Face checkpoint to out_dir
    (config.json, weights, tokenizer files copied from `src`, the base checkpoint's path)."""
    if os.path.isdir(out_dir) and any(re.fullmatch(r"(model|pytorch_model).*\.(safetensors|bin|json)", f)
                                      for f in os.listdir(out_dir)):
        raise ValueError(f"{out_dir}: already holds a checkpoint; give an empty or new --out")
    tensors = merged_state(model, dtype)
    dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    os.makedirs(out_dir, exist_ok=True)
    written = write_sharded(tensors, out_dir, parse_size(max_shard_size))
    config = hf_config(model, src, dtype)
    atomic_write(os.path.join(out_dir, "config.json"), lambda f: f.write(json.dumps(config, indent=2).encode()))
    return written + ["config.json"] + copy_tokenizer(src, out_dir)


# -----------------------------------------------------------------------------
# The output folder: written whole or not at all, never over what export.py did not write

def check_out(out: str, model_path: str, overwrite: bool = False):
    """--out, before any work: a file is refused; so is the base checkpoint's own folder (or one
    holding it), even with --overwrite; an existing folder that holds anything is refused unless
    --overwrite."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file, not a folder")
    src = os.path.realpath(model_path if os.path.isdir(model_path) else os.path.dirname(model_path))
    real = os.path.realpath(out)
    if src == real or src.startswith(real + os.sep):
        raise ValueError(f"--out {out}: already holds a checkpoint: the base checkpoint --model reads "
                         f"({model_path}); give a new --out")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not overwrite:
        listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"--out {out} already exists and holds {listed}: export.py writes a new folder; give a new "
                         f"--out, or --overwrite to replace that folder")


def write_folder(out: str, fill) -> list[str]:
    """Write the folder `out` at once: fill(tmp) writes into OUT.<pid>.tmp beside it, which is
    renamed to OUT when complete; an existing OUT (empty, or allowed by --overwrite) is replaced
    only then. On any failure (a full disk, Ctrl-C) the temporary folder is removed and OUT is as it
    was. What a killed export left beside OUT is cleaned up first (remove_stale_folders)."""
    out = os.path.abspath(out)
    remove_stale_folders(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp, old = f"{out}.{os.getpid()}.tmp", f"{out}.{os.getpid()}.old"
    try:
        os.makedirs(tmp)
        written = fill(tmp)
        if os.path.isdir(out):
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
        return written
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(old) and not os.path.exists(out):
            os.rename(old, out)                                     # put the previous folder back
        if isinstance(e, OSError) and (e.filename is None or str(e.filename).startswith((tmp, out))):
            reason = e.strerror or str(e)                      # (atomic_write's names the file already)
            reason = reason if reason.startswith("cannot write") else f"cannot write {out}: {reason}"
            raise OSError(e.errno, f"{reason}; nothing was written to {out}") from None
        raise


def remove_stale_folders(out: str):
    """OUT.<pid>.tmp and OUT.<pid>.old folders of an export that was killed (its pid no longer
    runs): a .tmp one is removed; an .old one is the previous OUT, put back if OUT is missing."""
    parent, name = os.path.split(out)
    pattern = re.compile(re.escape(name) + r"\.(\d+)\.(tmp|old)")
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        m = pattern.fullmatch(entry)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        path = os.path.join(parent, entry)
        if m.group(2) == "old" and not os.path.exists(out):
            os.rename(path, out)
            print(f"put back {out}, which a killed export had moved to {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by a killed export")


# -----------------------------------------------------------------------------
# The command line

def stored_dtype(path: str):
    """The dtype a checkpoint's weights are stored in (its first floating tensor; memory-mapped,
    nothing read), so that loading in it copies nothing."""
    try:
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
            tensors = read_hf_tensors(path)[0]
        elif os.path.isdir(path) and (shards := sorted(f for f in os.listdir(path) if f.startswith("consolidated."))):
            tensors = read_torch(os.path.join(path, shards[0]))
        else:
            return torch.float32                        # llama2.c: float32
        return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    except CheckpointError:
        return torch.float32


def adapter_num_labels(path: str) -> int | None:
    """The GLUE head's outputs stored with an adapter (ours or peft's), for loading a RoBERTa with it."""
    if os.path.isdir(path):
        return peft_num_labels(path)
    tensors = read_safetensors(path)
    return tensors["head.out_proj.weight"].shape[0] if "head.out_proj.weight" in tensors else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the base checkpoint: a directory, a Hugging Face Hub id or a "
                                                   "paper name (hub.py)")
    p.add_argument("--adapter", default=None, help="an adapter file from train.py, or a peft adapter directory "
                                                   "(none, with --format hf: the base model converted)")
    p.add_argument("--format", required=True, choices=("peft", "hf"),
                   help="peft: adapter_config.json + adapter_model.safetensors (LoRA, DoRA); hf: a merged "
                        "Hugging Face checkpoint (LoRA, DoRA, QuanTA, full, BitFit)")
    p.add_argument("--out", required=True,
                   help="the output folder, written whole (into OUT.<pid>.tmp beside it, then renamed) or not at all")
    p.add_argument("--overwrite", action="store_true", help="replace an --out folder that holds files")
    p.add_argument("--max_shard_size", default="5GB", help="hf: the largest safetensors shard (5GB, 500MB, ...)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="hf: the weights' dtype (auto: the base checkpoint's)")
    p.add_argument("--base_model_name_or_path", default=None,
                   help="peft: written into adapter_config.json (default: the Hub id that --model names, "
                        "else its absolute path)")
    args = p.parse_args(argv)
    try:
        paper, path = hub.paper_name(args.model), hub.resolve_model(args.model)
        check_out(args.out, path, args.overwrite)                          # before any work
        dtype = {"auto": stored_dtype(path), "fp32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}[args.dtype]
        num_labels = adapter_num_labels(args.adapter) if args.adapter and os.path.exists(args.adapter) else None
        model = load(path, dtype=dtype, num_labels=num_labels)
        model.cfg.name = paper or model.cfg.name
        if args.adapter:
            load_any_adapter(model, args.adapter)
        if args.format == "peft":
            # The Hub id where --model names one, else the checkpoint's absolute path: a relative path
            # would be read against whatever directory the adapter is later loaded from.
            base = args.base_model_name_or_path or hub.hub_id(args.model) or os.path.abspath(args.model)
            written = write_folder(args.out, lambda tmp: [os.path.basename(f) for f in export_peft(model, tmp, base)])
        else:
            written = write_folder(args.out, lambda tmp: export_merged(model, path, tmp, args.max_shard_size, dtype))
    except (ValueError, OSError, CheckpointError) as e:          # OSError: a full or read-only disk
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: {', '.join(written)}")
    return args.out


if __name__ == "__main__":
    main()
