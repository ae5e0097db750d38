"""Pictures of what LMAM does, and of training runs. The paper argues with such pictures: Figures
1 and 3 (an attention map, the learned Attn_s and their sum, with the share of negative entries,
"Neg Rat") and Figure 4 (accuracy over h_s × r).

    python plots.py attention --model M --adapter A --text "the grass is green." --layer -1 --head 0 --out attn.png
    python plots.py attention --model M --adapter A --text_file prompt.txt --out attn.png   # a text with newlines
    python plots.py map --model M --adapter A --out map.svg              # every layer's learned Attn_s
    python plots.py curves runs/la runs/lora --out curves.png            # loss, validation, lr, tokens/s
    python plots.py sweep runs/fig4/results.json --out fig4.png          # study.py's grid (Figure 4)
    python plots.py study runs/smollm2/results.json --out study.png      # scripts/real_model_study.py

attention  For one input text, one layer and one head: softmax(QKᵀ/√d), Attn_s as applied to this
           input, and their sum (what the layer attends with), side by side (Figure 1). Prints Neg
           Rat of the sum and of Attn_s. LLaMA, RoBERTa, and BART's encoder (where LMAM sits,
           Table 15). Without --adapter, Attn_s is 0.
map        The learned Attn_s (h_s, n, n) of every layer, as LMAM.attn_map() returns it, with each
           map's Neg Rat: rows are layers, columns the h_s maps (Figure 3, which has h_s = 1).
curves     From each run's log.jsonl (train.py): training loss, validation score, learning rate,
           tokens/s, and max |Attn_s| (the largest over layers) when the runs have LMAM.
sweep      A heatmap of a metric over one or two swept hyperparameters (study.py sweep).
study      The real-model study's average accuracies with their 95% intervals, per protocol and
           prompt layout, against chance (scripts/real_model_study.py, docs/results.md).

Maps use a diverging colormap centred at 0 (red: positive, blue: negative, as in the paper);
entries a query cannot see (the causal upper triangle) are grey. The output's format follows
--out's extension (.png, .svg or .pdf).

matplotlib is an optional extra (pip install -r requirements-plots.txt). It is imported only inside
the drawing functions, on the Agg backend (files only, no display), so `import plots` and
`negative_ratio` work without it; every plot command without it stops with how to install it.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

import methods
import model as M
from checkpoint import CheckpointError, load, read_safetensors_header
from runs import read_log
from tokenizer import load_tokenizer

INSTALL = "pip install -r requirements-plots.txt"
FORMATS = (".png", ".svg", ".pdf")


# ----------------------------------------------------------------------------- matplotlib, lazily

def pyplot():
    """matplotlib.pyplot on the Agg backend, or SystemExit saying how to install matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")                         # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"plots.py: the plots need matplotlib, which is not installed ({e}); "
                         f"{INSTALL}") from None
    return plt


def have_matplotlib() -> bool:
    """Whether the plots can be drawn here (demo.py asks before drawing)."""
    try:
        pyplot()
        return True
    except SystemExit:
        return False


def diverging(color_bad="0.85"):
    """The colormap of every map: red positive, blue negative, white 0; masked entries grey."""
    import matplotlib
    return matplotlib.colormaps["RdBu_r"].with_extremes(bad=color_bad)


