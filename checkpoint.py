"""Reading and writing checkpoints: from files on disk to the models of model.py, and back.

  - `load(path)`: a checkpoint directory (or llama2.c .bin or GGUF file) -> a model with its weights,
    in eval mode. The layout is detected from the files present:
      - Hugging Face: config.json + model.safetensors / pytorch_model.bin, single or sharded
        (model_type llama, roberta, bart, mbart or deberta-v2; RoBERTa's and DeBERTa's keys are
        renamed onto BART's module names);
      - Meta: params.json + consolidated.NN.pth (model-parallel shards are concatenated);
      - GGUF (llama.cpp): one .gguf file of the llama architecture, dequantised (checkpoint_gguf.py);
      - llama2.c: one .bin file (legacy v0 or v1 header).
    The model is built on the meta device and the tensors are assigned into it, so a checkpoint
    is never held twice in memory; anything missing, unexpected or mis-shaped is a CheckpointError
    naming the file and the key.
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

from runs import atomic_write
from model import (ACTIVATIONS, ENCDEC_PRESETS, LLAMA_PRESETS, Bart, BartConfig, ClassificationHead, Llama,
                   LlamaConfig, Roberta, RobertaConfig, preset_name)


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
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {e})") from None


def read_hf_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a Hugging Face checkpoint directory -> ({key: tensor}, {key: file it came from})."""
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", read_torch)):
        index = os.path.join(path, index_name)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            tensors, origin = {}, {}
            for shard in sorted(set(weight_map.values())):
                file = os.path.join(path, shard)
                if not os.path.exists(file):
                    raise CheckpointError(f"{index}: lists shard {shard!r}, which is not in {path}")
                for k, t in reader(file).items():
                    tensors[k], origin[k] = t, file
            return tensors, origin
    for name, reader in (("model.safetensors", read_safetensors), ("pytorch_model.bin", read_torch)):
        file = os.path.join(path, name)
        if os.path.exists(file):
            tensors = reader(file)
            return tensors, {k: file for k in tensors}
    raise CheckpointError(f"{path}: has config.json but no model.safetensors, pytorch_model.bin "
                          f"or a *.index.json for sharded weights")


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


