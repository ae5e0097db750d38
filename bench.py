"""Speed of this codebase against transformers + peft, side by side in one run on this machine.

    python bench.py             # the default shapes (4 layers, d=512, batch 4 x 512 tokens, fp32, CPU)
    python bench.py --quick     # a smoke run of a few seconds (what the tests call)
    python bench.py --no-compile --device cuda --dtype bf16 --seq 2048   # other shapes, bf16, the GPU
    python bench.py --decoding   # the decoding rows only, and where each side's time goes (profile)
    python bench.py --profile    # every row, then where each side's time goes, by kind of operator
    python bench.py --inference  # LMAM at inference against merged LoRA (Table 2) and its memory (Table 3)

Each pair (ours, reference) is warmed up, then timed interleaved (A B A B ...); the table gives
median times, the ratio reference/ours (> 1: ours is faster), tokens/s, achieved GFLOP/s and its
share of the matmul rate measured at the start of the same run (on a GPU: model-FLOPs utilisation),
each side's peak memory in one more run (CPU: the peak RSS above the RSS before the run, after
malloc_trim; GPU: max allocated) and the median page faults per run (CPU). FLOPs per training token are
counted as 4N (forward plus activation gradients; the frozen weights get no weight gradient) +
12·L·d·T for attention, N being the matrix weights. Each side computes its loss the way its users
do: ours as train.py (the LM head fused with the cross-entropy, loss.lm_loss), transformers with
`labels=`; the two losses are checked to be equal first. transformers and peft are imported here
and in tests only.

On CPU, glibc's malloc hands large freed blocks back to the OS, and every step then faults its
activations in again, page by page: on a VM that is most of what separates the two sides (the
page-faults column). `--keep-memory` keeps freed memory in the process (as jemalloc, tcmalloc or a
GPU's caching allocator do) for an allocator-neutral comparison; its memory column is then empty.
"""
import argparse
import copy
import ctypes
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import methods
import model as M
from generate import generate, head_logits
from loss import lm_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--compile_repeats", type=int, default=3, help="repeats of the compiled pairs (slow to build)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile'd steps")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="the base weights' dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--keep-memory", dest="keep_memory", action="store_true",
                   help="glibc never returns freed memory to the OS (mallopt): no page faults per step; see keep_freed_memory")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats, no compile")
    p.add_argument("--decoding", action="store_true", help="the decoding rows only (with their profile)")
    p.add_argument("--profile", action="store_true",
                   help="after the table, where each row's time goes on each side, by operator kind (CPU)")
    p.add_argument("--inference", action="store_true",
                   help="LMAM at inference instead: the paper's Tables 2 and 3, formulas and measured (see inference)")
    args = p.parse_args(argv)
    args.profile = (args.profile or args.decoding) and not args.device.startswith("cuda")
    if args.quick:
        args.layers, args.dim, args.heads, args.ffn, args.vocab = 2, 128, 4, 344, 1000
        args.batch, args.seq, args.repeats, args.new_tokens, args.compile = 2, 64, 2, 8, False
    return args


def matmul_gflops(device, dtype, n=2048, reps=5):
    """The best rate of an n×n matrix product, the peak the table's percentages refer to."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(reps):
        best = max(best, 2 * n ** 3 / timed(lambda: a @ b, device) / 1e9)
    return best


def libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def peak_memory_mb(fn, device):
    """Extra memory at the peak of one call of fn. GPU: max allocated. CPU: the peak RSS (VmHWM,
    reset through /proc/self/clear_refs) above the RSS before the call, after glibc's malloc_trim
    has handed every free page back to the OS, so memory the allocator kept from earlier calls is
    not reused unseen. None where unknown."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
    c = libc()
    if c is None:
        return None
    try:
        c.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                      # reset the peak RSS to the current RSS
        before = status("VmRSS:")
        fn()
        return status("VmHWM:") - before
    except OSError:
        return None


