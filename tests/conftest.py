import os
import sys

import pytest
import torch
from torch.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def shared(*parts):
    """Path of a file under ../shared/data, or skip the test (with the reason) when it is absent."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    return path


def assert_decode_equals_full(model, ids, mask, prefill):
    """Prefill `prefill` tokens into a KV cache, decode the rest one token at a time, and compare
    the logits of every real token with one full forward."""
    B, T = ids.shape
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(B, T)
        steps = [model(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache)]
        for t in range(prefill, T):
            steps.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    assert_close(torch.cat(steps, 1)[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-5)
