"""LongLoRA (Table 7): S²-Attn against a written-out masked attention, the longlora methods, position
interpolation, the text pipeline, and the proof-pile perplexity protocol against transformers."""
import math

import pytest
import torch
from torch.testing import assert_close

import model as M


def s2_mask(L, G, shifted, wrap):
    """Which keys each query sees (True), written out from LongLoRA's description (its paper's
    Section 3.2 and Algorithm 1): groups of G tokens, causal inside a group; the
    shifted heads' groups start at G/2, rolled around the end (wrap) or not."""
    t = torch.arange(L)
    if not shifted:
        r, seg = t, t // G
    elif wrap:
        r = (t - G // 2) % L
        seg = r // G
    else:
        r, seg = t, (t + G // 2) // G
    return (seg[:, None] == seg[None, :]) & (r[None, :] <= r[:, None])


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_s2_attention_equals_masked_attention(wrap, kv_heads):
    torch.manual_seed(0)
    B, H, L, hd, G = 2, 4, 16, 8, 4
    q = torch.randn(B, H, L, hd, requires_grad=True)
    k = torch.randn(B, kv_heads, L, hd, requires_grad=True)
    v = torch.randn(B, kv_heads, L, hd, requires_grad=True)
    out = M.shifted_sparse_attention(q, k, v, G, wrap)
    mask = torch.stack([s2_mask(L, G, h >= H // 2, wrap) for h in range(H)])[None]        # (1, H, L, L)
    ref, _ = M.attention_naive(q, k, v, mask)
    assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the two versions differ exactly in the wrapped pairs: queries 0..G/2-1 of the shifted heads
    other = M.shifted_sparse_attention(q, k, v, G, not wrap)
    assert not torch.allclose(out[:, H // 2:, :G // 2], other[:, H // 2:, :G // 2])
    assert_close(out[:, H // 2:, G // 2:], other[:, H // 2:, G // 2:], atol=1e-5, rtol=1e-5)
    assert_close(out[:, :H // 2], other[:, :H // 2], atol=1e-6, rtol=1e-6)


def test_s2_bad_lengths():
    q = torch.randn(1, 4, 18, 8)
    with pytest.raises(ValueError, match="18 tokens cannot be cut into groups of 4"):
        M.shifted_sparse_attention(q, q, q, 4)


# ----------------------------------------------------------------------------- the method, the pipeline

import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

import eval as E  # noqa: E402
import methods  # noqa: E402
import train as T  # noqa: E402
from checkpoint import build, load  # noqa: E402
from conftest import shared  # noqa: E402
from hf_llama import tiny_hf_llama  # noqa: E402
from helpers import tiny  # noqa: E402


def test_longlora_parameter_share_and_parts():
    """LoRA r=8 on q, k, v, o + the embeddings (one more row: [PAD]) + every norm, the LM head
    frozen: 2.07% of LLaMA2-7B, Table 7's 2.1%."""
    m = methods.apply_method(build("llama2-7b"), "longlora")
    t, a = methods.count_parameters(m)
    assert round(100 * t / a, 1) == 2.1
    trains = {n.split(".")[-1] if "lora" in n else n for n, p in m.named_parameters() if p.requires_grad}
    assert "embed_tokens.weight" in trains and "norm.weight" in trains and "lm_head.weight" not in trains
    assert m.embed_tokens.weight.shape[0] == m.lm_head.weight.shape[0] == 32001
    assert m.cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}        # ceil(8192 / 4096)


def test_pad_row_is_the_mean_embedding():
    m, _ = tiny("mha")
    mean = m.embed_tokens.weight.detach().mean(0)
    methods.apply_method(m, "longlora", lora_r=2, context_len=64)
    assert torch.equal(m.embed_tokens.weight[-1], mean) and m.cfg.vocab_size == 513


def write_tokens(path, tokens):
    np.asarray(tokens, dtype=np.uint16).tofile(path)
    return str(path)


@pytest.mark.parametrize("protocol", ["longlora", "strided"])
def test_perplexity_equals_transformers(tmp_path, protocol):
    """eval.py's perplexity against the same protocol computed with transformers' own loss."""
    ours, hf = tiny("gqa")
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(3, 512, (200,), generator=g).tolist()
    text_tokens = np.memmap(write_tokens(tmp_path / "t.bin", stream), dtype=np.uint16, mode="r")
    got = E.perplexity(ours, text_tokens, seq_len=32, stride=16, protocol=protocol, progress=False)["ppl"]
    x = torch.tensor(stream)[None]
    losses = []
    with torch.no_grad():
        if protocol == "longlora":
            for i in list(range(0, len(stream) - 32, 16))[:-1]:
                losses.append(float(hf(input_ids=x[:, i:i + 32], labels=x[:, i:i + 32]).loss))
            expected = math.exp(sum(losses) / len(losses))
        else:
            nll, n, scored_to = 0.0, 0, 0
            for i in range(0, len(stream), 16):
                j = min(i + 32, len(stream))
                labels = x[:, i:j].clone()
                labels[:, :scored_to - i] = -100
                k = int((labels[:, 1:] != -100).sum())
                nll += float(hf(input_ids=x[:, i:j], labels=labels).loss) * k
                n, scored_to = n + k, j
                if j == len(stream):
                    break
            expected = math.exp(nll / n)
    assert got == pytest.approx(expected, rel=1e-5)



def small_ckpt(tmp_path, max_seq_len=32):
    """A tiny LLaMA trained for max_seq_len positions, with the tests' sentencepiece tokenizer."""
    import demo
    import sentencepiece as spm
    from data import llm_adapters
    path = tmp_path / "ckpt"
    path.mkdir()
    (tmp_path / "text.txt").write_text("\n".join(llm_adapters.train_prompt(r) for r in llm_adapters.load_records(llm_adapters.resolve("commonsense_sample")) * 20))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(path / "tokenizer"),
                                   vocab_size=200, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    torch.manual_seed(0)
    demo.save_hf(M.Llama(M.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=200,
                                       max_seq_len=max_seq_len)), str(path))
    return str(path)


def math_text(tmp_path, rows=30):
    src = shared("math-text", "gsm8k_test.jsonl")
    out = tmp_path / "math.jsonl"
    out.write_text("".join(open(src).readlines()[:rows]))
    return str(out)


def test_longlora_with_lmam_end_to_end(tmp_path):
    """A tiny LLaMA trained for 32 positions, LongLoRA + LMAM (tail mode) on rows of 64 tokens of
    math text: S²-Attn (groups of 16), position interpolation ×2, then eval.py's perplexity."""
    ckpt, data = small_ckpt(tmp_path), math_text(tmp_path)
    out = tmp_path / "run"
    T.main(["--model", ckpt, "--method", "longlora+lmam", "--task", "lm", "--data", data, "--out_dir", str(out),
            "--cutoff_len", "64", "--batch_size", "2", "--micro_batch_size", "1", "--max_steps", "3",
            "--warmup_steps", "1", "--lora_r", "2", "--lmam_heads", "2", "--lmam_len", "16", "--quiet",
            "--device", "cpu"])
    run = json.loads((out / "args.json").read_text())
    assert run["train"]["s2_ratio"] == 0.25 and run["train"]["lr_schedule"] == "constant"
    assert run["method"]["hparams"]["context_len"] == 64 and run["method"]["hparams"]["lmam_mode"] == "tail"
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
    assert [r["lr"] for r in log][1:] == [2e-5, 2e-5]                       # constant after the warmup
    res = E.main(["--model", ckpt, "--adapter", str(out / "adapter.safetensors"), "--task", "ppl", "--data", data,
                  "--seq_len", "64", "--stride", "64", "--out_dir", str(tmp_path / "e")])
    assert math.isfinite(res["ppl"]["64"]["ppl"]) and res["ppl"]["64"]["windows"] > 2


def test_longlora_bad_input(tmp_path):
    ckpt, data = small_ckpt(tmp_path), math_text(tmp_path, rows=5)
    common = ["--model", ckpt, "--task", "lm", "--data", data, "--batch_size", "2", "--micro_batch_size", "1",
              "--max_steps", "1", "--quiet", "--device", "cpu", "--lora_r", "2"]
    with pytest.raises(SystemExit, match="cannot be cut into groups"):                        # L not divisible by 4
        T.main([*common, "--method", "longlora", "--cutoff_len", "30", "--out_dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="64 positions, but this model was trained for 32"):  # no interpolation
        T.main([*common, "--method", "lora", "--cutoff_len", "64", "--out_dir", str(tmp_path / "b")])
    bad = write_tokens(tmp_path / "bad.bin", [5, 6, 700, 8] * 40)                             # ids past the vocabulary
    with pytest.raises(SystemExit, match="token id 700 is outside the model's vocabulary of 200"):
        E.main(["--model", ckpt, "--task", "ppl", "--data", bad, "--seq_len", "16", "--out_dir", str(tmp_path / "e")])


def test_longlora_text_layout_trains_without_loss_on_pad(tmp_path):
    """--text_layout longlora: LongLoRA's own stream (one BOS, documents joined by EOS, [PAD] up to a
    multiple of the row length); the [PAD] that --method longlora adds gets no loss, and a method
    without that token is refused."""
    ckpt, data = small_ckpt(tmp_path), math_text(tmp_path, rows=12)
    common = ["--model", ckpt, "--task", "lm", "--data", data, "--cutoff_len", "64", "--batch_size", "2",
              "--micro_batch_size", "1", "--max_steps", "2", "--quiet", "--device", "cpu", "--lora_r", "2",
              "--text_layout", "longlora"]
    T.main([*common, "--method", "longlora", "--out_dir", str(tmp_path / "run")])
    tokens = np.fromfile(tmp_path / "run" / "train_tokens.bin", dtype=np.uint16)
    assert len(tokens) % 64 == 0 and tokens[0] == 1 and (tokens == 200).any()        # BOS first, [PAD] = 200
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    with pytest.raises(SystemExit, match="--text_layout longlora pads with a \\[PAD\\] token \\(id 200\\)"):
        T.main([*common, "--method", "lora", "--out_dir", str(tmp_path / "lora")])