def page_faults():
    """Minor page faults so far: pages the process touches for the first time, or again after the
    allocator gave them back to the OS (on a VM each costs several µs)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_freed_memory():
    """glibc's malloc returns freed blocks of more than ~32 MB (and the heap's free top) to the OS,
    so each training step faults its large activations in again (on a VM, several µs per 4 KB
    page). Serve everything from the heap and never trim it: what jemalloc, tcmalloc or a GPU's
    caching allocator do, and an allocator-neutral comparison of the two implementations."""
    c = libc()
    if c is None:
        raise SystemExit("--keep-memory: needs glibc (libc.so.6)")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3           # malloc.h
    if not (c.mallopt(M_MMAP_THRESHOLD, 2 ** 31 - 1) and c.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
            and c.mallopt(M_TOP_PAD, 2 ** 30)):
        raise SystemExit("--keep-memory: glibc's mallopt refused the settings")


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleaved(a, b, repeats, device):
    """Warm up both, then run them alternately: ((median seconds, median page faults) of a, of b)."""
    a(), b()
    runs = {a: [], b: []}
    for _ in range(repeats):
        for fn in (a, b):
            faults = page_faults()
            runs[fn].append((timed(fn, device), page_faults() - faults))
    return [tuple(statistics.median(x) for x in zip(*runs[fn])) for fn in (a, b)]


def train_step(loss_fn, params, ids):
    """One optimizer step: the mean next-token cross-entropy over the batch, backward, AdamW."""
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def our_loss(model):
    """What train.py computes: the LM head fused with the cross-entropy (loss.lm_loss)."""
    def loss(ids):
        hidden = model(ids, return_hidden=True)
        return lm_loss(hidden[:, :-1], model.lm_head, ids[:, 1:]) / (ids.shape[0] * (ids.shape[1] - 1))
    return loss


def reference_loss(model):
    """What a transformers user computes: the model's own loss from labels= (logits, then CE)."""
    return lambda ids: model(input_ids=ids, labels=ids).loss


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.heads, max_position_embeddings=4096,
                                      attn_implementation="sdpa")).to(args.device, dtype).eval()
    ours = M.Llama(M.LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                                 hidden_dim=args.ffn, vocab_size=args.vocab, norm_eps=hf.config.rms_norm_eps))
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return hf, ours.to(args.device, dtype).eval()


