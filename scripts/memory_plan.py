"""The memory plan of a sharded (FSDP, train.py --fsdp) fine-tuning run on 80 GB GPUs, and the
check of its formulas against measured numbers on a small model.

    python scripts/memory_plan.py            # the table of docs/performance.md ("Memory plan")
    python scripts/memory_plan.py --check    # formulas against tensors measured on small models

Per GPU, with N GPUs, the frozen base in bf16 and the method's tensors in fp32 (train.py's recipe):
  frozen weights   2·P_base / N bytes                        (every tensor sharded, fsdp.py)
  trainable        16·P_train / N bytes: fp32 weights 4, gradients 4, AdamW's two moments 8
  activations      bytes saved for the backward of one micro-batch of B×T tokens:
                   without checkpointing L·A(T) with A(T) = B·T·(a·d + b·f) + B·H·T·c (per layer,
                   the coefficients measured once on this code, see --check); with checkpointing
                   L·B·T·d·2 (each layer's input) + A(T) (one layer recomputed at a time)
  gathered layer   one block's full bf16 weights while it computes (FSDP's all-gather), ×2 for prefetch
Full fine-tuning is not in the table: it keeps fp32 weights (4 + 4 + 8 bytes per parameter, sharded).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import methods  # noqa: E402
import model as M  # noqa: E402
from checkpoint import build  # noqa: E402
from loss import lm_loss  # noqa: E402

GB = 2 ** 30
# saved-for-backward bytes per token and layer in bf16 with LoRA on its default targets, = a·d + b·f
# + c·heads, measured by
# `--check` on this code (CPU; a GPU's SDPA kernels save about the same: q, k, v, the output and
# one logsumexp per head and token)
A, B_, C = 40.0, 12.0, 4.0


def activations(cfg, tokens, checkpointing):
    per_layer = tokens * (A * cfg.dim + B_ * cfg.hidden_dim + C * cfg.n_heads)
    if checkpointing:
        return cfg.n_layers * tokens * cfg.dim * 2 + per_layer
    return cfg.n_layers * per_layer


def plan(models=("llama-7b", "llama-13b", "llama2-70b"), method_names=("lora", "dora", "quanta", "lorada_la",
                                                                        "lorada_q"), tokens=4 * 256):
    """Rows (model, method, trainable %, per-GPU GB for N = 1, 2, 4, 8 with and without checkpointing)."""
    rows = []
    for name in models:
        for method in method_names:
            m = methods.apply_method(build(name), method)
            P_train, P_all = methods.count_parameters(m)
            P_base = P_all - P_train
            cfg = m.cfg
            block = P_base / cfg.n_layers * 2                    # one block's bf16 weights, gathered
            cells = []
            for n in (1, 2, 4, 8):
                fixed = 2 * P_base / n + 16 * P_train / n + (2 * block if n > 1 else 0)
                cells.append(((fixed + activations(cfg, tokens, False)) / GB,
                              (fixed + activations(cfg, tokens, True)) / GB))
            rows.append((name, method, 100 * P_train / P_all, 2 * P_base / GB, cells))
    return rows


def markdown(rows, tokens):
    out = [f"Per GPU, GB, micro-batch {tokens} tokens (4 × 256: LLM-Adapters' cutoff); "
           "no checkpointing / with (✓ fits 80 GB with checkpointing, ✗ does not):", "",
           "| model | method | trainable % | bf16 weights, all | 1 GPU | 2 GPUs | 4 GPUs | 8 GPUs |",
           "|---|---|---|---|---|---|---|---|"]
    for name, method, pct, weights, cells in rows:
        fmt = [f"{a:.0f} / {b:.0f} {'✓' if b < 80 else '✗'}" for a, b in cells]
        out.append(f"| {name} | {method} | {pct:.3f} | {weights:.0f} | " + " | ".join(fmt) + " |")
    return "\n".join(out)


def saved_bytes(cfg, tokens_shape, method="lora"):
    """Bytes the autograd graph saves for the backward of one forward + loss (bf16 base)."""
    torch.manual_seed(0)
    m = M.Llama(cfg).to(torch.bfloat16)
    methods.apply_method(m, method, **({"lora_r": 4} if method == "lora" else {})).train()
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    ids = torch.randint(3, cfg.vocab_size, tokens_shape)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(m(ids, return_hidden=True)[:, :-1], m.lm_head, ids[:, 1:])
    loss.backward()
    return sum(v for (ptr, _), v in saved.items() if ptr not in params)


def check():
    """Measure saved activation bytes per layer at three shapes; compare with the formula."""
    shape = (2, 128)
    tokens = shape[0] * shape[1]
    print("| d | f | heads | measured per layer (MB) | formula (MB) | error |")
    print("|---|---|---|---|---|---|")
    for d, f, h in ((256, 688, 4), (512, 1376, 8), (768, 2048, 12)):
        per = []
        for layers in (2, 4):                                   # the difference removes the head and the loss
            cfg = M.LlamaConfig(dim=d, n_layers=layers, n_heads=h, n_kv_heads=h, hidden_dim=f, vocab_size=1000)
            per.append(saved_bytes(cfg, shape))
        measured = (per[1] - per[0]) / 2
        formula = tokens * (A * d + B_ * f + C * h)
        print(f"| {d} | {f} | {h} | {measured / 2 ** 20:.2f} | {formula / 2 ** 20:.2f} | "
              f"{100 * (formula - measured) / measured:+.0f}% |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    if args.check:
        check()
    else:
        print(markdown(plan(), 4 * 256))
