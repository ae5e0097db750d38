"""Does LMAM's map learn at the paper's learning rate? A measurement on a real pretrained model.

    python scripts/lmam_learning.py            # the README's table, about 2 minutes on 2 CPU cores

The task: a fixed-lag copy. Each sequence is m random tokens followed by the same m tokens again,
and the loss is taken on the repeated half. Attending from position i to position i − m + 1 solves
it, which is exactly what an additive attention map can express. The model is karpathy's
stories260K (../shared/data/stories260K), frozen; only LMAM trains (h_s = 8, r = 2, n = 2m = 32),
with AdamW at lr 1e-4 (Tables 17 and 19) for 300 steps of 16 sequences.

Candidates, each at three of the paper's scales (LLaMA-7B's 1/(4096·600), RoBERTa's 1/255,
BART's 1):
  paper      Wa, Wb ~ N(0, 1), Attn_s = s·(Wa + PE)(Wb + PE)       (the literal reading)
  literal-0  the same parametrisation, started at Attn_s = 0: Wb = −PE, Wa ~ N(0, 1/(r·s))
  lr×1/√s    literal-0 with LMAM's learning rate multiplied by 1/√s
  zero       √s absorbed into the stored factors, Attn_s = 0 at the start (this code's default)
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import methods                                   # noqa: E402
from checkpoint import load                      # noqa: E402
from lmam import LMAM                            # noqa: E402

STORIES = os.path.join(os.path.dirname(ROOT), "shared", "data", "stories260K", "stories260K.bin")
SCALES = {"1/(4096·600)": 1 / (4096 * 600), "1/255": 1 / 255, "1": 1.0}
CANDIDATES = ("paper", "literal-0", "lr×1/√s", "zero")


def copy_batch(gen, batch, m, vocab=512):
    x = torch.randint(3, vocab, (batch, m), generator=gen)
    return torch.cat([x, x], 1)                                        # (B, 2m): the second half repeats


def copy_loss(model, x, m):
    logits = model(x)
    return F.cross_entropy(logits[:, m:-1].reshape(-1, logits.shape[-1]), x[:, m + 1:].reshape(-1))


def run(candidate="zero", scale=1 / (4096 * 600), lr=1e-4, steps=300, heads=8, rank=2, m=16, batch=16,
        seed=0, path=STORIES):
    """Train only LMAM on the copy task; returns (held-out loss before, after, max |Attn_s| after)."""
    torch.manual_seed(seed)
    model = load(path).train()
    init = "zero" if candidate == "zero" else "paper"
    methods.apply_method(model, "lmam", lmam_heads=heads, lmam_rank=rank, lmam_len=2 * m, lmam_scale=scale,
                         lmam_init=init)
    maps = [mod for mod in model.modules() if isinstance(mod, LMAM)]
    if candidate in ("literal-0", "lr×1/√s"):
        with torch.no_grad():
            for mod in maps:
                mod.wa.normal_(0, (rank * scale) ** -0.5)
                mod.wb.copy_(-mod.pe.expand_as(mod.wb))
    multiplier = scale ** -0.5 if candidate == "lr×1/√s" else 1.0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr * multiplier, weight_decay=0.0)
    held_out = copy_batch(torch.Generator().manual_seed(123), 64, m)

    def evaluate():
        model.eval()
        with torch.no_grad():
            loss = copy_loss(model, held_out, m).item()
        model.train()
        return loss

    before, gen = evaluate(), torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = copy_loss(model, copy_batch(gen, batch, m), m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        size = max(mod.attn_map().abs().max().item() for mod in maps)
    return before, evaluate(), size


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print("| s | candidate | held-out loss, step 0 → 300 | max \\|Attn_s\\| after |")
    print("|---|---|---|---|")
    for s_name, s in SCALES.items():
        for c in CANDIDATES:
            t = time.time()
            before, after, size = run(c, s)
            print(f"| {s_name} | {c} | {before:.2f} → {after:.2f} | {size:.3g} |", flush=True)
