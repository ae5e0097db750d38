"""Reading and writing checkpoints: from files on disk to the models of model.py, and back.

  - `load(path)`: a checkpoint directory (or llama2.c .bin or GGUF file) -> a model with its weights,
    in eval mode. The layout is detected from the files present:
      - Hugging Face: config.json + model.safetensors / pytorch_model.bin, single or sharded
        (model_type llama, roberta, bart, mbart or deberta-v2);
      - Meta: params.json + consolidated.NN.pth (model-parallel shards are concatenated;
        checkpoint_meta.py);
      - GGUF (llama.cpp): one .gguf file of the llama architecture, dequantised (checkpoint_gguf.py);
      - llama2.c: one .bin file (legacy v0 or v1 header; checkpoint_meta.py).
    The model is built on the meta device and the tensors are assigned into it, so a checkpoint
    is never held twice in memory; anything missing, unexpected or mis-shaped is a CheckpointError
    naming the file and the key. PyTorch files (.bin, .pth) are read with weights_only=True:
    tensors, never arbitrary pickled objects.
  - Key names: one map per family (RoBERTa, DeBERTa, BART / mBART) of Hugging Face's module names
    and ours (RoBERTa's and DeBERTa's renamed onto BART's), read one way here and the other way
    by export.py; RoBERTa and DeBERTa share the names they keep from BERT.
  - `build(name_or_path)`: a preset name -> a weightless model of that shape (parameter counts),
    a path -> load(path).
  - A small safetensors reader (memory-mapped) and writer, used for the checkpoints and for the
    adapter files of methods.py, which checks every header before reading a byte. Files are
    written with runs.atomic_write, the one way this project replaces a file.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
import struct

import torch
import torch.nn as nn

from model import (ACTIVATIONS, ENCDEC_PRESETS, LLAMA_PRESETS, Bart, BartConfig, ClassificationHead, Deberta,
                   DebertaConfig, Llama, LlamaConfig, Roberta, RobertaConfig, deberta_head, preset_name)
from runs import atomic_write, read_json_object


# -----------------------------------------------------------------------------
# Reading and writing tensors

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file, the key and what was expected."""


def read_safetensors_header(path: str) -> tuple[dict, int, int]:
    """The layout of a .safetensors file: 8-byte little-endian header length n, a JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the raw
    bytes. Returns (header, n, file size); a truncated, unreadable or lying header is a CheckpointError
    (check_safetensors_header)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: a folder, not a .safetensors file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors header (says {n} bytes, file has {size - 8})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
    check_safetensors_header(path, header, size - 8 - n)
    return header, n, size


def _natural(x) -> bool:
    """A non-negative integer of JSON (not a bool, which Python counts as an int)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def check_safetensors_header(path: str, header: dict, data_len: int):
    """What the safetensors format promises, checked before any byte is read as a tensor: every
    entry an object {dtype, shape, data_offsets}; a known dtype; the shape a list of non-negative
    integers; data_offsets [begin, end] non-negative integers inside the data section, with
    end - begin = dtype size × the shape's product; no two tensors overlapping; __metadata__ an
    object of strings. A header that lies (negative offsets reading the header as weights, a
    shape larger than its bytes) is a CheckpointError naming the file and the key."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: safetensors __metadata__ is not an object of strings")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{path}: tensor {key!r}: expected an object with dtype, shape and data_offsets, "
                                  f"found {json.dumps(info)[:80]}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r} "
                                  f"(expected one of {', '.join(_ST_DTYPES)})")
        if not isinstance(shape, list) or not all(_natural(d) for d in shape):
            raise CheckpointError(f"{path}: tensor {key!r} has shape {shape!r}: expected a list of "
                                  f"non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
            raise CheckpointError(f"{path}: tensor {key!r} has data_offsets {offsets!r}: expected [begin, end], "
                                  f"non-negative integers")
        begin, end = offsets
        need = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if end < begin or end > data_len:
            raise CheckpointError(f"{path}: tensor {key!r} {dtype}{shape} needs bytes [{begin}, {end}) but the data "
                                  f"section has {data_len} bytes (truncated?)")
        if end - begin != need:
            raise CheckpointError(f"{path}: tensor {key!r} {dtype}{shape} needs {need} bytes, its data_offsets "
                                  f"[{begin}, {end}) hold {end - begin}")
        spans.append((begin, end, key))
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {k0!r} [{b0}, {e0}) and {k1!r} [{b1}, {e1}) overlap")


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The header's `__metadata__` ({} when it has none), without touching the tensors."""
    return read_safetensors_header(path)[0].get("__metadata__") or {}


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Read a .safetensors file through a memory map (layout: read_safetensors_header). The tensors
    share the mapped pages (copy-on-write); nothing is read until a tensor is used."""
    header, n, size = read_safetensors_header(path)
    header.pop("__metadata__", None)
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)                 # the whole file as bytes
    out = {}
    for key, info in header.items():                                      # (checked by the header's reader)
        dtype, shape = _ST_DTYPES[info["dtype"]], info["shape"]
        begin, end = info["data_offsets"]
        chunk = raw[8 + n + begin: 8 + n + end]
        if (8 + n + begin) % dtype.itemsize:                              # unaligned: copy
            chunk = chunk.clone()
        out[key] = chunk.view(dtype).view(shape)
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None):
    """Write tensors in the safetensors layout (used for adapter files), atomically (atomic_write)."""
    names = {v: k for k, v in _ST_DTYPES.items()}
    header, offset, blobs = {}, 0, []
    for key, t in tensors.items():
        b = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    atomic_write(path, write)


def read_torch(path: str) -> dict[str, torch.Tensor]:
    """A PyTorch .bin / .pth file of tensors, memory-mapped. weights_only=True: tensors and plain
    containers only; a file that would unpickle any other Python object is refused."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a PyTorch file (.bin, .pth) by read_torch."""
    return read_safetensors(path) if path.endswith(".safetensors") else read_torch(path)