def save(fig, out, dpi):
    """Write the figure; the format follows out's extension."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    print(f"wrote {out}")
    return out


def check_out(out):
    if os.path.splitext(out)[1].lower() not in FORMATS:
        raise ValueError(f"--out {out}: expected a file name ending in {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------- Neg Rat

def to_numpy(x):
    """A tensor or an array-like as a numpy array (floats as float32, masks stay boolean)."""
    if torch.is_tensor(x):
        x = x.detach().cpu()
        return (x if x.dtype == torch.bool else x.float()).numpy()
    return np.asarray(x)


def negative_ratio(a, mask=None) -> float:
    """Neg Rat (Figures 1 and 3): the share of a map's entries that are negative (< 0), counted over
    the entries where `mask` is True (the real query-key pairs a query can see), all if None."""
    a = to_numpy(a)
    keep = np.ones(a.shape, dtype=bool) if mask is None else np.broadcast_to(to_numpy(mask).astype(bool), a.shape)
    n = int(keep.sum())
    if n == 0:
        raise ValueError("negative_ratio: the mask selects no entry")
    return float((a[keep] < 0).sum()) / n


# ----------------------------------------------------------------------------- model, adapter, maps

def head_labels(adapter):
    """A RoBERTa adapter holds its trained GLUE head: its number of labels (else None)."""
    header = read_safetensors_header(adapter)[0]
    head = header.get("head.out_proj.weight")
    return head["shape"][0] if head else None


def load_model(model_path, adapter=None, tokenizer=None):
    """The base checkpoint with the adapter's method and tensors (eval mode, not merged: the map is
    computed from its factors), and its tokenizer."""
    if adapter and not os.path.isfile(adapter):
        what = ("a folder; plots.py reads an adapter file of train.py (ADAPTER.safetensors), not a peft folder"
                if os.path.isdir(adapter) else "no such file")
        raise ValueError(f"--adapter {adapter}: {what}")
    model = load(model_path, num_labels=head_labels(adapter) if adapter else None)
    if adapter:
        methods.load_adapter(model, adapter)
    model.eval()
    tok = load_tokenizer(tokenizer or (model_path if os.path.isdir(model_path) else os.path.dirname(model_path)))
    return model, tok


def self_attentions(model):
    """The self-attention modules LMAM attaches to: LLaMA's and RoBERTa's layers, BART's encoder."""
    layers = model.encoder.layers if isinstance(model, M.Bart) else model.layers
    return [layer.self_attn for layer in layers]


def layer_index(model, layer):
    n = len(self_attentions(model))
    if not -n <= layer < n:
        raise ValueError(f"--layer {layer}: this model has {n} self-attention layers (0 to {n - 1}; -1 is the last)")
    return layer % n


def visible(model, T):
    """(T, T) True where a query sees a key: the causal lower triangle for LLaMA, all for encoders."""
    full = torch.ones(T, T, dtype=torch.bool)
    return full.tril() if isinstance(model, M.Llama) else full


@torch.no_grad()
def layer_probs(model, ids, layer):
    """One layer's attention probabilities (H, T, S) for one unpadded sequence `ids` (T,), as the
    model attends with them (need_weights=True: softmax + Attn_s where a map is attached)."""
    x = ids[None]
    mask = torch.ones_like(x)
    if isinstance(model, M.Llama):
        _, probs = model(x, attention_mask=mask, need_weights=True)
    else:
        _, probs = model.encode(x, mask, need_weights=True)
    return probs[layer][0].float()


def attention_parts(model, ids, layer):
    """(softmax, Attn_s as applied, their sum) of one layer for one input, each (H, T, T).

    The sum is what the layer attends with. The softmax part is the same layer's softmax(QKᵀ/√d) in
    the same forward pass: a second pass takes this layer's map off (the layers before it keep
    theirs, so its queries and keys do not change). Attn_s as applied = sum − softmax: the map's
    entries at this input's token positions, zero off the map (for the ¬N variant, what the map
    changes inside the softmax). Keys of a prefix (prefix tuning), if any, are left out."""
    layer = layer_index(model, layer)
    attn = self_attentions(model)[layer]
    total = layer_probs(model, ids, layer)
    saved, attn.attn_map = attn.attn_map, None
    try:
        softmax = layer_probs(model, ids, layer)
    finally:
        attn.attn_map = saved
    T = ids.shape[0]
    total, softmax = total[..., -T:], softmax[..., -T:]              # prefix keys come first
    return softmax, total - softmax, total


