"""The GPU check: what a first run on a GPU must confirm, as one prepared script (under 8 minutes on
one GPU). The GPU machine cannot download anything and has no ../shared: its inputs are built here
first and carried.

    python scripts/gpu_check.py --prepare                  # here, on the CPU: inputs into .cache/gpu_check
    python scripts/gpu_check.py --device cuda              # there (carry .cache/gpu_check)
    python scripts/gpu_check.py --device cpu --quick       # the smoke mode the tests run

Each item runs under its own time limit and prints one line; everything goes to
OUT/gpu_check.json and OUT/gpu_check.md (OUT: --out, default $OUT or .cache/gpu_check/out).
  sdpa        torch / CUDA / cuDNN versions; which SDPA backends accept this code's shapes (LLaMA-7B
              heads in bf16, GQA, a padded bool mask, RoBERTa's dropout, a decoding step)
  glue_head   RoBERTa + LoRaDA-A under the bf16 recipe: train, validate (train.py)
  compile_gc  --compile --gradient_checkpointing on padded micro-batches, with prefix tuning
  syncs       host-device syncs in a training step and in decoding (torch.cuda.set_sync_debug_mode)
  generate    greedy and beam search on the device, token-identical to the CPU (fp32)
  llama_1b    a ~1B random LLaMA built on the device in bf16: LoRaDA-LA and DoRA steps, tokens/s, peak
              memory, with and without gradient checkpointing
  bench       bench.py --dtype bf16 against transformers + peft, when they are installed
  gpu_tests   pytest -m gpu (bf16 against fp32, compiled against eager, GPU against CPU tokens)
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CACHE = os.path.join(ROOT, ".cache", "gpu_check")

import torch  # noqa: E402

import methods  # noqa: E402
import model as M  # noqa: E402


# ----------------------------------------------------------------------------- inputs, built on the CPU

def prepare(cache=CACHE):
    """Tiny checkpoints and data the items read: a LLaMA with its sentencepiece tokenizer and
    LLM-Adapters records, a RoBERTa with a byte-level BPE vocabulary and a GLUE folder. Needs
    sentencepiece and transformers (the test-only reference) here; the GPU machine needs neither."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import demo
    import sentencepiece as spm
    from data import llm_adapters
    from hf_encdec import byte_vocab_dir, save
    from transformers import RobertaConfig, RobertaModel
    os.makedirs(cache, exist_ok=True)
    llama = os.path.join(cache, "llama")
    os.makedirs(llama, exist_ok=True)
    records = llm_adapters.load_records(llm_adapters.resolve("commonsense_sample"))
    with open(os.path.join(llama, "records.json"), "w") as f:
        json.dump(records, f)
    with open(os.path.join(cache, "text.txt"), "w") as f:
        f.write("\n".join(llm_adapters.train_prompt(r) for r in records * 20))
    spm.SentencePieceTrainer.train(input=os.path.join(cache, "text.txt"), model_prefix=os.path.join(llama, "tokenizer"),
                                   vocab_size=200, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    torch.manual_seed(0)
    demo.save_hf(M.Llama(M.LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176,
                                       vocab_size=200)), llama)
    roberta = os.path.join(cache, "roberta")
    save(RobertaModel(RobertaConfig(vocab_size=261, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, max_position_embeddings=130, type_vocab_size=1,
                                    pad_token_id=1)), roberta)
    byte_vocab_dir(roberta)
    glue = os.path.join(cache, "SST-2")
    os.makedirs(glue, exist_ok=True)
    rows = [("great fun", 1), ("lovely film", 1), ("dull mess", 0), ("awful plot", 0)] * 4
    for split in ("train", "dev"):
        with open(os.path.join(glue, f"{split}.tsv"), "w") as f:
            f.write("sentence\tlabel\n" + "".join(f"{s} .\t{y}\n" for s, y in rows))
    print(f"inputs written to {cache}: carry .cache/gpu_check to the GPU machine")


# ----------------------------------------------------------------------------- the items