def read_json(path: str) -> dict:
    """A JSON object (config.json, params.json, an index); anything else is a CheckpointError naming the file."""
    try:
        return read_json_object(path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def hf_weight_files(path: str) -> list[str]:
    """The weight files of a Hugging Face checkpoint directory: the shards its *.index.json lists,
    else its one model.safetensors or pytorch_model.bin (safetensors first)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map object ({{tensor name: shard file}})")
            files = []
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(file := os.path.join(path, str(shard))):
                    raise CheckpointError(f"{index}: lists shard {shard!r}, which is not in {path}")
                files.append(file)
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(file := os.path.join(path, name)):
            return [file]
    raise CheckpointError(f"{path}: has config.json but no model.safetensors, pytorch_model.bin "
                          f"or a *.index.json for sharded weights")


def read_hf_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a Hugging Face checkpoint directory -> ({key: tensor}, {key: file it came from})."""
    tensors, origin = {}, {}
    for file in hf_weight_files(path):
        for k, t in read_tensors(file).items():
            tensors[k], origin[k] = t, file
    return tensors, origin


def assign_weights(model: nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, str],
                   dtype, device, ignore=()):
    """Put `tensors` into `model` (built on the meta device) by assignment, checking every key.

    A missing, unexpected or mis-shaped tensor is a CheckpointError naming the file and the key.
    Keys matching a regex in `ignore` (e.g. cached RoPE tables) are skipped.
    """
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    tied = getattr(model.cfg, "tie_embeddings", False)
    if tied:
        expected.pop("lm_head.weight", None)
    state = {}
    for key, t in tensors.items():
        if any(re.fullmatch(p, key) for p in ignore) or (tied and key == "lm_head.weight"):
            continue
        if key not in expected:
            raise CheckpointError(f"{origin.get(key, '?')}: unexpected tensor {key!r} {tuple(t.shape)}")
        if tuple(t.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{origin.get(key, '?')}: tensor {key!r} has shape {tuple(t.shape)}, "
                                  f"the model expects {tuple(expected[key].shape)}")
        state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    missing = [k for k in expected if k not in state]
    if missing:
        files = sorted(set(origin.values()))
        raise CheckpointError(f"{', '.join(files)}: missing tensor {missing[0]!r} (expected shape "
                              f"{tuple(expected[missing[0]].shape)})" +
                              (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    return model


# -----------------------------------------------------------------------------
# Key names: Hugging Face's <-> ours
#
# A map per model family: Hugging Face's module names -> ours, "{}" standing for a layer index. A
# checkpoint key is a name followed by .weight or .bias (or a name alone: final_logits_bias). Loading
# reads a map left to right (KeyMap.ours), export.py right to left (KeyMap.hf); any key the map does
# not name and the family does not list as unused is an error.

def translate(key: str, names: dict[str, str]) -> str | None:
    """`key` renamed through `names`, or None where no name fits it."""
    for name, new in names.items():
        pattern = re.escape(name).replace(r"\{\}", r"(\d+)") + r"(\.weight|\.bias)?"
        if m := re.fullmatch(pattern, key):
            *layers, param = m.groups()
            return new.format(*layers) + (param or "")
    return None


class KeyMap:
    """One family's names (one-to-one). `prefix` is the base model's (roberta., model.): bare
    checkpoints of the base model (RobertaModel, BartModel) have keys without it. `unused`: regexes
    of keys, prefix removed, that the checkpoint may hold and this model does not use."""

    def __init__(self, prefix: str, names: dict[str, str], unused: tuple[str, ...] = ()):
        self.prefix, self.to_ours, self.unused = prefix, names, unused
        self.to_hf = {ours: hf for hf, ours in names.items()}
        assert len(self.to_hf) == len(names), "two names map to one"

    def ours(self, key: str) -> str | None:
        return translate(key, self.to_ours) or translate(self.prefix + key, self.to_ours)

    def hf(self, key: str) -> str | None:
        return translate(key, self.to_hf)

    def is_unused(self, key: str) -> bool:
        return any(re.fullmatch(p, key.removeprefix(self.prefix)) for p in self.unused)


def bert_names(prefix: str, query: str, key: str, value: str) -> dict[str, str]:
    """The embeddings and encoder layers RoBERTa and DeBERTa keep from BERT, Hugging Face's names ->
    ours; the self-attention's projections are named `query`, `key`, `value`."""
    layer = {f"attention.self.{query}": "self_attn.q_proj", f"attention.self.{key}": "self_attn.k_proj",
             f"attention.self.{value}": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
             "attention.output.LayerNorm": "self_attn_layer_norm", "intermediate.dense": "ffn.fc1",
             "output.dense": "ffn.fc2", "output.LayerNorm": "final_layer_norm"}
    return {prefix + "embeddings.word_embeddings": "embed_tokens",
            prefix + "embeddings.token_type_embeddings": "embed_token_types",
            prefix + "embeddings.LayerNorm": "layernorm_embedding",
            **{f"{prefix}encoder.layer.{{}}.{hf}": f"layers.{{}}.{ours}" for hf, ours in layer.items()}}


# RoBERTa has no use for the pooler, the MLM head (lm_head) or the cached position ids.
ROBERTA_KEYS = KeyMap("roberta.", {
    **bert_names("roberta.", "query", "key", "value"),
    "roberta.embeddings.position_embeddings": "embed_positions",
    "classifier.dense": "head.dense", "classifier.out_proj": "head.out_proj",          # the GLUE head
}, unused=(r"pooler\..*", r"lm_head\..*", r"embeddings\.position_ids"))

# DeBERTa-v2/v3 has no use for the pretraining heads (MLM of v2, replaced-token detection of v3), the
# absolute position table of v3 checkpoints (position_biased_input false) or the cached position ids.
DEBERTA_KEYS = KeyMap("deberta.", {
    **bert_names("deberta.", "query_proj", "key_proj", "value_proj"),
    "deberta.encoder.rel_embeddings": "rel_embeddings",
    "deberta.encoder.LayerNorm": "rel_layer_norm",
    "pooler.dense": "head.dense", "classifier": "head.out_proj",                       # the GLUE head
}, unused=(r"lm_predictions\..*", r"mask_predictions\..*", r"cls\..*",
           r"embeddings\.position_embeddings\.weight", r"embeddings\.position_ids"))


def bart_names() -> dict[str, str]:
    """BART's and mBART's names: "model." + ours, but fc1 / fc2 directly in the layer (ours: in ffn.)."""
    attention = ("q_proj", "k_proj", "v_proj", "out_proj")
    layer = {"encoder": [f"self_attn.{p}" for p in attention] + ["self_attn_layer_norm", "final_layer_norm"]}
    layer["decoder"] = layer["encoder"] + [f"encoder_attn.{p}" for p in attention] + ["encoder_attn_layer_norm"]
    names = {"model.shared": "shared",                   # (loading reads it with its copies: BART_EMBEDDINGS)
             "final_logits_bias": "final_logits_bias"}
    for stack, modules in layer.items():
        for m in ("embed_positions", "layernorm_embedding", "layer_norm"):
            names[f"model.{stack}.{m}"] = f"{stack}.{m}"
        for m in modules:
            names[f"model.{stack}.layers.{{}}.{m}"] = f"{stack}.layers.{{}}.{m}"
        for m in ("fc1", "fc2"):
            names[f"model.{stack}.layers.{{}}.{m}"] = f"{stack}.layers.{{}}.ffn.{m}"
    return names


BART_KEYS = KeyMap("model.", bart_names())


def rename(tensors, origin, keys: KeyMap, file_of_model):
    """Checkpoint keys -> ours through `keys`; unused keys are dropped, any other is an error naming its file."""
    out, out_origin = {}, {}
    for key, t in tensors.items():
        if (new := keys.ours(key)) is not None:
            out[new], out_origin[new] = t, origin[key]
        elif not keys.is_unused(key):
            raise CheckpointError(f"{origin[key]}: unexpected tensor {key!r} {tuple(t.shape)} for {file_of_model}")
    return out, out_origin


# -----------------------------------------------------------------------------
# Loading a checkpoint: which layout, then LLaMA's Hugging Face layout, RoBERTa, BART / mBART, DeBERTa

def load(path: str, dtype=torch.float32, device="cpu", num_labels: int | None = None):
    """Read the checkpoint directory (or llama2.c .bin or GGUF file) at `path` and return the model.

    The layout is detected from the files present (and the model from config.json's model_type:
    llama, roberta, bart, mbart, deberta-v2): config.json, else params.json, else one .gguf file,
    else one .bin file; the model is built on the meta device and the tensors are
    assigned into it, so a checkpoint is never held twice in memory. `num_labels` (RoBERTa, DeBERTa): the
    classification head's outputs; a fresh head is created where the checkpoint has none.

    The model is returned in eval mode (dropout off), as transformers' from_pretrained does: call
    `.train()` on it to fine-tune.

    dtype=None and device=None keep the checkpoint's tensors as they are: for safetensors,
    memory-mapped views, nothing read until used (fsdp.py shards such a model, each process
    reading only its rows). A GGUF file is dequantised to float32 (dtype=None) on the CPU
    (device=None); it needs the optional gguf package (requirements-gguf.txt).
    """
    if num_labels is not None and not os.path.exists(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: num_labels is for RoBERTa and DeBERTa checkpoints (config.json with model_type "
                              f"roberta or deberta-v2)")
    from checkpoint_gguf import load_gguf               # (they import this module)
    from checkpoint_meta import load_llama2c, load_meta
    if os.path.isfile(path) and path.endswith(".bin") and not path.endswith("pytorch_model.bin"):
        model = load_llama2c(path, dtype, device)
    elif os.path.isfile(path) and path.endswith(".gguf"):
        model = load_gguf(path, dtype, device)
    elif not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory, llama2.c .bin file or .gguf file")
    elif os.path.exists(os.path.join(path, "config.json")):
        model = load_hf(path, dtype, device, num_labels)
    elif os.path.exists(os.path.join(path, "params.json")):
        model = load_meta(path, dtype, device)
    elif ggufs := sorted(glob.glob(os.path.join(path, "*.gguf"))):
        if len(ggufs) > 1:
            names = ", ".join(os.path.basename(g) for g in ggufs)
            raise CheckpointError(f"{path}: holds {len(ggufs)} .gguf files ({names}); pass the one to load")
        model = load_gguf(ggufs[0], dtype, device)
    elif len(bins := sorted(glob.glob(os.path.join(path, "*.bin")))) == 1:
        model = load_llama2c(bins[0], dtype, device)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint layout; expected config.json + model.safetensors / "
                              f"pytorch_model.bin (Hugging Face), params.json + consolidated.*.pth (Meta), "
                              f"one .gguf file (llama.cpp) or one llama2.c .bin file")
    model.cfg.name = preset_name(model.cfg)     # which rows of presets.py apply: from the config's fields
    return model.eval()


def build(name_or_path: str, dtype=torch.float32, device="cpu"):
    """A preset name -> a model of that shape on the meta device (no memory; for parameter
    counts); a path -> load(path), in eval mode."""
    if name_or_path in LLAMA_PRESETS:
        with torch.device("meta"):
            return Llama(dataclasses.replace(LlamaConfig.from_name(name_or_path), name=name_or_path))
    if name_or_path in ENCDEC_PRESETS:
        cfg = dataclasses.replace(ENCDEC_PRESETS[name_or_path], name=name_or_path)
        with torch.device("meta"):
            return (Roberta if isinstance(cfg, RobertaConfig) else Deberta if isinstance(cfg, DebertaConfig)
                    else Bart)(cfg)
    if not os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path!r} is neither a model name ({', '.join([*LLAMA_PRESETS, *ENCDEC_PRESETS])}) "
                         f"nor a path")
    return load(name_or_path, dtype, device)