def learned_maps(model):
    """[Attn_s (h_s, n, n) of every layer], as LMAM.attn_map() computes it (Eq. 7-11)."""
    maps = [attn.attn_map for attn in self_attentions(model)]
    if all(m is None for m in maps):
        name = getattr(model, "peft_method", None)
        raise ValueError(f"this model has no LMAM (method: {name['name'] if name else 'none'}): "
                         f"give --adapter a file trained with an LMAM method (lmam, lorada_*, *+lmam)")
    with torch.no_grad():
        return [None if m is None else m.attn_map().detach().float().cpu() for m in maps]


def token_labels(tok, ids):
    """A short label per token for the axes: its text (␣ for a space), or <s> / </s> / #id where it
    has none."""
    special = {getattr(tok, "bos_id", None): "<s>", getattr(tok, "eos_id", None): "</s>"}
    labels = []
    for i in ids:
        raw = tok.decode([i]).replace("\n", "\\n")
        labels.append(raw.strip()[:12] or ("␣" if raw else special.get(i, f"#{i}")))
    return labels


# ----------------------------------------------------------------------------- drawing

def draw_map(ax, a, keep, title, labels=None):
    """One map on a diverging scale centred at 0, with its colorbar; entries not in `keep` grey."""
    plt = pyplot()
    a = to_numpy(a)
    lim = float(np.abs(a[to_numpy(keep)]).max()) if keep is not None else float(np.abs(a).max())
    lim = lim or 1e-12                                                   # an all-zero map: still a scale
    shown = np.ma.masked_where(~to_numpy(keep), a) if keep is not None else a
    im = ax.imshow(shown, cmap=diverging(), vmin=-lim, vmax=lim, interpolation="nearest")
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    if labels is not None and len(labels) <= MAX_LABELS:               # every token's text (the figure grows)
        size = label_size(len(labels))
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=size)
        ax.set_yticks(range(len(labels)), labels, fontsize=size)
    return im


MAX_LABELS = 256          # texts up to this many tokens get each token's text on both axes


def label_size(n):
    """The font size of n token labels, and with it the size of a panel (panel_inches)."""
    return 7 if n <= 40 else 5


def panel_inches(n):
    """A map panel's side: 5 inches, more for a long labelled text, so each row and column gets
    about a label's height and stays visible (0.085 inch, 6 points, per token at font size 5)."""
    return max(5.0, 1.5 + 0.085 * n) if n <= MAX_LABELS else 5.0


def draw_attention(softmax, attn_s, total, keep, labels=None, title="", out="attention.png", dpi=150):
    """Figure 1's three panels for one head: (a) softmax, (b) Attn_s, (c) their sum; Neg Rat in the
    titles of (b) and (c), over the visible entries `keep`."""
    plt = pyplot()
    side = panel_inches(len(labels) if labels is not None else 0)
    fig, axes = plt.subplots(1, 3, figsize=(3 * side, side), layout="constrained")
    neg_s, neg_sum = negative_ratio(attn_s, keep), negative_ratio(total, keep)
    draw_map(axes[0], softmax, keep, "(a) softmax(QKᵀ/√d)", labels)
    draw_map(axes[1], attn_s, keep, f"(b) LMAM's Attn_s (Neg Rat: {100 * neg_s:.2f}%)", labels)
    draw_map(axes[2], total, keep, f"(c) softmax + Attn_s (Neg Rat: {100 * neg_sum:.2f}%)", labels)
    if title:
        fig.suptitle(title)
    return save(fig, out, dpi)