def item_sdpa(device, quick, **_):
    """Which SDPA backends run this code's attention shapes (forward + backward)."""
    import torch.nn.functional as F
    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if device.startswith("cuda") else None,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
    dt = torch.bfloat16
    T = 64 if quick else 256
    shapes = {"llama-7b causal": dict(H=32, Hkv=32, hd=128, mask=False, causal=True, p=0.0, T=T),
              "gqa 32/8 padded": dict(H=32, Hkv=8, hd=128, mask=True, causal=False, p=0.0, T=T),
              "roberta dropout 0.1 padded": dict(H=12, Hkv=12, hd=64, mask=True, causal=False, p=0.1, T=T),
              "decode step": dict(H=32, Hkv=8, hd=128, mask=True, causal=False, p=0.0, T=1)}
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    for name, s in shapes.items():
        S = T
        q = torch.randn(2, s["H"], s["T"], s["hd"], device=device, dtype=dt, requires_grad=True)
        k = torch.randn(2, s["Hkv"], S, s["hd"], device=device, dtype=dt, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        mask = None
        if s["mask"]:
            mask = torch.ones(2, 1, s["T"], S, dtype=torch.bool, device=device)
            mask[1, ..., :5] = False
        ok = {}
        for b, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=s["causal"],
                                                       dropout_p=s["p"], enable_gqa=s["H"] != s["Hkv"])
                    y.float().sum().backward()
                ok[b] = True
            except RuntimeError:
                ok[b] = False
        info[name] = ok
    return info


def train_cli(args):
    import train
    return train.main([*args, "--overwrite"])        # a rerun of the check replaces its own earlier run


def item_glue_head(device, quick, cache=CACHE, out=None):
    """RoBERTa with LoRaDA-A and a fresh fp32 GLUE head next to bf16 weights: train, validate."""
    run = os.path.join(out, "glue")
    train_cli(["--model", os.path.join(cache, "roberta"), "--method", "lorada_a", "--task", "sst2",
               "--data", os.path.join(cache, "SST-2"), "--out_dir", run, "--device", device, "--precision", "bf16",
               "--max_steps", "3", "--batch_size", "4", "--eval_step", "3", "--lmam_heads", "2", "--lmam_len", "32",
               "--adapter_r", "4", "--quiet"])
    log = [json.loads(x) for x in open(os.path.join(run, "log.jsonl"))]
    return {"steps": len(log), "loss": log[-1]["loss"], "val_accuracy": log[-1].get("val_accuracy")}


def item_compile_gc(device, quick, cache=CACHE, out=None):
    """--compile --gradient_checkpointing, padded micro-batches, prefix tuning and LoRA."""
    res = {}
    for method, flags in (("prefix", ["--prefix_len", "3"]), ("lora", ["--lora_r", "2"])):
        run = os.path.join(out, f"compile_{method}")
        t = time.time()
        train_cli(["--model", os.path.join(cache, "llama"), "--method", method, "--data",
                   os.path.join(cache, "llama", "records.json"), "--out_dir", run, "--device", device,
                   "--max_steps", "2", "--batch_size", "4", "--micro_batch_size", "2", "--val_set_size", "2",
                   "--compile", "--gradient_checkpointing", "--quiet", *flags])
        res[method] = {"seconds": round(time.time() - t, 1),
                       "losses": [json.loads(x)["loss"] for x in open(os.path.join(run, "log.jsonl"))]}
    return res


def tiny_llama(device, dtype, dim=256, layers=4, heads=8, kv=2, ffn=688, vocab=1000, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        m = M.Llama(M.LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv, hidden_dim=ffn,
                                  vocab_size=vocab, max_seq_len=4096))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return m.to(dtype)


def item_syncs(device, quick, **_):
    """Host-device syncs of a padded training step and of greedy decoding."""
    if not device.startswith("cuda"):
        return {"skipped": "CUDA's sync debug mode only (tests/test_precision.py counts them on CPU)"}
    from generate import generate
    from loss import lm_loss
    m = methods.apply_method(tiny_llama(device, torch.bfloat16), "lorada_la", lmam_heads=2, lmam_len=32).train()
    ids = torch.randint(3, 1000, (4, 64), device=device)
    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    lm_loss(m(ids, attention_mask=mask, return_hidden=True)[:, :-1], m.lm_head, ids[:, 1:]).backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lm_loss(m(ids, attention_mask=mask, return_hidden=True)[:, :-1], m.lm_head, ids[:, 1:]).backward()
        step = "no sync"
    except RuntimeError as e:
        step = f"sync: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    m.eval()
    t = time.time()
    generate(m, ids[:1], max_new_tokens=32)
    torch.cuda.synchronize()
    return {"training step": step, "greedy tokens/s, batch 1": round(32 / (time.time() - t), 1)}


def item_generate(device, quick, **_):
    """fp32 greedy and 4-beam on the device equal the CPU's tokens, with a left-padded batch."""
    from generate import generate
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    cpu, dev = tiny_llama("cpu", torch.float32).eval(), tiny_llama(device, torch.float32).eval()
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    res = {}
    for beams in (1, 4):
        a = generate(cpu, ids, mask, max_new_tokens=12, num_beams=beams, eos_id=2)
        b = generate(dev, ids.to(device), mask.to(device), max_new_tokens=12, num_beams=beams, eos_id=2)
        res[f"beams={beams} identical"] = bool(torch.equal(a, b.cpu()))
    return res