def llama_config_from_hf(hf: dict, file: str) -> LlamaConfig:
    if hf.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{file}: model_type {hf.get('model_type')!r} is not supported "
                              f"(expected llama, roberta, bart, mbart or deberta-v2)")
    rope_scaling = rope_scaling_from_hf(hf, file)
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise CheckpointError(f"{file}: {key}={hf[key]!r} is not supported (LLaMA uses {ok!r})")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in hf:
            raise CheckpointError(f"{file}: missing key {key!r}")
    if hf["hidden_size"] % hf["num_attention_heads"] or hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"]) \
            != hf["hidden_size"] // hf["num_attention_heads"]:
        raise CheckpointError(f"{file}: head_dim must be hidden_size / num_attention_heads")
    theta = hf.get("rope_theta", hf.get("rope_parameters", {}).get("rope_theta", 10000.0))
    return LlamaConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                       n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                       hidden_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                       norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                       max_seq_len=hf.get("max_position_embeddings", 2048),
                       tie_embeddings=hf.get("tie_word_embeddings", False), rope_scaling=rope_scaling)


# RoPE scaling types this model implements (model.rope_inv_freq) and the keys each needs.
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_scaling_from_hf(hf: dict, file: str) -> dict | None:
    """config.json's RoPE scaling -> LlamaConfig.rope_scaling (None: plain RoPE). transformers 4
    writes it as "rope_scaling" ({"rope_type" or, older, "type": ..., "factor": ...}) next to
    "rope_theta"; transformers 5 as "rope_parameters" ({"rope_type": "default" | ..., "rope_theta",
    ...}). Both are read; linear and llama3 are supported, any other type is an error."""
    spec = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise CheckpointError(f"{file}: RoPE scaling {kind!r} ({spec}) is not supported "
                              f"(supported: {', '.join(ROPE_SCALING_KEYS)})")
    for key in ROPE_SCALING_KEYS[kind]:
        if key not in spec:
            raise CheckpointError(f"{file}: RoPE scaling {kind!r} needs {key!r}, which {spec} does not have")
    return {"rope_type": kind, **{k: spec[k] for k in ROPE_SCALING_KEYS[kind]}}