def plot_attention(model, tok, text, layer=-1, head=0, out="attention.png", title=None, dpi=150, max_tokens=None):
    """Figure 1 for `text`: encode it, split the layer's attention into its parts, print Neg Rat and
    draw the three panels of `head`. Returns {"neg_sum": ..., "neg_attn_s": ..., "tokens": T}."""
    check_out(out)
    ids = torch.tensor(tok.encode(text)[:max_tokens])
    if len(ids) == 0:
        raise ValueError("--text: encodes to no token")
    softmax, attn_s, total = attention_parts(model, ids, layer)
    H = total.shape[0]
    if not 0 <= head < H:
        raise ValueError(f"--head {head}: this model's layers have {H} attention heads (0 to {H - 1})")
    keep = visible(model, len(ids))
    stats = {"neg_sum": negative_ratio(total[head], keep), "neg_attn_s": negative_ratio(attn_s[head], keep),
             "max_abs_attn_s": float(attn_s[head][keep].abs().max()), "tokens": len(ids)}
    layer = layer_index(model, layer)
    print(f"layer {layer}, head {head}, {len(ids)} tokens; negative entries over the {int(keep.sum())} visible "
          f"ones: softmax + Attn_s {100 * stats['neg_sum']:.2f}%, Attn_s {100 * stats['neg_attn_s']:.2f}% "
          f"(max |Attn_s| {stats['max_abs_attn_s']:.3g})")
    method = getattr(model, "peft_method", None)
    title = title or (f"{type(model).__name__}{' + ' + method['name'] if method else ''}: "
                      f"layer {layer}, head {head}")
    draw_attention(softmax[head], attn_s[head], total[head], keep, token_labels(tok, ids.tolist()), title, out, dpi)
    return stats


def parse_list(text, flag):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,3,11") from None


def plot_maps(model, out="map.png", layers=None, maps=None, title=None, dpi=150, clip=99.0):
    """Figure 3's view of the map itself: Attn_s of the chosen layers (rows) and maps (columns), one
    shared scale centred at 0, so layers compare. A few entries are often much larger than the
    rest: the scale ends at the `clip` percentile of |Attn_s| (100: the maximum) and larger entries
    saturate. Prints max |Attn_s| and Neg Rat of each map."""
    check_out(out)
    all_maps = learned_maps(model)
    layers = [layer_index(model, i) for i in (layers if layers is not None else range(len(all_maps)))]
    layers = [i for i in layers if all_maps[i] is not None]
    h_s, n = all_maps[layers[0]].shape[:2]
    maps = maps if maps is not None else list(range(h_s))
    if any(not 0 <= j < h_s for j in maps):
        raise ValueError(f"--maps {maps}: LMAM has h_s={h_s} maps (0 to {h_s - 1})")
    if len(layers) * len(maps) > 256:
        raise ValueError(f"{len(layers)} layers × {len(maps)} maps is {len(layers) * len(maps)} images: choose "
                         f"some with --layers (e.g. 0,{len(all_maps) // 2},{len(all_maps) - 1}) and --maps (e.g. 0,1)")
    keep = visible(model, n).numpy()
    shown = np.stack([all_maps[i][j].numpy()[keep] for i in layers for j in maps])
    top = float(np.abs(shown).max())
    lim = float(np.percentile(np.abs(shown), clip)) or top or 1e-12
    plt = pyplot()
    rows, cols = len(layers), len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 1.2, 1.9 * rows + 0.9), squeeze=False,
                             layout="constrained")
    print(f"| layer | map | max abs(Attn_s) | Neg Rat |\n|---|---|---|---|")
    for r, i in enumerate(layers):
        for c, j in enumerate(maps):
            a = all_maps[i][j].numpy()
            ax = axes[r][c]
            im = ax.imshow(np.ma.masked_where(~keep, a), cmap=diverging(), vmin=-lim, vmax=lim,
                           interpolation="nearest")
            neg = negative_ratio(a, keep)
            print(f"| {i} | {j} | {np.abs(a).max():.4g} | {100 * neg:.1f}% |")
            ax.set_title(f"layer {i}, map {j}\nNeg Rat {100 * neg:.0f}%", fontsize=8)
            ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel("query position", fontsize=8)
            if r == rows - 1:
                ax.set_xlabel("key position", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="Attn_s")
    clipped = f"\nscale ends at the {clip:g}th percentile of |Attn_s| (max {top:.3g})" if lim < top else ""
    fig.suptitle(title or f"LMAM's learned Attn_s (h_s={h_s}, n={n}), red positive, blue negative{clipped}",
                 fontsize=10)
    return save(fig, out, dpi)


# ----------------------------------------------------------------------------- training curves