def inference(args):
    """--inference: what LMAM costs at inference, against merged LoRA (which costs nothing).

    Table 2: with Attn_s merged, LMAM adds h·min(n, N)² additions per layer (the map added to the
    attention probabilities) and no multiplication. This code never materialises the probabilities
    (SDPA); it adds Attn_s·V_map instead, 2·h·n²·hd FLOPs per layer and sequence (lmam.py), and when
    decoding with a KV cache only the new token's row of the map times V_map, 2·h·n·hd FLOPs per
    layer and new token (LMAM.attend's few-queries path). Timed here on this
    machine at bench's shapes (N = --seq tokens, n = min(128, N)): lorada_la with everything merged,
    against the same model with its map removed and against LoRA merged.
    Table 3: LMAM's and FMAM's (the full-rank map, ¬L) memory per layer, as the paper counts it (16-bit
    weights, gradients and map, Adam's two moments in fp32): training 2hn(12r + n) and 12hnn bytes,
    inference 2hnn, checked against the bytes of real tensors (parameters, gradients, AdamW's state,
    the map) at LLaMA-7B's h = 32 and LLaMA2-70B's h = 64, n = 128, r = 2."""
    from checkpoint import build
    from lmam import LMAM
    dev, MB = args.device, 2 ** 20                  # the paper's MB: 1.19 MB = 1,245,184 bytes
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    # Table 2, the formula at the paper's shapes (LLaMA-7B, N = 512, n = 128)
    h, L, d, n, N = 32, 32, 4096, 128, 512
    P = sum(p.numel() for p in build("llama-7b").parameters())      # on the meta device: 6.7B, no memory
    adds, fwd = h * min(n, N) ** 2, 2 * P * N
    print(f"Table 2 (LLaMA-7B, h={h}, n={n}, N={N}): merged LMAM adds h·min(n,N)² = {adds:,} additions per layer "
          f"and no multiplication; {L} layers: {L * adds / fwd:.1e} of the forward's 2·P·N = {fwd / 1e12:.1f} TFLOP.")
    extra = 2 * h * n * n * (d // h)
    print(f"  this code (SDPA, no probabilities): Attn_s·V_map, 2·h·n²·hd = {extra / 1e6:.0f} MFLOP per layer and "
          f"sequence, {L * extra / fwd:.1e} of the forward; decoding computes only the new token's row, "
          f"2·h·n·hd per layer: {L * extra / n / (2 * P):.1e} of a token's 2·P.")

    # Table 2, measured: lorada_la merged against its map removed and against LoRA merged
    torch.manual_seed(0)
    base = M.Llama(M.LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                                 hidden_dim=args.ffn, vocab_size=args.vocab)).to(dev, dtype).eval()
    kw = dict(lmam_heads=args.heads, lmam_len=min(128, args.seq), lmam_rank=2, lmam_scale=1e-3, lora_r=1,
              lora_alpha=2, adapter_r=16)
    la = methods.apply_method(copy.deepcopy(base), "lorada_la", **kw).eval()
    lora = methods.apply_method(copy.deepcopy(base), "lora", lora_r=1, lora_alpha=2,
                                target_modules="o_proj,down_proj").eval()
    for m in [*la.modules(), *lora.modules()]:
        if hasattr(m, "merge"):
            m.merge()                                # LoRA into the weights, LMAM's map computed once
    no_map = copy.deepcopy(la)
    for layer in no_map.layers:
        layer.self_attn.attn_map = None
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=dev)
    prompt, new = ids[:1, :min(64, args.seq)], args.new_tokens
    forward = lambda model: lambda: model(ids)
    decode = lambda model: lambda: generate(model, prompt, max_new_tokens=new)
    rows = []
    with torch.no_grad():
        for what, fn, per in ((f"forward, batch {args.batch} x {args.seq}", forward, 1),
                              (f"greedy decoding, per new token ({new} after {prompt.shape[1]})", decode, new)):
            for ref_name, ref in (("its map removed", no_map), ("LoRA merged", lora)):
                (ta, _), (tb, _) = interleaved(fn(la), fn(ref), args.repeats, dev)
                rows.append((f"{what}: lorada_la merged / {ref_name}", ta / per, tb / per))
    print(f"\nmeasured: {dev} ({torch.get_num_threads()} threads), {args.dtype}, {args.layers} layers, d={args.dim}, "
          f"{args.heads} heads, LMAM h_s={kw['lmam_heads']}, n={kw['lmam_len']}, r=2; median of {args.repeats}")
    print("| inference | with LMAM (s) | without (s) | LMAM's extra time |\n|---|---|---|---|")
    for name, ta, tb in rows:
        print(f"| {name} | {ta:.5f} | {tb:.5f} | {100 * (ta / tb - 1):+.1f}% |")

    # Table 3: formula against the bytes of real tensors, one layer
    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    def measured(h, n, r, variant, half=True):
        """(weights, gradients, Adam, map kept for the backward, inference map) in bytes: weights,
        gradients and maps 16-bit (half) or fp32, AdamW's moments fp32."""
        lm = LMAM(h, h, r, n, scale=1 / (4096 * 600), causal=True, variant=variant)
        low = copy.deepcopy(lm).to(torch.bfloat16 if half else torch.float32)
        a = low.attn_map()
        a.float().sum().backward()
        weights, grads = nbytes(low.parameters()), nbytes(p.grad for p in low.parameters())
        activation = 0 if variant == "full_rank" else nbytes([a])   # FMAM's map is its weight (the paper: 12hnn)
        opt = torch.optim.AdamW(lm.parameters())
        lm.attn_map().sum().backward()
        opt.step()
        adam = nbytes(t for state in opt.state.values() for k, t in state.items() if k != "step")
        low.merge()
        return weights, grads, adam, activation, nbytes([low.merged_map])

    print("\nTable 3, one layer (MB = 2^20 bytes; paper: 16-bit weights, gradients and map, fp32 Adam moments)")
    print("| model | map | training: formula | measured: weights + grads + Adam + map | inference: formula | "
          "measured |")
    print("|---|---|---|---|---|---|")
    r, n = 2, 128
    for model_name, h in (("LLaMA-7B", 32), ("LLaMA2-70B", 64)):
        for name, variant, train_formula, text in (("LMAM", "default", 2 * h * n * (12 * r + n), "2hn(12r+n)"),
                                                   ("FMAM", "full_rank", 12 * h * n * n, "12hnn")):
            parts = measured(h, n, r, variant)
            assert sum(parts[:4]) == train_formula and parts[4] == 2 * h * n * n, (model_name, name, parts)
            print(f"| {model_name} (h={h}, n={n}, r={r}) | {name} | {text} = {train_formula / MB:.3g} MB | "
                  f"{' + '.join(f'{b / MB:.3g}' for b in parts[:4])} = {sum(parts[:4]) / MB:.3g} MB | "
                  f"2hnn = {2 * h * n * n / MB:.3g} MB | {parts[4] / MB:.3g} MB |")
        parts = measured(h, n, r, "default", half=False)
        assert sum(parts[:4]) == 4 * h * n * (8 * r + n) and parts[4] == 4 * h * n * n, (model_name, parts)
        print(f"| {model_name} | LMAM in fp32 (this code) | 4hn(8r+n) = {4 * h * n * (8 * r + n) / MB:.3g} MB | "
              f"{' + '.join(f'{b / MB:.3g}' for b in parts[:4])} = {sum(parts[:4]) / MB:.3g} MB | "
              f"4hnn = {4 * h * n * n / MB:.3g} MB | {parts[4] / MB:.3g} MB |")
    return rows