def load_hf(path, dtype=torch.float32, device="cpu", num_labels=None):
    file = os.path.join(path, "config.json")
    hf = read_json(file)
    kind = hf.get("model_type", "llama")
    if kind == "roberta":
        return load_roberta(path, hf, dtype, device, num_labels)
    if kind in ("bart", "mbart"):
        return load_bart(path, hf, dtype, device)
    if kind in ("deberta-v2", "deberta"):                 # v1 ("deberta") is rejected there, by name
        return load_deberta(path, hf, dtype, device, num_labels)
    if num_labels is not None:
        raise CheckpointError(f"{file}: num_labels is for RoBERTa and DeBERTa; this is a {kind!r} checkpoint")
    cfg = llama_config_from_hf(hf, file)
    tensors, origin = read_hf_tensors(path)
    # Hugging Face keys are ours with a "model." prefix (lm_head.weight has none).
    renamed = {k.removeprefix("model."): t for k, t in tensors.items()}
    origin = {k.removeprefix("model."): o for k, o in origin.items()}
    with torch.device("meta"):
        model = Llama(cfg)
    return assign_weights(model, renamed, origin, dtype, device, ignore=[r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq"])


def require(hf: dict, keys, file: str):
    for key in keys:
        if key not in hf:
            raise CheckpointError(f"{file}: missing key {key!r}")


def head_labels(tensors, origin, num_labels: int | None) -> int:
    """The outputs of the checkpoint's classification head (0: it has none); a head of another size
    than `num_labels`, where given, is an error."""
    head = tensors.get("head.out_proj.weight")
    if head is None:
        return 0
    if num_labels is not None and head.shape[0] != num_labels:
        raise CheckpointError(f"{origin['head.out_proj.weight']}: the classification head has {head.shape[0]} "
                              f"labels, num_labels={num_labels} was asked for")
    return head.shape[0]


def add_head(model, num_labels: int | None, new_head, hf: dict, dtype, device):
    """`model`, with a new classification head `new_head(cfg)` where its checkpoint has none and
    `num_labels` asks for one, initialised as transformers' _init_weights does: weights
    N(0, initializer_range), biases zero."""
    if model.head is None and num_labels:
        model.cfg.num_labels = num_labels
        model.head = new_head(model.cfg).to(device or "cpu", dtype or torch.float32)
        for lin in (model.head.dense, model.head.out_proj):
            nn.init.normal_(lin.weight, std=hf.get("initializer_range", 0.02))
            nn.init.zeros_(lin.bias)
    return model


def load_roberta(path, hf, dtype=torch.float32, device="cpu", num_labels=None):
    file = os.path.join(path, "config.json")
    require(hf, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings"), file)
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{file}: hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    tensors, origin = rename(*read_hf_tensors(path), ROBERTA_KEYS, file)
    dropout = hf.get("hidden_dropout_prob", 0.1)
    cfg = RobertaConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                        hidden_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                        max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 1),
                        pad_id=hf.get("pad_token_id", 1), norm_eps=hf.get("layer_norm_eps", 1e-5), activation=act,
                        dropout=dropout, attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                        num_labels=head_labels(tensors, origin, num_labels))
    with torch.device("meta"):
        model = Roberta(cfg)
    assign_weights(model, tensors, origin, dtype, device)
    head_dropout = hf.get("classifier_dropout") or dropout
    return add_head(model, num_labels, lambda cfg: ClassificationHead(cfg.dim, cfg.num_labels, head_dropout),
                    hf, dtype, device)


# The token embedding is stored up to four times under these names (tied: one matrix).
BART_EMBEDDINGS = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                   "lm_head.weight", "shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
GENERATION_KEYS = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id",
                   "forced_eos_token_id", "num_beams", "max_length", "min_length", "no_repeat_ngram_size",
                   "length_penalty", "early_stopping")