def plot_curves(run_dirs, out="curves.png", title=None, dpi=150):
    """Training loss, validation score, learning rate and tokens/s of each run, overlaid (legend: the
    run directories' names); a fifth panel with max |Attn_s| (largest over layers) if any run has it."""
    check_out(out)
    runs = {}
    for d in run_dirs:
        name = os.path.basename(os.path.normpath(d))
        runs[name if name not in runs else d] = read_log(d)
    has_map = any("lmam_max_abs" in r for log in runs.values() for r in log)
    panels = [("loss", "training loss"), ("val", "validation"), ("lr", "learning rate"),
              ("tokens_per_s", "tokens/s")] + [("lmam_max_abs", "max |Attn_s| over layers")] * has_map
    plt = pyplot()
    fig, axes = plt.subplots(2, 3 if has_map else 2, figsize=(14 if has_map else 10, 7), layout="constrained")
    axes = axes.ravel()
    for ax, (key, label) in zip(axes, panels):
        for name, log in runs.items():
            if key == "val":                        # val_loss, or val_<metric> (GLUE), as train.py logged it
                for vk in sorted({k for r in log for k in r if k.startswith("val_")}):
                    pts = [(r["step"], r[vk]) for r in log if vk in r]
                    ax.plot(*zip(*pts), marker="o", markersize=3, label=f"{name} ({vk})")
                continue
            pts = [(r["step"], max(r[key]) if key == "lmam_max_abs" else r[key])
                   for r in log if r.get(key) not in (None, [])]
            if pts:
                ax.plot(*zip(*pts), label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in ("loss", "val") and ax.lines:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title or "training runs: " + ", ".join(runs))
    return save(fig, out, dpi)


# ----------------------------------------------------------------------------- sweeps (Figure 4)

def sweep_grid(results, metric=None):
    """(names of the swept hyperparameters, their values, the metric's values as an array over the
    grid, NaN where a point has no result, the metric's name) from study.py's results.json."""
    grid = results.get("grid") if isinstance(results, dict) else None
    if not isinstance(grid, dict) or not grid or not isinstance(results.get("points"), list):
        raise ValueError("not a study.py results.json (expected an object with 'grid' and 'points')")
    names = list(grid)
    if len(names) > 2:
        raise ValueError(f"a heatmap shows one or two swept hyperparameters; this study sweeps {len(names)} "
                         f"({', '.join(names)})")
    values = [grid[k] for k in names]
    z = np.full([len(v) for v in values] + [1] * (2 - len(names)), np.nan)
    for p in results["points"]:
        if not isinstance(p, dict) or not isinstance(p.get("params"), dict) or \
                any(p["params"].get(k) not in values[i] for i, k in enumerate(names)):
            raise ValueError(f"a point that is not on the grid: {json.dumps(p)[:120]}")
        v = p.get("result") if metric is None else p.get("metrics", {}).get(metric)
        if metric is not None and v is None and p.get("metrics"):
            raise ValueError(f"--metric {metric}: point {p['name']} has {', '.join(p['metrics'])}")
        if v is not None:
            idx = tuple(values[i].index(p["params"][k]) for i, k in enumerate(names))
            z[idx + (0,) * (2 - len(names))] = v
    return names, values, z, metric or results.get("metric", "result")


def distinct_format(values, least=4, most=10):
    """A format spec with the fewest significant digits (at least `least`) that writes different
    values differently: a sweep's cells often agree in their first four digits (4.2881, 4.2883)."""
    values = sorted({float(v) for v in values if np.isfinite(v)})
    for digits in range(least, most + 1):
        if len({format(v, f".{digits}g") for v in values}) == len(values):
            return f".{digits}g"
    return f".{most}g"


