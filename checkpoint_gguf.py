"""Reading GGUF files (llama.cpp's format) of the LLaMA architecture: `checkpoint.load(path)` calls
`load_gguf` for a .gguf file, or for a directory holding exactly one (and no config.json).

The layout (ggml's docs/gguf.md): a header, typed key-value metadata (`general.architecture`,
`llama.embedding_length`, ..., `tokenizer.ggml.*`), a table of tensor infos (name, dims, ggml type,
offset) and the aligned tensor data. Dims are listed innermost first (ne[0] is the contiguous
dimension), so an nn.Linear weight of shape (out, in) is listed as [in, out]. A tensor is stored as
F32, F16 or BF16, or quantised in blocks along its rows (Q8_0: 32 int8 values and an fp16 scale;
Q4_0: 32 4-bit values and a scale; Q4_1: a scale and a minimum). The `gguf` package (ggml-org's
reader, an optional extra: requirements-gguf.txt) parses the file through a read-only memory map
and dequantises with numpy; here it is done tensor by tensor, each converted to the model's dtype
and device at once, so at most one float32 tensor is held beside the model. Nothing is written.

llama.cpp's convert_hf_to_gguf.py (LlamaModel.modify_tensors -> LlamaModel.permute) reorders the
rows of attn_q (n_head heads) and attn_k (n_head_kv heads) from Hugging Face's rotate_half layout,
which rotates the pairs (i, i + hd/2) of each head, back to Meta's interleaved pairs (2i, 2i+1),
which ggml's RoPE rotates:

    w.reshape(n_head, 2, out // n_head // 2, in).swapaxes(1, 2).reshape(out, in)

Reading undoes it with checkpoint_meta.meta_to_hf_rows, the permutation used for Meta's checkpoints.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from checkpoint import CheckpointError, assign_weights
from checkpoint_meta import meta_to_hf_rows
from model import Llama, LlamaConfig

GGUF_MISSING = "reading GGUF files needs the gguf package: pip install -r requirements-gguf.txt"

# The ggml types read (all dequantised by the gguf package with numpy); any other is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# GGUF tensor name -> ours (llama.cpp's gguf-py/gguf/tensor_mapping.py, LLaMA's tensors).
GGUF_KEYS = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",                   # absent: tied to token_embd
    "blk.{}.attn_norm.weight": "layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.down_proj.weight",
}
# Per-frequency RoPE factors: llama.cpp writes Llama 3.1+'s llama3 scaling as this tensor, not as
# metadata; LlamaConfig.rope_scaling cannot hold arbitrary factors, so only all-ones is accepted.
ROPE_FREQS = "rope_freqs.weight"


def map_gguf_key(name: str, file: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    pattern = f"blk.{{}}.{m.group(2)}" if m else name
    if pattern not in GGUF_KEYS:
        raise CheckpointError(f"{file}: unexpected tensor {name!r} in a LLaMA GGUF file "
                              f"(known: {', '.join(GGUF_KEYS)}, {ROPE_FREQS})")
    return GGUF_KEYS[pattern].format(m.group(1)) if m else GGUF_KEYS[pattern]


def read_metadata(reader, gguf) -> dict:
    """The key-value metadata as Python values. FLOAT32 values are given as the shortest decimal
    that is the same float32 (9.999999747e-06 -> 1e-05): the number the converter wrote, so that
    norm_eps equals the original config's (and the presets' of model.py)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                              "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue                                      # the header, and the (long) vocabulary
        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))
        meta[key] = value
    return meta


