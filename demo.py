"""The CPU demo (`python train.py` with no arguments, or `python demo.py`): no network, a few minutes.
Its four stages, each announced by a line that starts with its number:

[1/4] Pretrain a small LLaMA-architecture model on generated facts ("the grass is green."), with a
      sentencepiece tokenizer trained on them, and save it as a Hugging Face checkpoint
      (config.json + model.safetensors), the layout checkpoint.load() reads. Cached in .cache/demo/.
[2/4] Generate a multiple-choice task in LLM-Adapters' ARC format ("What color is the grass?\n\n
      Answer1: blue Answer2: green Answer3: red Answer4: yellow\n\nAnswer format: answer1/.../answer4"
      -> "the correct answer is answer2"); the base model knows the facts, not the format.
[3/4] Fine-tune with lorada_la and with LoRA at about the same parameter budget, through train.py
      (its progress line on the terminal, the rest of its output in the run's train.log).
[4/4] Evaluate the base model and both adapters with eval.py's code and print the accuracies; draw
      LMAM's map for one test question (.cache/demo/demo_attention.png, with matplotlib).

On one machine every run prints the same numbers: fixed threads, seeded data, and torch's
deterministic algorithms (see deterministic()). Nothing is written outside .cache/demo/.
"""
import contextlib
import json
import os
import random
import shlex
import shutil
import sys
import time

import torch
import torch.nn.functional as F

import eval as E
import methods
import model as M
import train as T
from checkpoint import write_safetensors
from data import llm_adapters
from runs import Progress
from tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(ROOT, ".cache", "demo")
OBJECTS = {"grass": "green", "sky": "blue", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red",
           "lemon": "yellow", "leaf": "green", "cloud": "white", "night": "black", "ocean": "blue", "cherry": "red",
           "carrot": "orange", "pumpkin": "orange", "plum": "purple", "grape": "purple", "milk": "white",
           "tomato": "red", "banana": "yellow", "frog": "green", "crow": "black", "sapphire": "blue",
           "lavender": "purple", "tangerine": "orange"}
CONFIG = M.LlamaConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=4, hidden_dim=352, vocab_size=384,
                       norm_eps=1e-5, max_seq_len=256)


def corpus(rng, n=3000):
    """What the base model learns: the facts ("the grass is green."), and the same facts as
    instruction / response pairs in the training template ("What color is the grass?" -> "the
    correct answer is green."). It never sees options or answer numbers."""
    lines = []
    for _ in range(n):
        obj = rng.choice(list(OBJECTS))
        color = OBJECTS[obj]
        if rng.random() < 0.5:
            lines.append(rng.choice([f"the {obj} is {color}.", f"the color of the {obj} is {color}.",
                                     f"we saw that the {obj} was {color}.", f"a {color} {obj} is a common sight."]))
        else:
            q = rng.choice([f"What color is the {obj}?", f"Tell me the color of the {obj}."])
            out = rng.choice([f"the {obj} is {color}.", f"the correct answer is {color}."])
            lines.append(llm_adapters.train_prompt({"instruction": q, "input": "", "output": out}))
    return lines


TASK_COLORS = ["blue", "green", "red", "yellow"]     # the options, always in this order


def task(rng, n):
    """Multiple-choice records in LLM-Adapters' ARC format. The options are always the same four
    colours in the same order, so the answer is the recalled colour's number."""
    records = []
    listing = " ".join(f"Answer{i + 1}: {c}" for i, c in enumerate(TASK_COLORS))
    objects = [o for o, c in OBJECTS.items() if c in TASK_COLORS]
    for _ in range(n):
        obj = rng.choice(objects)
        k = TASK_COLORS.index(OBJECTS[obj]) + 1
        records.append({"instruction": f"Please choose the correct answer to the question: What color is the {obj}?"
                                       f"\n\n{listing}\n\nAnswer format: answer1/answer2/answer3/answer4",
                        "input": "", "output": f"the correct answer is answer{k}", "answer": f"answer{k}"})
    return records