def item_llama_1b(device, quick, **_):
    """Step time and peak memory of a ~1B LLaMA (dim 2048, 16 layers) in bf16, built on the device."""
    from loss import lm_loss
    shape = dict(dim=128, layers=2, heads=4, kv=2, ffn=352, vocab=1000) if quick else \
        dict(dim=2048, layers=16, heads=16, kv=4, ffn=5504, vocab=32000)
    B, T = (2, 64) if quick else (4, 1024)
    res = {"params": None}
    for method, kw in (("lorada_la", dict(lmam_heads=shape["heads"], lmam_len=128)), ("dora", dict(lora_r=32))):
        for gc in (False, True):
            m = methods.apply_method(tiny_llama(device, torch.bfloat16, **shape), method, **kw).train()
            res["params"] = sum(p.numel() for p in m.parameters())
            m.gradient_checkpointing = gc
            params = [p for p in m.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            ids = torch.randint(3, shape["vocab"], (B, T), device=device)
            mask = torch.ones_like(ids)
            mask[1, :T // 8] = 0
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(2 if quick else 5):
                t = time.time()
                loss = lm_loss(m(ids, attention_mask=mask, return_hidden=True)[:, :-1], m.lm_head, ids[:, 1:])
                (loss / ids.numel()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.time() - t)
            step = sorted(times[1:])[len(times[1:]) // 2]
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None
            res[f"{method}{' +ckpt' if gc else ''}"] = {"step_s": round(step, 4), "tokens_per_s": round(B * T / step),
                                                        "peak_GiB": None if peak is None else round(peak, 2)}
            del m, opt
    return res


def item_bench(device, quick, **_):
    """bench.py in bf16 against transformers + peft (skipped when they are not installed there)."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "transformers / peft are not installed on this machine"}
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--device", device, "--dtype", "bf16"]
    cmd += ["--quick"] if quick else ["--layers", "8", "--dim", "2048", "--heads", "16", "--ffn", "5504", "--seq", "1024"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return {"returncode": out.returncode, "table": [l for l in out.stdout.splitlines() if l.startswith(("|", "device"))]}


def item_gpu_tests(device, quick, **_):
    if not device.startswith("cuda"):
        return {"skipped": "needs a GPU"}
    env = dict(os.environ, LORADA_GPU_TESTS="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    return {"returncode": out.returncode, "summary": out.stdout.strip().splitlines()[-1:]}


ITEMS = {"sdpa": item_sdpa, "glue_head": item_glue_head, "compile_gc": item_compile_gc, "syncs": item_syncs,
         "generate": item_generate, "llama_1b": item_llama_1b, "bench": item_bench, "gpu_tests": item_gpu_tests}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="build the inputs into .cache/gpu_check, then exit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes: the CPU smoke mode")
    p.add_argument("--only", default=None, help=f"comma-separated items ({', '.join(ITEMS)})")
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(CACHE, "out")), help="where the reports go")
    args = p.parse_args(argv)
    if args.prepare:
        return prepare()
    if not os.path.isdir(os.path.join(CACHE, "llama")):
        sys.exit(f"{CACHE}: no inputs; run `python scripts/gpu_check.py --prepare` first (and carry .cache/gpu_check)")
    os.makedirs(args.out, exist_ok=True)
    report = {}
    for name in (args.only.split(",") if args.only else ITEMS):
        t = time.time()
        try:
            result, status = ITEMS[name](args.device, args.quick, out=args.out), "ok"
        except Exception as e:                                   # one item's failure is a finding, not the end
            result, status = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}, "FAILED"
        if isinstance(result, dict) and "skipped" in result:
            status = "skipped"
        report[name] = {"status": status, "seconds": round(time.time() - t, 1), "result": result}
        print(f"{name:>10}: {status} ({report[name]['seconds']} s) {json.dumps(result)[:300]}", flush=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"device": args.device, "items": report}, f, indent=2, default=str)
    lines = [f"GPU check on {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
             f"torch {torch.__version__}", "", "| item | status | seconds | result |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['status']} | {r['seconds']} | {json.dumps(r['result'], default=str)[:400]} |"
              for n, r in report.items()]
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"reports: {os.path.join(args.out, 'gpu_check.json')}, gpu_check.md")
    return report


if __name__ == "__main__":
    main()