def llama_config_from_gguf(meta: dict, shapes: dict[str, tuple], file: str) -> LlamaConfig:
    """The metadata (read_metadata) and the tensors' shapes -> config. The vocabulary size is the
    token embedding's rows; the embeddings are tied when there is no output.weight."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{file}: architecture {arch!r} is not supported (only 'llama')")
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{file}: missing tensor 'token_embd.weight' (the token embedding)")
    if meta.get("split.count", 1) > 1:
        raise CheckpointError(f"{file}: is part {meta.get('split.no', 0) + 1} of {meta['split.count']} of a split "
                              f"GGUF file; merge the parts first (llama-gguf-split --merge)")
    for key in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length",
                "attention.layer_norm_rms_epsilon", "context_length"):
        if f"llama.{key}" not in meta:
            raise CheckpointError(f"{file}: missing metadata key 'llama.{key}'")
    get = lambda key, default=None: meta.get(f"llama.{key}", default)
    for key in ("attention.head_count", "attention.head_count_kv", "feed_forward_length"):
        if isinstance(get(key), list):
            raise CheckpointError(f"{file}: llama.{key} differs between layers ({get(key)}); not supported")
    if get("expert_count", 0):
        raise CheckpointError(f"{file}: llama.expert_count={get('expert_count')}: mixture-of-experts models "
                              f"are not supported")
    dim, n_heads = get("embedding_length"), get("attention.head_count")
    if dim % n_heads:
        raise CheckpointError(f"{file}: llama.embedding_length {dim} is not a multiple of "
                              f"llama.attention.head_count {n_heads}")
    head_dim = dim // n_heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if get(key, head_dim) != head_dim:
            raise CheckpointError(f"{file}: llama.{key}={get(key)} is not supported (must be the head dimension "
                                  f"{head_dim} = embedding_length / head_count)")
    return LlamaConfig(dim=dim, n_layers=get("block_count"), n_heads=n_heads,
                       n_kv_heads=get("attention.head_count_kv") or n_heads, hidden_dim=get("feed_forward_length"),
                       vocab_size=shapes["token_embd.weight"][0], norm_eps=get("attention.layer_norm_rms_epsilon"),
                       rope_theta=float(get("rope.freq_base", 10000.0)), max_seq_len=get("context_length"),
                       tie_embeddings="output.weight" not in shapes, rope_scaling=rope_scaling_from_gguf(meta, file))


def rope_scaling_from_gguf(meta: dict, file: str) -> dict | None:
    """llama.rope.scaling.* -> LlamaConfig.rope_scaling, as llama.cpp reads them (llama-model.cpp):
    the type defaults to linear, the factor to rope.scaling.factor, else the older rope.scale_linear,
    0 or absent meaning 1. Linear scaling is position interpolation, HF's "linear": every frequency
    divided by the factor (llama.cpp's freq_scale = 1/factor). Any other type (yarn, longrope) is refused."""
    kind = meta.get("llama.rope.scaling.type", "linear")
    factor = meta.get("llama.rope.scaling.factor") or meta.get("llama.rope.scale_linear") or 0.0
    if kind in ("none", "linear") and factor in (0.0, 1.0):
        return None
    if kind != "linear":
        raise CheckpointError(f"{file}: RoPE scaling {kind!r} (llama.rope.scaling.type, factor {factor}) "
                              f"is not supported (supported: none, linear)")
    return {"rope_type": "linear", "factor": float(factor)}


def load_gguf(file: str, dtype=torch.float32, device="cpu"):
    """A LLaMA GGUF file -> model.Llama with its weights dequantised to float32, then cast to
    `dtype` (None: float32) on `device` (None: cpu). The model is built on the meta device and
    filled by checkpoint.assign_weights, as the other layouts are."""
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{file}: {GGUF_MISSING}") from None
    dtype, device = dtype or torch.float32, device or "cpu"
    try:
        reader = gguf.GGUFReader(file, "r")             # a read-only memory map
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read as a GGUF file ({type(e).__name__}: {e})") from None
    infos = {t.name: t for t in reader.tensors}
    shape = lambda t: tuple(reversed(t.shape.tolist()))  # ne[0] innermost -> torch's (out, in)
    cfg = llama_config_from_gguf(read_metadata(reader, gguf), {n: shape(t) for n, t in infos.items()}, file)
    with torch.device("meta"):
        model = Llama(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # Names, types and shapes are checked for every tensor before any is dequantised.
    names = {}
    for name, t in infos.items():
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has quantisation type {t.tensor_type.name}, which is "
                                  f"not supported (supported: {', '.join(SUPPORTED_TYPES)})")
        if name == ROPE_FREQS:
            continue
        ours = names[name] = map_gguf_key(name, file)
        if ours not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {name!r} ({ours!r}) {shape(t)}: the file's metadata "
                                  f"says {cfg.n_layers} layers")
        if shape(t) != expected[ours]:
            raise CheckpointError(f"{file}: tensor {name!r} ({ours!r}) has shape {shape(t)} (GGUF dims "
                                  f"{t.shape.tolist()}, innermost first), the model expects {expected[ours]}")

    def dequantise(t) -> torch.Tensor:                 # F32 comes back as a view of the read-only map: copied
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape(t))
        return torch.from_numpy(w if w.flags.writeable and w.flags.c_contiguous else w.copy())

    if ROPE_FREQS in infos and not bool((dequantise(infos[ROPE_FREQS]) == 1).all()):
        raise CheckpointError(f"{file}: tensor {ROPE_FREQS!r} holds per-frequency RoPE factors (llama.cpp's form "
                              f"of Llama 3.1+'s llama3 scaling), which are not supported; load the Hugging Face "
                              f"checkpoint of the model (its config.json has the rope_scaling)")
    heads = {"q_proj": cfg.n_heads, "k_proj": cfg.n_kv_heads}
    tensors = {}
    for name, ours in names.items():
        w = dequantise(infos[name])
        proj = ours.split(".")[-2]
        if proj in heads and w.shape[0] % (2 * heads[proj]) == 0:     # undo llama.cpp's Q/K row permutation
            w = meta_to_hf_rows(w, heads[proj])
        tensors[ours] = w.to(device=device, dtype=dtype)
    return assign_weights(model, tensors, {k: file for k in tensors}, dtype, device)