def train_tokenizer(lines, path):
    import sentencepiece as spm
    text = os.path.join(CACHE, "corpus.txt")
    with open(text, "w") as f:
        f.write("\n".join(lines + [r["instruction"] + " " + r["output"] for r in task(random.Random(1), 200)]))
    spm.SentencePieceTrainer.train(input=text, model_prefix=path[:-6], vocab_size=CONFIG.vocab_size,
                                   model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, byte_fallback=False, split_digits=True, minloglevel=2,
                                   num_threads=1,
                                   # "\n": the trainer reads lines, so it would never see one. 16 spaces as
                                   # one piece: LLM-Adapters' prompts end in 16 spaces, and the training
                                   # prompt is then followed by the response while the evaluation prompt
                                   # stops there; with this piece both end on the same token. Two spaces
                                   # as one piece, as LLaMA-2's vocabulary has: the training prompt's
                                   # "request.␣␣" then differs from the evaluation prompt's "request.␣" by a
                                   # substituted token, not an extra one, so the instruction keeps its
                                   # positions in both layouts, as with LLaMA-2 (README, "Why LMAM cares
                                   # about the evaluation prompt's whitespace"; scripts/prompt_offsets.py).
                                   user_defined_symbols=["\n", "\u2581" * 16, "\u2581" * 2],
                                   remove_extra_whitespaces=False, normalization_rule_name="identity")


def save_hf(model, path):
    """Write our model in the Hugging Face layout, so checkpoint.load() reads it like any checkpoint."""
    c = model.cfg
    cfg = {"model_type": "llama", "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
           "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "intermediate_size": c.hidden_dim,
           "vocab_size": c.vocab_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
           "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": False}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {("" if k == "lm_head.weight" else "model.") + k: v.contiguous() for k, v in model.state_dict().items()}
    write_safetensors(tensors, os.path.join(path, "model.safetensors"))


RECIPE = 2     # the base model's recipe; a cached model of another one is rebuilt (2: the "␣␣" piece)


def pretrain(path, steps=500, seq=128, batch=24, seed=0):
    """Build (or reuse) the demo's base model at `path`."""
    stamp = os.path.join(path, "demo.json")
    recipe = {"recipe": RECIPE, "steps": steps, "seq": seq, "batch": batch, "seed": seed}
    if os.path.exists(os.path.join(path, "model.safetensors")):
        with contextlib.suppress(OSError, ValueError), open(stamp) as f:
            if json.load(f) == recipe:
                print(f"[1/4] reusing the pretrained demo model in {path}")
                return
        print(f"[1/4] the demo model in {path} was built by another version of demo.py: rebuilding it")
    os.makedirs(path, exist_ok=True)
    rng = random.Random(seed)
    lines = corpus(rng)
    train_tokenizer(lines, os.path.join(path, "tokenizer.model"))
    tok = load_tokenizer(path)
    stream = []
    for line in lines:
        stream += tok.encode(line, bos=True, eos=True)
    data = torch.tensor(stream)
    torch.manual_seed(seed)
    model = M.Llama(CONFIG)
    for n, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.linear_schedule(50, steps))
    print(f"[1/4] pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter LLaMA on "
          f"{len(data):,} generated tokens")
    progress = Progress(steps)
    t0 = time.time()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        progress.update(step, float(loss.detach()), sched.get_last_lr()[0], batch * seq * step / (time.time() - t0))
    progress.close()
    save_hf(model, path)
    with open(stamp, "w") as f:
        json.dump(recipe, f)


def accuracy(model_path, adapter, records, prompt=llm_adapters.eval_prompt):
    model, tok = E.load_for_eval(model_path, adapter, precision="fp32")
    correct, total = E.evaluate_task(model, tok, "ARC-Easy", records, batch_size=16, num_beams=4,
                                     max_new_tokens=8, progress=False, prompt=prompt)
    return correct / total


def training_style_prompt(record):
    """The training prompt without the response: LLM-Adapters' evaluation prompt differs from it in
    whitespace only; with this tokenizer (as with LLaMA-2's) the instruction keeps its positions and
    the response starts one position earlier (scripts/prompt_offsets.py measures it)."""
    return llm_adapters.train_prompt({**record, "output": ""})