def meta_to_hf_rows(w, n_heads: int):
    """Meta's RoPE rotates interleaved pairs (2i, 2i+1) of each head, Hugging Face's rotates
    (i, i + hd/2). Permute the output rows of wq / wk so both give the same attention scores
    (the permutation of transformers' convert_llama_weights_to_hf.py)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


# -----------------------------------------------------------------------------
# Loading a checkpoint: LLaMA's three layouts, RoBERTa, BART / mBART

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
        raise CheckpointError(f"{path}: num_labels is for RoBERTa checkpoints (config.json with model_type roberta)")
    from checkpoint_gguf import load_gguf               # (imports this module)
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
                              f"(expected llama, roberta, bart or mbart)")
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
    with open(file) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    kind = hf.get("model_type", "llama")
    if kind == "roberta":
        return load_roberta(path, hf, dtype, device, num_labels)
    if kind in ("bart", "mbart"):
        return load_bart(path, hf, dtype, device)
    if kind in ("deberta-v2", "deberta"):                 # v1 ("deberta") is rejected there, by name
        return load_deberta(path, hf, dtype, device, num_labels)
    if num_labels is not None:
        raise CheckpointError(f"{file}: num_labels is for RoBERTa; this is a {kind!r} checkpoint")
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


def rename(tensors, origin, key_map, unused, file_of_model):
    """Checkpoint keys -> ours through `key_map` [(regex, replacement)]; keys matching `unused`
    (parts of the checkpoint this model has no use for, e.g. a pretraining head) are dropped,
    any other key is an error naming its file."""
    out, out_origin = {}, {}
    for key, t in tensors.items():
        for pattern, repl in key_map:
            if re.fullmatch(pattern, key):
                new = re.sub(pattern, repl, key)
                out[new], out_origin[new] = t, origin[key]
                break
        else:
            if not any(re.fullmatch(p, key) for p in unused):
                raise CheckpointError(f"{origin[key]}: unexpected tensor {key!r} {tuple(t.shape)} for {file_of_model}")
    return out, out_origin


# Hugging Face RoBERTa keys -> ours (the "roberta." prefix is absent in bare RobertaModel checkpoints).
_R = r"(?:roberta\.)?"
ROBERTA_KEYS = [
    (_R + r"embeddings\.word_embeddings\.weight", "embed_tokens.weight"),
    (_R + r"embeddings\.position_embeddings\.weight", "embed_positions.weight"),
    (_R + r"embeddings\.token_type_embeddings\.weight", "embed_token_types.weight"),
    (_R + r"embeddings\.LayerNorm\.(weight|bias)", r"layernorm_embedding.\1"),
    (_R + r"encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)", r"layers.\1.self_attn.q_proj.\2"),
    (_R + r"encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)", r"layers.\1.self_attn.k_proj.\2"),
    (_R + r"encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)", r"layers.\1.self_attn.v_proj.\2"),
    (_R + r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.self_attn.out_proj.\2"),
    (_R + r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.self_attn_layer_norm.\2"),
    (_R + r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.ffn.fc1.\2"),
    (_R + r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.ffn.fc2.\2"),
    (_R + r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"layers.\1.final_layer_norm.\2"),
    (r"classifier\.(dense|out_proj)\.(weight|bias)", r"head.\1.\2"),
]
ROBERTA_UNUSED = [_R + r"pooler\..*", r"lm_head\..*", _R + r"embeddings\.position_ids"]   # MLM head, pooler


def load_roberta(path, hf, dtype=torch.float32, device="cpu", num_labels=None):
    file = os.path.join(path, "config.json")
    require(hf, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings"), file)
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{file}: hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    tensors, origin = rename(*read_hf_tensors(path), ROBERTA_KEYS, ROBERTA_UNUSED, file)
    head = tensors.get("head.out_proj.weight")
    if head is not None and num_labels is not None and head.shape[0] != num_labels:
        raise CheckpointError(f"{origin['head.out_proj.weight']}: the classification head has {head.shape[0]} "
                              f"labels, num_labels={num_labels} was asked for")
    dropout = hf.get("hidden_dropout_prob", 0.1)
    cfg = RobertaConfig(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                        hidden_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                        max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 1),
                        pad_id=hf.get("pad_token_id", 1), norm_eps=hf.get("layer_norm_eps", 1e-5), activation=act,
                        dropout=dropout, attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                        num_labels=head.shape[0] if head is not None else 0)
    with torch.device("meta"):
        model = Roberta(cfg)
    assign_weights(model, tensors, origin, dtype, device)
    if head is None and num_labels:                       # a fresh head: N(0, 0.02) weights, zero biases
        cfg.num_labels = num_labels
        model.head = ClassificationHead(cfg.dim, num_labels, hf.get("classifier_dropout") or dropout).to(
            device or "cpu", dtype or torch.float32)
        for lin in (model.head.dense, model.head.out_proj):
            nn.init.normal_(lin.weight, std=hf.get("initializer_range", 0.02))
            nn.init.zeros_(lin.bias)
    return model


BART_KEYS = [
    (r"(?:model\.)?(encoder|decoder)\.layers\.(\d+)\.(fc1|fc2)\.(weight|bias)", r"\1.layers.\2.ffn.\3.\4"),
    (r"(?:model\.)?((?:encoder|decoder)\.(?:embed_positions|layernorm_embedding|layer_norm|layers\.\d+\.(?:"
     r"(?:self_attn|encoder_attn)\.(?:q|k|v|out)_proj|self_attn_layer_norm|encoder_attn_layer_norm|final_layer_norm))"
     r"\.(?:weight|bias))", r"\1"),
    (r"final_logits_bias", "final_logits_bias"),
]
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
    gen_src = hf
    if os.path.exists(gen_file):
        with open(gen_file) as f:
            gen_src = json.load(f)
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
    tensors, origin = rename({k: t for k, t in raw.items() if k not in emb}, raw_origin, BART_KEYS, [], file)
    tensors["shared.weight"], origin["shared.weight"] = raw[emb[0]], raw_origin[emb[0]]
    with torch.device("meta"):
        model = Bart(cfg)
    return assign_weights(model, tensors, origin, dtype, device)


# -----------------------------------------------------------------------------
# DeBERTa-v2/v3 (model_type "deberta-v2": microsoft/deberta-v3-base's config.json, pytorch_model.bin
# or model.safetensors). Its keys -> ours; the "deberta." prefix is absent in bare DebertaV2Model files.

from model import Deberta, DebertaConfig, DebertaHead  # noqa: E402  (this section's models)

_D = r"(?:deberta\.)?"
DEBERTA_KEYS = [
    (_D + r"embeddings\.word_embeddings\.weight", "embed_tokens.weight"),
    (_D + r"embeddings\.token_type_embeddings\.weight", "embed_token_types.weight"),
    (_D + r"embeddings\.LayerNorm\.(weight|bias)", r"layernorm_embedding.\1"),
    (_D + r"encoder\.layer\.(\d+)\.attention\.self\.query_proj\.(weight|bias)", r"layers.\1.self_attn.q_proj.\2"),
    (_D + r"encoder\.layer\.(\d+)\.attention\.self\.key_proj\.(weight|bias)", r"layers.\1.self_attn.k_proj.\2"),
    (_D + r"encoder\.layer\.(\d+)\.attention\.self\.value_proj\.(weight|bias)", r"layers.\1.self_attn.v_proj.\2"),
    (_D + r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"layers.\1.self_attn.out_proj.\2"),
    (_D + r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.self_attn_layer_norm.\2"),
    (_D + r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"layers.\1.ffn.fc1.\2"),
    (_D + r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"layers.\1.ffn.fc2.\2"),
    (_D + r"encoder\.layer\.(\d+)\.output\.LayerNorm\.(weight|bias)", r"layers.\1.final_layer_norm.\2"),
    (_D + r"encoder\.rel_embeddings\.weight", "rel_embeddings.weight"),
    (_D + r"encoder\.LayerNorm\.(weight|bias)", r"rel_layer_norm.\1"),
    (r"pooler\.dense\.(weight|bias)", r"head.dense.\1"),
    (r"classifier\.(weight|bias)", r"head.out_proj.\1"),
]
# The pretraining heads (MLM of v2, replaced-token detection of v3), the unused absolute position
# table of v3 checkpoints (position_biased_input false) and cached position ids.
DEBERTA_UNUSED = [r"lm_predictions\..*", r"mask_predictions\..*", r"cls\..*",
                  _D + r"embeddings\.position_embeddings\.weight", _D + r"embeddings\.position_ids"]
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
    tensors, origin = rename(*read_hf_tensors(path), DEBERTA_KEYS, DEBERTA_UNUSED, file)
    head = tensors.get("head.out_proj.weight")
    if head is not None and num_labels is not None and head.shape[0] != num_labels:
        raise CheckpointError(f"{origin['head.out_proj.weight']}: the classification head has {head.shape[0]} "
                              f"labels, num_labels={num_labels} was asked for")
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
                        num_labels=head.shape[0] if head is not None else 0)
    with torch.device("meta"):
        model = Deberta(cfg)
    assign_weights(model, tensors, origin, dtype, device)
    if head is None and num_labels:                       # a fresh head: N(0, 0.02) weights, zero biases
        cfg.num_labels = num_labels
        model.head = DebertaHead(cfg).to(device or "cpu", dtype or torch.float32)
        for lin in (model.head.dense, model.head.out_proj):
            nn.init.normal_(lin.weight, std=hf.get("initializer_range", 0.02))
            nn.init.zeros_(lin.bias)
    return model


# Meta key -> (our key, the dimension model-parallel shards are split along; None = replicated).
META_KEYS = {
    "tok_embeddings.weight": ("embed_tokens.weight", 1),
    "norm.weight": ("norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "layers.{}.attention.wq.weight": ("layers.{}.self_attn.q_proj.weight", 0),
    "layers.{}.attention.wk.weight": ("layers.{}.self_attn.k_proj.weight", 0),
    "layers.{}.attention.wv.weight": ("layers.{}.self_attn.v_proj.weight", 0),
    "layers.{}.attention.wo.weight": ("layers.{}.self_attn.o_proj.weight", 1),
    "layers.{}.feed_forward.w1.weight": ("layers.{}.mlp.gate_proj.weight", 0),
    "layers.{}.feed_forward.w2.weight": ("layers.{}.mlp.down_proj.weight", 1),
    "layers.{}.feed_forward.w3.weight": ("layers.{}.mlp.up_proj.weight", 0),
    "layers.{}.attention_norm.weight": ("layers.{}.input_layernorm.weight", None),
    "layers.{}.ffn_norm.weight": ("layers.{}.post_attention_layernorm.weight", None),
}


def map_meta_key(key: str, file: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    pattern = f"layers.{{}}.{m.group(2)}" if m else key
    if pattern not in META_KEYS:
        raise CheckpointError(f"{file}: unexpected tensor {key!r} in a Meta checkpoint")
    ours, split = META_KEYS[pattern]
    return (ours.format(m.group(1)) if m else ours), split


def llama_config_from_meta(params: dict, vocab_size: int) -> LlamaConfig:
    """params.json -> config. The FFN width follows Meta's model.py: 2/3 of 4·dim, times
    ffn_dim_multiplier, rounded up to a multiple of multiple_of."""
    dim = params["dim"]
    hidden = int(2 * (4 * dim) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    m = params.get("multiple_of", 256)
    hidden = m * ((hidden + m - 1) // m)
    if params.get("use_scaled_rope"):
        # Llama 3.1+'s params.json names the scaling but not its factor (8 for 3.1, 32 for 3.2 in
        # Meta's code): refuse rather than guess; the Hugging Face config carries the numbers.
        raise CheckpointError("params.json: use_scaled_rope=true (Llama 3.1+) is not supported for Meta's layout; "
                              "use the Hugging Face checkpoint of the same model (config.json has its rope_scaling)")
    return LlamaConfig(dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
                       n_kv_heads=params.get("n_kv_heads") or params["n_heads"], hidden_dim=hidden,
                       vocab_size=vocab_size, norm_eps=params.get("norm_eps", 1e-6),
                       rope_theta=float(params.get("rope_theta", 10000.0)))


def load_meta(path, dtype=torch.float32, device="cpu"):
    params_file = os.path.join(path, "params.json")
    with open(params_file) as f:
        params = json.load(f)
    for key in ("dim", "n_layers", "n_heads"):
        if key not in params:
            raise CheckpointError(f"{params_file}: missing key {key!r}")
    shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not shards:
        raise CheckpointError(f"{path}: has params.json but no consolidated.*.pth")
    parts = [read_torch(s) for s in shards]
    # Gather each tensor from every shard and concatenate along its model-parallel split dimension.
    tensors, origin = {}, {}
    for key in parts[0]:
        if key == "rope.freqs":          # cached RoPE table in LLaMA-1 checkpoints; recomputed here
            continue
        ours, split = map_meta_key(key, shards[0])
        for s, p in zip(shards, parts):
            if key not in p:
                raise CheckpointError(f"{s}: missing tensor {key!r} (present in {shards[0]})")
        pieces = [p[key] for p in parts]
        tensors[ours] = pieces[0] if split is None or len(pieces) == 1 else torch.cat(pieces, dim=split)
        origin[ours] = shards[0] if len(shards) == 1 else f"{path}/consolidated.*.pth"
    if "embed_tokens.weight" not in tensors:
        raise CheckpointError(f"{shards[0]}: missing tensor 'tok_embeddings.weight'")
    vocab = params.get("vocab_size", -1)
    vocab = vocab if vocab > 0 else tensors["embed_tokens.weight"].shape[0]   # LLaMA-1 says -1
    cfg = llama_config_from_meta(params, vocab)
    for i in range(cfg.n_layers):
        for proj, heads in (("q_proj", cfg.n_heads), ("k_proj", cfg.n_kv_heads)):
            key = f"layers.{i}.self_attn.{proj}.weight"
            if key in tensors and tensors[key].shape[0] % heads == 0:
                tensors[key] = meta_to_hf_rows(tensors[key], heads)
    with torch.device("meta"):
        model = Llama(cfg)
    return assign_weights(model, tensors, origin, dtype, device)


def load_llama2c(file, dtype=torch.float32, device="cpu"):
    """llama2.c's export format (karpathy/llama2.c export.py): version 0 (7 int32 header, weights
    stacked per kind, RoPE tables after the final norm) or version 1 (256-byte header with magic
    "ak42", norms first, no RoPE tables). Matrices are nn.Linear (out, in), float32."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(256)
    if len(head) < 28:
        raise CheckpointError(f"{file}: truncated llama2.c header ({size} bytes)")
    magic = struct.unpack("<I", head[:4])[0]
    if magic == 0x616B3432:                                           # "ak42": version >= 1
        version = struct.unpack("<i", head[4:8])[0]
        if version != 1:
            raise CheckpointError(f"{file}: llama2.c version {version} is not supported (0 and 1 are)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", head[8:36])
        shared = bool(head[36])
        offset = 256
    else:
        version = 0
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", head[:28])
        shared, vocab = vocab > 0, abs(vocab)
        offset = 28
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
        raise CheckpointError(f"{file}: not a llama2.c checkpoint (header {dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len})")
    cfg = LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=hidden,
                      vocab_size=vocab, norm_eps=1e-5, max_seq_len=seq_len, tie_embeddings=shared)
    L, hd, kv_dim = n_layers, dim // n_heads, n_kv * (dim // n_heads)
    data = torch.from_file(file, shared=False, size=size // 4, dtype=torch.float32) if size % 4 == 0 else None
    if data is None:
        raise CheckpointError(f"{file}: size {size} is not a whole number of float32 values")
    data = data[offset // 4:]

    def take(name, *shape):
        nonlocal data
        n = math.prod(shape)
        if data.numel() < n:
            raise CheckpointError(f"{file}: truncated: tensor {name!r} {shape} needs {n} floats, "
                                  f"{data.numel()} left")
        t, data = data[:n].view(shape), data[n:]
        return t

    w = {}
    if version == 0:
        order = ["emb", "attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm", "rope"]
    else:
        order = ["attn_norm", "ffn_norm", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    shapes = {"emb": (vocab, dim), "attn_norm": (L, dim), "ffn_norm": (L, dim), "norm": (dim,),
              "wq": (L, dim, dim), "wk": (L, kv_dim, dim), "wv": (L, kv_dim, dim), "wo": (L, dim, dim),
              "w1": (L, hidden, dim), "w2": (L, dim, hidden), "w3": (L, hidden, dim),
              "rope": (2, seq_len, hd // 2)}
    for name in order:
        w[name] = take(name, *shapes[name])
    if not shared:
        w["output"] = take("output", vocab, dim)
    if data.numel():
        raise CheckpointError(f"{file}: {data.numel()} float32 values left after the last tensor "
                              f"(header does not match the file)")

    tensors = {"embed_tokens.weight": w["emb"], "norm.weight": w["norm"]}
    if not shared:
        tensors["lm_head.weight"] = w["output"]
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
    for i in range(L):
        for src, dst in names.items():
            t = w[src][i]
            if src == "wq":
                t = meta_to_hf_rows(t, n_heads)
            elif src == "wk":
                t = meta_to_hf_rows(t, n_kv)
            tensors[f"layers.{i}.{dst}.weight"] = t
    with torch.device("meta"):
        model = Llama(cfg)
    return assign_weights(model, tensors, {k: file for k in tensors}, dtype, device)
