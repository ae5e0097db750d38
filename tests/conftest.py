import os
import sys

# The suite runs on the CPU, also on a machine with a GPU (fp32 references, bit-exact checks,
# several CPU processes): hide the GPUs before torch looks for them. The tests marked `gpu` run
# only with LORADA_GPU_TESTS=1 (scripts/gpu_check.py sets it) and a GPU.
if os.environ.get("LORADA_GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
import torch  # noqa: E402
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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU (run with LORADA_GPU_TESTS=1); skipped without one")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a GPU: LORADA_GPU_TESTS=1 on a machine with CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def main_stopped_by_sigterm(main, argv, pipelines, name, after):
    """Run train.main(argv) with pipeline `name` of `pipelines` (train.PIPELINES) sending the process
    SIGTERM during its `after`-th loss computation; check that the run saved and stopped (exit 128 +
    SIGTERM). The resume tests then continue it with --resume."""
    import signal
    original, calls = pipelines[name], {"n": 0}

    def signalling_pipeline(*a):
        pipe = original[2](*a)
        loss_sum = pipe.loss_sum

        def loss_then_signal(model, batch):
            calls["n"] += 1
            if calls["n"] == after:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss_sum(model, batch)
        pipe.loss_sum = loss_then_signal
        return pipe
    pipelines[name] = (*original[:2], signalling_pipeline)
    try:
        with pytest.raises(SystemExit) as stop:
            main(argv)
    finally:
        pipelines[name] = original
    assert stop.value.code == 128 + signal.SIGTERM