def plot_sweep(results_path, out="sweep.png", metric=None, title=None, fmt=None, dpi=150):
    """Figure 4: the metric over the grid, one cell per point, annotated with its value (fmt: a
    format spec; default: as many significant digits as tell the cells apart)."""
    check_out(out)
    if not os.path.isfile(results_path):
        raise FileNotFoundError(f"{results_path}: no such file (expected study.py's results.json)")
    try:
        with open(results_path) as f:
            results = json.load(f)
        names, values, z, metric = sweep_grid(results, metric)
    except ValueError as e:
        raise ValueError(f"{results_path}: {e}") from None
    plt = pyplot()
    rows, cols = z.shape
    fig, ax = plt.subplots(figsize=(1.1 * cols + 3, 0.8 * rows + 2), layout="constrained")
    im = ax.imshow(np.ma.masked_invalid(z), cmap="viridis", aspect="auto")
    im.cmap = im.cmap.with_extremes(bad="0.85")
    fmt = fmt or distinct_format(z.ravel())
    bar = fig.colorbar(im, ax=ax, label=metric)
    # Ticks written in full, without an offset label ("+4.288" over the bar, which ran into the title).
    from matplotlib.ticker import ScalarFormatter
    ticks = ScalarFormatter(useOffset=False)
    ticks.set_scientific(False)
    bar.ax.yaxis.set_major_formatter(ticks)
    lo, hi = np.nanmin(z) if np.isfinite(z).any() else 0, np.nanmax(z) if np.isfinite(z).any() else 1
    for i in range(rows):
        for j in range(cols):
            v = z[i, j]
            light = np.isfinite(v) and hi > lo and (v - lo) / (hi - lo) > 0.6     # viridis is light at the top
            ax.text(j, i, "–" if not np.isfinite(v) else format(v, fmt), ha="center", va="center", fontsize=9,
                    color="black" if light else "white")
    ax.set_yticks(range(rows), [str(v) for v in values[0]])
    ax.set_ylabel(names[0])
    if len(names) == 2:
        ax.set_xticks(range(cols), [str(v) for v in values[1]])
        ax.set_xlabel(names[1])
    else:
        ax.set_xticks([])
    better = {True: " (higher is better)", False: " (lower is better)"}.get(results.get("higher_is_better"), "")
    ax.set_title(title or f"{metric} over {' × '.join(names)}" + (better if metric == results.get("metric") else ""))
    return save(fig, out, dpi)


# ----------------------------------------------------------------------------- the command line