def decoding(hf, base, ids, new):
    """The decoding benchmarks, with the KV cache: greedy and 4-beam, batch 1 and a left-padded batch
    of 4, new tokens each (no early stop). Yields (name, ours, reference, tokens generated)."""
    prompts = ids[:, :min(64, ids.shape[1])]
    padded = torch.ones_like(prompts)
    padded[1:, :8] = 0                                         # left padding in every row but the first
    for name, p, mask, beams in (("greedy, batch 1", prompts[:1], None, 1), ("4 beams, batch 1", prompts[:1], None, 4),
                                 ("greedy, padded batch of 4", prompts[:4], padded[:4], 1),
                                 ("4 beams, padded batch of 4", prompts[:4], padded[:4], 4)):
        ga = lambda p=p, mask=mask, beams=beams: generate(base, p, mask, max_new_tokens=new, num_beams=beams)
        gb = lambda p=p, mask=mask, beams=beams: hf.generate(
            input_ids=p, attention_mask=torch.ones_like(p) if mask is None else mask, do_sample=False,
            num_beams=beams, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        yield name, ga, gb, new * p.shape[0]


def head_product(base, rows=(1, 4)) -> str:
    """The LM head's product in a decoding step, F.linear against generate.head_logits (on a CPU in
    fp32: one batched product over the weight's two row halves), the best of 21 runs, for the rows
    of a step of the decoding rows (batch 1; 4 beams or a batch of 4): what head_logits cites."""
    w, dev = base.lm_head.weight.detach(), str(base.lm_head.weight.device)
    parts = []
    for n in rows:
        h = torch.randn(n, w.shape[1], dtype=w.dtype, device=w.device)
        plain, ours = (min(timed(lambda: f(h, w), dev) for _ in range(21)) for f in (F.linear, head_logits))
        parts.append(f"{n} row{'s' * (n > 1)}: F.linear {1e6 * plain:.0f} µs, head_logits {1e6 * ours:.0f} µs")
    return f"LM head {w.shape[0]}x{w.shape[1]} in a decoding step: " + "; ".join(parts)


# Where the time goes, by the kind of operator the profiler sees (the same names on both sides).
KINDS = (("weight products", ("aten::mm", "aten::bmm", "aten::addmm")),
         ("attention kernel (and its backward)", ("aten::_scaled_dot_product", "aten::_flash_attention")),
         ("index_select (embedding lookup; beam reorder of the KV cache)", ("aten::index_select",)),
         ("copies, casts, concatenation (cache updates, masks, bf16 <-> fp32)",
          ("aten::copy_", "aten::cat", "aten::index", "aten::fill_", "aten::zero", "aten::clone", "aten::pad",
           "aten::constant_pad_nd", "aten::empty", "aten::zeros", "aten::ones", "aten::full", "aten::arange",
           "aten::_to_copy", "aten::embedding_dense_backward", "aten::scatter", "aten::new_")),
         ("softmax, loss, logits processing (top-k, argmax, masks of tokens)",
          ("aten::_log_softmax", "aten::_softmax", "aten::topk", "aten::argmax", "aten::isin", "aten::masked_fill",
           "aten::where", "aten::gather", "aten::sort", "aten::max", "aten::all", "aten::any", "aten::eq", "aten::ne",
           "aten::nll_loss", "aten::exp", "aten::logsumexp", "aten::amax")),
         ("element-wise (norms, RoPE, SiLU, residuals, their gradients)",
          ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt", "aten::silu", "aten::neg", "aten::sub",
           "aten::div", "aten::cos", "aten::sin", "aten::sum", "aten::norm", "aten::linalg_vector_norm",
           "aten::sigmoid",
           "aten::reciprocal", "aten::sqrt", "aten::clamp")),
         ("optimizer (AdamW)", ("aten::_foreach", "aten::_fused_adam", "aten::lerp", "aten::addcmul", "aten::addcdiv")),
         ("views and reshapes (no data moved: dispatch cost only)",
          ("aten::as_strided", "aten::slice", "aten::view", "aten::transpose", "aten::reshape", "aten::t",
           "aten::select",
           "aten::narrow", "aten::unsqueeze", "aten::expand", "aten::permute", "aten::squeeze", "aten::chunk",
           "aten::split", "aten::unfold", "aten::detach", "aten::alias", "aten::_unsafe_view", "aten::to",
           "aten::matmul", "aten::linear", "aten::scaled_dot_product_attention", "aten::contiguous", "aten::numpy_T",
           "aten::unflatten", "aten::flatten", "aten::split_with_sizes", "aten::repeat_interleave", "aten::embedding")))