def load_bart(path, hf, dtype=torch.float32, device="cpu"):
    file = os.path.join(path, "config.json")
    require(hf, ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                 "vocab_size", "max_position_embeddings"), file)
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")):
        if hf.get(b, hf[a]) != hf[a]:
            raise CheckpointError(f"{file}: {a}={hf[a]} and {b}={hf[b]} differ; this implementation needs them equal")
    act = hf.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{file}: activation_function {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    # generation settings: generation_config.json, else the model config (as transformers does)
    gen_file = os.path.join(path, "generation_config.json")
    gen_src = read_json(gen_file) if os.path.exists(gen_file) else hf
    generation = {k: gen_src[k] for k in GENERATION_KEYS if gen_src.get(k) is not None}
    cfg = BartConfig(dim=hf["d_model"], encoder_layers=hf["encoder_layers"], decoder_layers=hf["decoder_layers"],
                     n_heads=hf["encoder_attention_heads"], hidden_dim=hf["encoder_ffn_dim"],
                     vocab_size=hf["vocab_size"], max_positions=hf["max_position_embeddings"],
                     pad_id=hf.get("pad_token_id", 1), eos_id=hf.get("eos_token_id", 2),
                     pre_norm=hf["model_type"] == "mbart", model_type=hf["model_type"], scale_embedding=hf.get("scale_embedding", False),
                     activation=act, dropout=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.0),
                     activation_dropout=hf.get("activation_dropout", 0.0), generation=generation)
    raw, raw_origin = read_hf_tensors(path)
    emb = [k for k in BART_EMBEDDINGS if k in raw]
    if not emb:
        raise CheckpointError(f"{', '.join(sorted(set(raw_origin.values())))}: no token embedding "
                              f"(expected one of {', '.join(BART_EMBEDDINGS[:4])})")
    for k in emb[1:]:
        if raw[k].shape != raw[emb[0]].shape or not torch.equal(raw[k], raw[emb[0]]):
            raise CheckpointError(f"{raw_origin[k]}: {k!r} differs from {emb[0]!r}; untied embeddings are not supported")
    tensors, origin = rename({k: t for k, t in raw.items() if k not in emb}, raw_origin, BART_KEYS, file)
    tensors["shared.weight"], origin["shared.weight"] = raw[emb[0]], raw_origin[emb[0]]
    with torch.device("meta"):
        model = Bart(cfg)
    return assign_weights(model, tensors, origin, dtype, device)