def plot_real_model_study(results_path, out, title=None, dpi=130):
    """scripts/real_model_study.py's results.json: each run's average accuracy with its 95% interval,
    per protocol and prompt layout, against chance and the majority label (docs/results.md)."""
    plt = pyplot()
    try:
        with open(results_path) as f:
            results = json.load(f)
        results["runs"], results["chance"], results["majority"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{results_path}: not a results.json of scripts/real_model_study.py ({e})") from None
    panels = [("rank/eval", "rank by label, evaluation prompt"), ("rank/train", "rank by label, training layout"),
              ("text/train", "rank by option text, training layout"),
              ("default/eval", "generation, evaluation prompt"), ("default/train", "generation, training layout")]
    runs = [r for r in results["runs"] if any(k in results["runs"][r] for k, _ in panels)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.32 * len(runs) + 1.6), sharey=True)
    for ax, (key, name) in zip(axes, panels):
        cols = next((v[key]["per_task"] for v in results["runs"].values() if key in v), results["chance"])
        chance = 100 * np.mean([results["chance"][t] for t in cols])
        majority = 100 * np.mean([results["majority"][t] for t in cols])
        for y, r in enumerate(runs):
            v = results["runs"][r].get(key)
            if v is None:
                continue
            lo, hi = 100 * np.array(v["avg_ci"])
            colour = "tab:orange" if "map removed" in r else "tab:blue"
            ax.errorbar(100 * v["avg"], y, xerr=[[100 * v["avg"] - lo], [hi - 100 * v["avg"]]], fmt="o",
                        color=colour, capsize=3)
        ax.axvline(chance, color="grey", ls="--", lw=1, label=f"chance {chance:.1f}%")
        ax.axvline(majority, color="grey", ls=":", lw=1, label=f"majority label {majority:.1f}%")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("average accuracy, % (95% interval)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(runs)), runs, fontsize=8)
    axes[0].invert_yaxis()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(s):
        s.add_argument("--out", required=True, help="the picture: .png, .svg or .pdf")
        s.add_argument("--title", default=None, help="the figure's title (default: one saying what it shows)")
        s.add_argument("--dpi", type=int, default=150, help="resolution of a .png")

    def model_flags(s, adapter_help):
        s.add_argument("--model", required=True, help="the base checkpoint (directory or llama2.c .bin)")
        s.add_argument("--adapter", default=None, help=adapter_help)
        s.add_argument("--tokenizer", default=None,
                       help="tokenizer file (default: the one in the checkpoint directory)")

    a = sub.add_parser("attention", help="softmax, Attn_s and their sum for one input, layer and head (Figure 1)")
    model_flags(a, "an adapter file from train.py (none: the base model, Attn_s = 0)")
    text = a.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the input text (tokenized as the model's tokenizer does)")
    text.add_argument("--text_file", help="a file holding the input text, as it is (newlines and spaces included: "
                                          "an LLM-Adapters prompt)")
    a.add_argument("--layer", type=int, default=-1,
                   help="which self-attention layer (default -1: the last, as Figure 1)")
    a.add_argument("--head", type=int, default=0, help="which attention head (default 0: the first, as Figure 1)")
    a.add_argument("--max_tokens", type=int, default=None, help="keep only the first N tokens of the text")
    common(a)
    m = sub.add_parser("map", help="the learned Attn_s of every layer, as a grid (rows: layers, columns: maps)")
    model_flags(m, "an adapter file trained with an LMAM method")
    m.add_argument("--layers", default=None, help="comma-separated layers to show (default: all)")
    m.add_argument("--maps", default=None, help="comma-separated map indices 0..h_s-1 to show (default: all)")
    m.add_argument("--clip", type=float, default=99.0,
                   help="the colour scale ends at this percentile of |Attn_s| (100: at the maximum)")
    common(m)
    c = sub.add_parser("curves", help="loss, validation, lr, tokens/s (and max |Attn_s|) of runs, from log.jsonl")
    c.add_argument("run_dirs", nargs="+", help="train.py --out_dir directories")
    common(c)
    s = sub.add_parser("sweep", help="a heatmap of a metric over study.py's sweep (Figure 4)")
    s.add_argument("results", help="study.py's results.json")
    s.add_argument("--metric", default=None, help="one of the points' metrics (default: the study's result)")
    s.add_argument("--fmt", default=None, help="format of the numbers in the cells (Python's format spec; default: "
                                               "as many significant digits as tell the cells apart, at least 4)")
    common(s)
    r = sub.add_parser("study", help="the real-model study's accuracies with their intervals (docs/results.md)")
    r.add_argument("results", help="scripts/real_model_study.py's results.json")
    common(r)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    pyplot()                                          # before any work: say how to install matplotlib
    try:
        check_out(args.out)
        if args.command == "attention":
            text = args.text
            if args.text_file is not None:
                with open(args.text_file, encoding="utf-8") as f:
                    text = f.read()
            model, tok = load_model(args.model, args.adapter, args.tokenizer)
            return plot_attention(model, tok, text, args.layer, args.head, args.out, args.title, args.dpi,
                                  args.max_tokens)
        if args.command == "map":
            if not args.adapter:
                raise ValueError("map: give --adapter, a file trained with an LMAM method (without one there "
                                 "is no map)")
            model, _ = load_model(args.model, args.adapter, args.tokenizer)
            layers = parse_list(args.layers, "--layers") if args.layers else None
            maps = parse_list(args.maps, "--maps") if args.maps else None
            return plot_maps(model, args.out, layers, maps, args.title, args.dpi, args.clip)
        if args.command == "curves":
            return plot_curves(args.run_dirs, args.out, args.title, args.dpi)
        if args.command == "study":
            return plot_real_model_study(args.results, args.out, args.title, args.dpi)
        return plot_sweep(args.results, args.out, args.metric, args.title, args.fmt, args.dpi)
    except (ValueError, OSError, CheckpointError) as e:          # OSError: a read-only or full disk
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