def shown(path):
    """A path as the user would type it from the repository's root."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def draw_lmam(base, adapter, record, out=None):
    """A picture of what LMAM learned (plots.py, Figure 1's three panels): for one test question in
    the training layout, with its answer, the softmax attention, Attn_s and their sum, in the layer
    whose map grew most (train.py's max |Attn_s|), first head. It goes to .cache/demo/ (out), never
    into the repository; without matplotlib, prints the plots.py command that draws it later."""
    import plots
    from lmam import map_sizes
    out = out or os.path.join(CACHE, "demo_attention.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    text = os.path.join(os.path.dirname(os.path.abspath(out)), "test_question.txt")
    with open(text, "w") as f:
        f.write(llm_adapters.train_prompt(record))
    model, _ = plots.load_model(base, adapter)
    sizes = map_sizes(model)
    layer = sizes.index(max(sizes))
    argv = ["attention", "--model", base, "--adapter", adapter, "--text_file", text,
            "--layer", str(layer), "--head", "0", "--dpi", "100", "--out", out]
    command = "python plots.py " + shlex.join(shown(a) if a in (base, adapter, text, out) else a for a in argv)
    if not plots.have_matplotlib():
        print(f"      a picture of LMAM's map needs matplotlib: pip install -r requirements-plots.txt, then draw it "
              f"from the adapter just written (from {ROOT}):\n      {command}")
        return
    print(f"      picture of layer {layer} (max |Attn_s| per layer: {', '.join(f'{x:.2f}' for x in sizes)}), head 0, "
          f"one test question with its answer:\n      {command}")
    plots.main(argv)


@contextlib.contextmanager
def deterministic(threads=None, seed=0):
    """The same numbers on every run on this machine. With several threads, the backward pass of
    LMAM's gather (a scatter-add) sums in an order that changes from run to run, and such
    differences, after 400 steps, moved LoRaDA-LA's accuracy under the evaluation prompt between 0%
    and 33%: torch's deterministic algorithms fix the order (train.py --deterministic). The threads
    are fixed too (a matrix product may round differently with another count), and every random
    draw is seeded (the data's, the model's, the order of the batches). Restores torch's settings."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])


class StageLine:
    """One progress line for a stage: rewritten in place on a terminal, printed once at the end
    elsewhere (a log file, a pipe)."""

    def __init__(self):
        self.tty, self.text = sys.stderr.isatty(), ""

    def show(self, text):
        self.text = text
        if self.tty:
            print(f"\r      {text}\033[K", end="", file=sys.stderr, flush=True)

    def close(self):
        print(("" if self.tty else f"      {self.text}"), file=sys.stderr, flush=True)


def prompt_offsets():
    """scripts/prompt_offsets.py (scripts/ is a folder of scripts, not a package), loaded from its file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("prompt_offsets", os.path.join(ROOT, "scripts", "prompt_offsets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def moves(n, what):
    """"keeps the instruction where training put it", "moves the response 1 position earlier"."""
    if n == 0:
        return f"keeps {what} where training put it"
    return f"moves {what} {abs(n)} position{'s' * (abs(n) != 1)} {'earlier' if n < 0 else 'later'}"


def finetune(base, name, flags, data_path, steps):
    """One train.py run into .cache/demo/run_NAME: its progress line on the terminal, everything else
    it prints (settings, presets, validation) in run_NAME/train.log."""
    out = os.path.join(CACHE, f"run_{name}")
    shutil.rmtree(out, ignore_errors=True)                       # each demo run starts fresh
    os.makedirs(out)
    log = os.path.join(out, "train.log")
    print(f"[3/4] fine-tuning with {name}, {steps} steps (train.py's output: {shown(log)})", flush=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        T.main(["--model", base, "--method", name, "--data", data_path, "--out_dir", out, "--device", "cpu",
                "--precision", "fp32", "--deterministic", "--max_steps", str(steps), "--batch_size", "16",
                "--micro_batch_size", "16", "--learning_rate", "1e-2", "--warmup_steps", "10", "--num_epochs", "100",
                "--val_set_size", "32", "--eval_step", "40", "--save_step", "1000", "--lora_dropout", "0.0",
                "--mask_prompt", *flags])
    return os.path.join(out, "adapter" + methods.ADAPTER_EXT)


def main(base=None, pretrain_steps=500, finetune_steps=400, n_train=800, n_test=60, threads=None, draw=True):
    with deterministic(threads) as n_threads:
        return run(base or os.path.join(CACHE, "base"), pretrain_steps, finetune_steps, n_train, n_test, n_threads,
                   draw)


def run(base, pretrain_steps, finetune_steps, n_train, n_test, n_threads, draw):
    t0 = time.time()
    os.makedirs(CACHE, exist_ok=True)
    print(f"demo: {n_threads} thread{'s' * (n_threads != 1)}, deterministic algorithms; everything goes to "
          f"{shown(CACHE)}/")
    pretrain(base, steps=pretrain_steps)
    rng = random.Random(123)
    data_path = os.path.join(CACHE, "mc_train.json")
    with open(data_path, "w") as f:
        json.dump(task(rng, n_train), f)
    test = task(random.Random(456), n_test)
    print(f"[2/4] generated a multiple-choice task in LLM-Adapters' format: {n_train} training, {n_test} test records")
    print("      e.g. " + json.dumps(test[0])[:160] + "...")
    # LoRaDA-LA: LMAM over the whole prompt (n = 160 tokens, s = 1/(d·600) as Table 19's 1/(4096·600)
    # for d = 4096, the default init) + LoRA r=1 on o_proj, down_proj + Adapter-FFN r=4 (17,808
    # parameters); LoRA alone at about the same budget (r=3 on q,k,v,up,down: 20,736). The loss is on
    # the response only (--mask_prompt) so that a few steps suffice.
    runs = {"lorada_la": ["--lmam_heads", "4", "--lmam_rank", "2", "--lmam_len", "160",
                          "--lmam_scale", str(1 / (CONFIG.dim * 600)), "--lora_r", "1", "--lora_alpha", "2",
                          "--adapter_r", "4"],
            "lora": ["--lora_r", "3", "--lora_alpha", "6"]}
    adapters = {"base": None}
    for name, flags in runs.items():
        adapters[name] = finetune(base, name, flags, data_path, finetune_steps)
    print(f"[4/4] evaluating the base model and both adapters on {n_test} held-out questions, in both prompts "
          f"(4 beams, as eval.py)", flush=True)
    line, acc = StageLine(), {}
    prompts = {"eval": llm_adapters.eval_prompt, "train": training_style_prompt}
    for name, adapter in adapters.items():
        for layout, prompt in prompts.items():
            line.show(f"{len(acc) + 1}/{len(adapters) * len(prompts)}: {name}, the "
                      f"{'evaluation' if layout == 'eval' else 'training'} prompt")
            acc[name, layout] = accuracy(base, adapter, test, prompt)
    line.show(f"{len(acc)} evaluations done ({time.time() - t0:.0f} s since the start)")
    line.close()
    before = acc["base", "eval"], acc["base", "train"]
    after = {name: (acc[name, "eval"], acc[name, "train"]) for name in runs}
    print("      accuracy (chance: 25%; the base model has never seen the format),")
    print("      with LLM-Adapters' evaluation prompt | with the training prompt's whitespace")
    print(f"      base model, before fine-tuning: {100 * before[0]:5.1f}% | {100 * before[1]:5.1f}%")
    for name, (a, a_train) in after.items():
        print(f"      {name:>9} after fine-tuning: {100 * a:5.1f}% | {100 * a_train:5.1f}%")
    moved = prompt_offsets().compare(load_tokenizer(base), test[0])
    print(f"      (LMAM's map is indexed by token position. Against the training prompt, the evaluation prompt\n"
          f"      {moves(moved['instruction'], 'the instruction')} and {moves(moved['answer'], 'the response')}: "
          f"README, scripts/prompt_offsets.py.)")
    if draw:
        draw_lmam(base, adapters["lorada_la"], test[0])
    print(f"done in {time.time() - t0:.0f} s")
    return before, after


if __name__ == "__main__":
    main()
