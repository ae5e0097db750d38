"""Speed of this codebase against transformers + peft, side by side in one run on this machine.

    python bench.py             # the default shapes (4 layers, d=512, batch 4 x 512 tokens, fp32, CPU)
    python bench.py --quick     # a smoke run of a few seconds (what the tests call)

Each pair (ours, reference) is warmed up, then timed interleaved (A B A B ...); the table gives
median times, the ratio reference/ours (> 1: ours is faster), tokens/s and achieved GFLOP/s against
the fp32 matmul rate measured at the start of the same run. FLOPs per training token are counted as
4N (forward plus activation gradients; the frozen weights get no weight gradient) + 12·L·d·T for
attention, N being the matrix weights. transformers and peft are imported here and in tests only.
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import methods
import model as M


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
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats, no compile")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.dim, args.heads, args.ffn, args.vocab = 2, 128, 4, 344, 1000
        args.batch, args.seq, args.repeats, args.new_tokens, args.compile = 2, 64, 2, 8, False
    return args


def matmul_gflops(device, n=1024, reps=10):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleaved(a, b, repeats, device):
    """Warm up both, then time them alternately; median seconds of each."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, device))
        tb.append(timed(b, device))
    return statistics.median(ta), statistics.median(tb)


def train_step(forward, params, ids):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        logits = forward(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.heads, max_position_embeddings=4096,
                                      attn_implementation="sdpa")).to(args.device).eval()
    ours = M.Llama(M.LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                                 hidden_dim=args.ffn, vocab_size=args.vocab, norm_eps=hf.config.rms_norm_eps))
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return hf, ours.to(args.device).eval()


def main(argv=None):
    args = parse_args(argv)
    from peft import LoraConfig, get_peft_model
    dev = args.device
    peak = matmul_gflops(dev)
    hf, base = build(args)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), device=dev)
    tokens = args.batch * args.seq
    n_matrix = sum(p.numel() for n, p in base.named_parameters() if p.dim() == 2 and "embed" not in n)
    flops = (4 * n_matrix + 12 * args.layers * args.dim * args.seq) * tokens
    targets = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    rows = []

    def row(name, t_ours, t_ref, unit_tokens=tokens, step_flops=flops):
        rows.append((name, t_ours, t_ref, t_ref / t_ours, unit_tokens / t_ours, step_flops / t_ours / 1e9))

    for use_dora in (False, True):
        name = "DoRA" if use_dora else "LoRA r=32"
        ours = methods.apply_method(copy.deepcopy(base), "dora" if use_dora else "lora", lora_r=32, lora_alpha=64,
                                    lora_dropout=0.0, target_modules=",".join(targets)).train()
        ref = get_peft_model(copy.deepcopy(hf), LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0,
                                                           target_modules=targets, use_dora=use_dora)).train()
        mine = [p for p in ours.parameters() if p.requires_grad]
        theirs = [p for p in ref.parameters() if p.requires_grad]
        fa = train_step(lambda x: ours(x), mine, ids)
        fb = train_step(lambda x: ref(input_ids=x).logits, theirs, ids)
        row(f"train step, {name}, eager", *interleaved(fa, fb, args.repeats, dev))
        if args.compile:
            co, cr = torch.compile(ours), torch.compile(ref)
            fa = train_step(lambda x: co(x), mine, ids)
            fb = train_step(lambda x: cr(input_ids=x).logits, theirs, ids)
            row(f"train step, {name}, compiled", *interleaved(fa, fb, args.repeats, dev))

    # LMAM's overhead: lorada_la against the same LoRA + Adapter-FFN with the map removed
    kw = dict(lmam_heads=args.heads, lmam_len=min(128, args.seq), lmam_rank=2, lmam_scale=1e-3, lora_r=1,
              lora_alpha=2, adapter_r=16)
    with_map = methods.apply_method(copy.deepcopy(base), "lorada_la", **kw).train()
    without = copy.deepcopy(with_map)
    for layer in without.layers:
        layer.self_attn.attn_map = None
    fa = train_step(lambda x: with_map(x), [p for p in with_map.parameters() if p.requires_grad], ids)
    fb = train_step(lambda x: without(x), [p for p in without.parameters() if p.requires_grad], ids)
    t_map, t_plain = interleaved(fa, fb, args.repeats, dev)
    rows.append((f"lorada_la step: with LMAM (n={kw['lmam_len']}) / without", t_map, t_plain, t_plain / t_map,
                 tokens / t_map, flops / t_map / 1e9))

    # generation: greedy, KV cache, batch 1
    prompt = ids[:1, :min(64, args.seq)]
    new = args.new_tokens
    ga = lambda: M.generate(base, prompt, max_new_tokens=new)
    gb = lambda: hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    with torch.no_grad():
        t_ours, t_ref = interleaved(ga, gb, args.repeats, dev)
    rows.append(("generate, greedy, batch 1", t_ours, t_ref, t_ref / t_ours, new / t_ours, float("nan")))

    print(f"device: {dev}; {args.layers} layers, d={args.dim}, {args.heads} heads, ffn {args.ffn}, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq}; fp32 matmul peak measured: {peak:.1f} GFLOP/s; median of {args.repeats}")
    print("| benchmark | ours (s) | reference (s) | ratio ref/ours | ours tokens/s | ours GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, a, b, ratio, tps, gf in rows:
        print(f"| {name} | {a:.4f} | {b:.4f} | {ratio:.2f} | {tps:,.0f} | {gf:.1f} |")
    return rows


if __name__ == "__main__":
    main()
