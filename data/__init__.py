"""Benchmark data loaders. Each module turns files into token tensors; none imports a model."""
import torch


def pad(rows: list, value: int, side: str = "right") -> tuple:
    """Token lists -> a (B, T) long tensor padded with `value` on the right (or the left), and the
    (B, T) 0/1 mask of the real tokens."""
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        out[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return out, mask