def profile_by_kind(fn, per=1):
    """Milliseconds of one fn() (divided by `per`: decoding steps), by operator kind (KINDS; each
    operator's own time, children excluded: aten::linear's own time is its dispatch, its product
    is counted under mm), plus the time outside any operator: Python, autograd's engine, dispatch
    and the profiler's own cost. One profiled run after a warm-up."""
    from torch.profiler import profile
    fn()
    with profile() as prof:
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
    python_level = "autograd's nodes, Python-level records (Optimizer.step, autograd.Function)"
    spent = {name: 0.0 for name, _ in KINDS} | {"other operators": 0.0, python_level: 0.0}
    for e in prof.key_averages():
        kind = next((name for name, ops in KINDS if e.key.startswith(ops)),
                    "other operators" if e.key.startswith("aten::") else python_level)
        spent[kind] += e.self_cpu_time_total / 1e3
    spent["outside operators (Python, autograd, dispatch, profiler)"] = max(0.0, 1e3 * wall - sum(spent.values()))
    spent["total (profiled)"] = 1e3 * wall
    return {k: v / per for k, v in spent.items()}


def machine(device) -> str:
    """The machine a table comes from: tables of different machines are never to be mixed."""
    if device.startswith("cuda"):
        return f"machine: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, torch {torch.__version__}"
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    config = torch.__config__.show()
    blas = next((b for b in ("mkl", "openblas", "blis", "accelerate") if f"BLAS_INFO={b}" in config), "unknown BLAS")
    return (f"machine: {name}; {', '.join(isa) or 'no AVX2'}; {torch.get_num_threads()} threads; {blas}; "
            f"torch {torch.__version__}")


