import os
import sys

# The suite runs on the CPU, also on a machine with a GPU (fp32 references, bit-exact checks,
# several CPU processes): hide the GPUs before torch looks for them. The tests marked `gpu` run
# only with LORADA_GPU_TESTS=1 (scripts/gpu_check.py sets it) and a GPU.
if os.environ.get("LORADA_GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# fp32 is the tests' reference precision, also on a CPU where train.py and eval.py default to bf16
# (runs.default_precision); a test that wants bf16 asks for it with --precision bf16.
os.environ["LORADA_PRECISION"] = "fp32"

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


def git_status():
    """The lines of `git status --porcelain` for this checkout (untracked files one by one), or None
    where there is no git or no repository."""
    import subprocess
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def the_suite_leaves_the_checkout_clean():
    """No test, and no run a test starts (the demo, train.py, plots.py), writes into the repository:
    everything goes to a temporary folder. What `git status` lists at the end of the session and
    did not list at its start is an error (so a developer's uncommitted files are no failure; edits
    made while the suite runs are)."""
    before = git_status()
    yield
    after = git_status()
    if before is not None and after is not None and after - before:
        pytest.fail("the tests changed the checkout (new in `git status --porcelain` since the session started):\n"
                    + "\n".join(sorted(after - before)), pytrace=False)


def tiny_llama_ckpt(path, seed=0):
    """A tiny LLaMA checkpoint (GQA, dim 32, 2 layers) with a sentencepiece tokenizer of 200 pieces
    trained on the sample data; `seed` draws the weights. The fixture tiny_ckpt is one."""
    import sentencepiece as spm
    import demo
    from data import llm_adapters as D
    import model as M
    os.makedirs(path, exist_ok=True)
    text = os.path.join(path, "text.txt")
    with open(text, "w") as f:
        f.write("\n".join(D.train_prompt(r) for r in D.load_records(D.resolve("commonsense_sample")) * 20))
    spm.SentencePieceTrainer.train(input=text, model_prefix=os.path.join(path, "tokenizer"), vocab_size=200,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    torch.manual_seed(seed)
    demo.save_hf(M.Llama(M.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=200)),
                 path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny LLaMA checkpoint with a real sentencepiece tokenizer trained on the sample data
    (tiny_llama_ckpt), one per test file."""
    return tiny_llama_ckpt(tmp_path_factory.mktemp("tiny"))


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


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a GPU: LORADA_GPU_TESTS=1 on a machine with CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def main_stopped_by_sigterm(main, argv, pipelines, name, after):
    """Run train.main(argv) with pipeline `name` of `pipelines` (pipelines.PIPELINES) sending the process
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