# -----------------------------------------------------------------------------
# DeBERTa-v2/v3 (model_type "deberta-v2": microsoft/deberta-v3-base's config.json, pytorch_model.bin
# or model.safetensors).

# config.json values this implementation requires: the v3 checkpoints' (key, value, what it means)
DEBERTA_REQUIRED = [("relative_attention", True, "relative position attention"),
                    ("share_att_key", True, "position projections shared with q_proj / k_proj"),
                    ("position_biased_input", False, "no absolute position embeddings"),
                    ("norm_rel_ebd", "layer_norm", "a LayerNorm on the relative embeddings"),
                    ("conv_kernel_size", 0, "no convolution layer (deberta-v2-xlarge/xxlarge have one)")]


def load_deberta(path, hf, dtype=torch.float32, device="cpu", num_labels=None):
    file = os.path.join(path, "config.json")
    if hf.get("model_type") == "deberta":
        raise CheckpointError(f"{file}: model_type 'deberta' is DeBERTa v1 (absolute positions added in the last "
                              f"layer, its own relative attention); only DeBERTa-v2/v3 (model_type 'deberta-v2') "
                              f"is supported")
    require(hf, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"), file)
    pos_att = hf.get("pos_att_type")
    pos_att = [p.strip() for p in pos_att.lower().split("|")] if isinstance(pos_att, str) else pos_att
    if sorted(pos_att or []) != ["c2p", "p2c"]:
        raise CheckpointError(f"{file}: pos_att_type {hf.get('pos_att_type')!r} is not supported (expected "
                              f"'p2c|c2p': both disentangled terms, as DeBERTa-v3)")
    for key, value, what in DEBERTA_REQUIRED:
        got = hf.get(key, {"norm_rel_ebd": "none", "relative_attention": False, "share_att_key": False,
                           "position_biased_input": True, "conv_kernel_size": 0}[key])
        if (got.lower().replace(" ", "") if isinstance(got, str) else got) != value:
            raise CheckpointError(f"{file}: {key}={got!r} is not supported (expected {value!r}: {what})")
    for key in ("embedding_size", "attention_head_size", "pooler_hidden_size"):
        natural = hf["hidden_size"] // hf["num_attention_heads"] if key == "attention_head_size" else hf["hidden_size"]
        if hf.get(key, natural) != natural:
            raise CheckpointError(f"{file}: {key}={hf[key]} is not supported (expected {natural}, the default)")
    for key in ("hidden_act", "pooler_hidden_act"):
        if hf.get(key, "gelu") not in ACTIVATIONS:
            raise CheckpointError(f"{file}: {key} {hf[key]!r} is not supported ({', '.join(ACTIVATIONS)})")
    tensors, origin = rename(*read_hf_tensors(path), DEBERTA_KEYS, file)
    cfg = DebertaConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                        hidden_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                        max_positions=hf.get("max_position_embeddings", 512),
                        position_buckets=hf.get("position_buckets", -1),
                        max_relative_positions=hf.get("max_relative_positions", -1),
                        type_vocab_size=hf.get("type_vocab_size", 0), pad_id=hf.get("pad_token_id", 0),
                        norm_eps=hf.get("layer_norm_eps", 1e-7), activation=hf.get("hidden_act", "gelu"),
                        dropout=hf.get("hidden_dropout_prob", 0.1),
                        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                        pooler_activation=hf.get("pooler_hidden_act", "gelu"),
                        pooler_dropout=hf.get("pooler_dropout", 0.0), cls_dropout=hf.get("cls_dropout"),
                        num_labels=head_labels(tensors, origin, num_labels))
    with torch.device("meta"):
        model = Deberta(cfg)
    assign_weights(model, tensors, origin, dtype, device)
    return add_head(model, num_labels, deberta_head, hf, dtype, device)