def main(argv=None):
    args = parse_args(argv)
    if args.inference:
        return inference(args)
    from peft import LoraConfig, get_peft_model
    if args.keep_memory:
        keep_freed_memory()
    dev = args.device
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    peak = matmul_gflops(dev, dtype)
    hf, base = build(args)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=dev)
    tokens = args.batch * args.seq
    n_matrix = sum(p.numel() for n, p in base.named_parameters() if p.dim() == 2 and "embed" not in n)
    flops = (4 * n_matrix + 12 * args.layers * args.dim * args.seq) * tokens
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    rows, profiles = [], {}        # profiles: row name -> (ours, reference) by operator kind (--profile)

    def row(name, runs, fa, fb, work=tokens):
        if args.profile and work == tokens:
            profiles[name] = [profile_by_kind(f) for f in (fa, fb)]
        (t_ours, pf_ours), (t_ref, pf_ref) = runs
        gf = flops / t_ours / 1e9 if work == tokens else float("nan")
        mem = (None, None) if args.keep_memory else (peak_memory_mb(fa, dev), peak_memory_mb(fb, dev))
        rows.append((name, t_ours, t_ref, t_ref / t_ours, work / t_ours, gf, 100 * gf / peak, *mem, pf_ours, pf_ref))

    if not args.decoding:                    # training steps: LoRA, DoRA, LMAM's overhead
        for use_dora in (False, True):
            name = "DoRA" if use_dora else "LoRA r=32"
            ours = methods.apply_method(copy.deepcopy(base), "dora" if use_dora else "lora", lora_r=32, lora_alpha=64,
                                        lora_dropout=0.0, target_modules=",".join(targets)).train()
            ref = get_peft_model(copy.deepcopy(hf), LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0,
                                                               target_modules=targets, use_dora=use_dora)).train()
            mine = [p for p in ours.parameters() if p.requires_grad]
            theirs = [p for p in ref.parameters() if p.requires_grad]
            with torch.no_grad():                      # the same loss on the same weights: the same work
                la, lb = float(our_loss(ours)(ids)), float(reference_loss(ref)(ids))
            assert abs(la - lb) <= 2e-2 * abs(lb), (la, lb)
            fa, fb = train_step(our_loss(ours), mine, ids), train_step(reference_loss(ref), theirs, ids)
            row(f"train step, {name}, eager", interleaved(fa, fb, args.repeats, dev), fa, fb)
            if args.compile:
                co, cr = torch.compile(ours), torch.compile(ref)
                fa, fb = train_step(our_loss(co), mine, ids), train_step(reference_loss(cr), theirs, ids)
                row(f"train step, {name}, compiled", interleaved(fa, fb, args.compile_repeats, dev), fa, fb)

        # LMAM's overhead: lorada_la against the same LoRA + Adapter-FFN with the map removed
        kw = dict(lmam_heads=args.heads, lmam_len=min(128, args.seq), lmam_rank=2, lmam_scale=1e-3, lora_r=1,
                  lora_alpha=2, adapter_r=16)
        with_map = methods.apply_method(copy.deepcopy(base), "lorada_la", **kw).train()
        without = copy.deepcopy(with_map)
        for layer in without.layers:
            layer.self_attn.attn_map = None
        fa = train_step(our_loss(with_map), [p for p in with_map.parameters() if p.requires_grad], ids)
        fb = train_step(our_loss(without), [p for p in without.parameters() if p.requires_grad], ids)
        # (a difference of a few percent: three times the repeats of the other rows, against the noise)
        row(f"lorada_la step: with LMAM (n={kw['lmam_len']}) / without", interleaved(fa, fb, 3 * args.repeats, dev),
            fa, fb)

    for name, ga, gb, work in decoding(hf, base, ids, args.new_tokens):
        with torch.no_grad():
            row(f"generate, {name}", interleaved(ga, gb, args.repeats, dev), ga, gb, work=work)
            if args.profile:
                profiles[f"generate, {name}"] = [profile_by_kind(f, args.new_tokens) for f in (ga, gb)]

    freed = "freed memory kept (--keep-memory)" if args.keep_memory else "freed memory returned to the OS (default)"
    what = "model-FLOPs utilisation" if dev.startswith("cuda") else "% of the measured matmul rate"
    print(machine(dev))
    print(head_product(base))
    print(f"device: {dev} ({torch.get_num_threads()} threads); {args.dtype}; {args.layers} layers, d={args.dim}, "
          f"{args.heads} heads, ffn {args.ffn}, vocab {args.vocab}, batch {args.batch} x {args.seq}; "
          f"{args.dtype} matmul peak measured: {peak:.1f} GFLOP/s; median of {args.repeats} "
          f"({args.compile_repeats} compiled); {freed}")
    print(f"| benchmark | ours (s) | reference (s) | ratio ref/ours | ours tokens/s | ours GFLOP/s | {what} | "
          f"peak MB ours / ref | page faults per run ours / ref |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "–" if v is None or v != v else format(v, f)
    for name, a, b, ratio, tps, gf, pct, ma, mb, fa, fb in rows:
        print(f"| {name} | {a:.4f} | {b:.4f} | {ratio:.2f} | {tps:,.0f} | {fmt(gf, '.1f')} | {fmt(pct, '.0f')} | "
              f"{fmt(ma, ',.0f')} / {fmt(mb, ',.0f')} | {fmt(fa, ',.0f')} / {fmt(fb, ',.0f')} |")
    if profiles:
        print(f"\nWhere the time goes, ours / reference: ms per training step, ms per decoding step ({args.new_tokens}"
              f" steps); one profiled run each, so the totals run above the table's medians by the profiler's cost")
        print("| operators | " + " | ".join(profiles) + " |\n|---|" + "---|" * len(profiles))
        for kind in next(iter(profiles.values()))[0]:
            print(f"| {kind} | " + " | ".join(f"{o[kind]:.2f} / {r[kind]:.2f}" for o, r in profiles.values()) + " |")
    return rows


if __name__ == "__main__":
    main()
