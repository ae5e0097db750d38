"""The CPU demo (`python train.py` with no arguments, or `python demo.py`): no network, a few minutes.
Its four steps are the four lines it prints:

[1/4] Pretrain a small LLaMA-architecture model on generated facts ("the grass is green."), with a
      sentencepiece tokenizer trained on them, and save it as a Hugging Face checkpoint
      (config.json + model.safetensors), the layout checkpoint.load() reads. Cached in .cache/demo/.
[2/4] Generate a multiple-choice task in LLM-Adapters' ARC format ("What color is the grass?\n\n
      Answer1: blue Answer2: green Answer3: red Answer4: yellow\n\nAnswer format: answer1/.../answer4"
      -> "the correct answer is answer2"); the base model knows the facts, not the format.
[3/4] Fine-tune with lorada_la and with LoRA at about the same parameter budget, through train.py.
[4/4] Evaluate the base model and both adapters with eval.py's code and print the accuracies.
"""
import json
import os
import random
import shutil
import time

import torch
import torch.nn.functional as F

import eval as E
import methods
import model as M
import train as T
from checkpoint import write_safetensors
from data import llm_adapters as D
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
            lines.append(D.train_prompt({"instruction": q, "input": "", "output": out}))
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
                                   # "\n": the trainer reads lines, so it would never see one. 16 spaces as
                                   # one piece: LLM-Adapters' prompts end in 16 spaces, and the training
                                   # prompt is then followed by the response while the evaluation prompt
                                   # stops there; with this piece both end on the same token.
                                   user_defined_symbols=["\n", "\u2581" * 16],
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


def pretrain(path, steps=500, seq=128, batch=24, seed=0):
    """Build (or reuse) the demo's base model at `path`."""
    if os.path.exists(os.path.join(path, "model.safetensors")):
        print(f"[1/4] reusing the pretrained demo model in {path}")
        return
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
    progress = T.Progress(steps)
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


def accuracy(model_path, adapter, records, prompt=D.eval_prompt):
    model, tok = E.load_for_eval(model_path, adapter)
    correct, total = E.evaluate_task(model, tok, "ARC-Easy", records, batch_size=16, num_beams=4,
                                     max_new_tokens=8, progress=False, prompt=prompt)
    return correct / total


def training_style_prompt(record):
    """The training prompt without the response: LLM-Adapters' evaluation prompt differs from it in
    whitespace (one token fewer here), which moves every later token by one position."""
    return D.train_prompt({**record, "output": ""})


def draw_lmam(base, adapter, record, out=os.path.join(ROOT, "docs", "figures", "demo_attention.png")):
    """A picture of what LMAM learned (plots.py, Figure 1's three panels): for one test question in
    the training layout, the softmax attention, Attn_s and their sum, in the layer whose map grew
    most (train.py's max |Attn_s|), first head. Only where matplotlib is installed."""
    import plots
    from lmam import map_sizes
    if not plots.have_matplotlib():
        print(f"      (a picture of LMAM's map: pip install -r requirements-plots.txt, then rerun; it goes to "
              f"{os.path.relpath(out, ROOT)})")
        return
    model, tok = plots.load_model(base, adapter)
    sizes = map_sizes(model)
    layer = sizes.index(max(sizes))
    print(f"      picture: {os.path.relpath(out, ROOT)}, layer {layer} (max |Attn_s| per layer: "
          f"{', '.join(f'{x:.2f}' for x in sizes)}), head 0, one test question with its answer")
    plots.plot_attention(model, tok, D.train_prompt(record), layer=layer, head=0, out=out, dpi=80,
                         title=f"lorada_la on the demo task, a test question in the training layout: layer {layer}, "
                               f"head 0")


def main(base=os.path.join(CACHE, "base"), pretrain_steps=500, finetune_steps=400, n_train=800, n_test=60):
    t0 = time.time()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    pretrain(base, steps=pretrain_steps)
    rng = random.Random(123)
    data_path = os.path.join(CACHE, "mc_train.json")
    with open(data_path, "w") as f:
        json.dump(task(rng, n_train), f)
    test = task(random.Random(456), n_test)
    print(f"[2/4] generated a multiple-choice task in LLM-Adapters' format: {n_train} training, {n_test} test records")
    print("      e.g. " + json.dumps(test[0])[:160] + "...")
    before = accuracy(base, None, test), accuracy(base, None, test, training_style_prompt)
    # LoRaDA-LA: LMAM over the whole prompt (n = 160 tokens, s = 1/(d·600) as Table 19's 1/(4096·600)
    # for d = 4096, the default init) + LoRA r=1 on o_proj, down_proj + Adapter-FFN r=4 (17,808
    # parameters); LoRA alone at about the same budget (r=3 on q,k,v,up,down: 20,736). The loss is on
    # the response only (--mask_prompt) so that a few steps suffice.
    runs = {"lorada_la": ["--lmam_heads", "4", "--lmam_rank", "2", "--lmam_len", "160",
                          "--lmam_scale", str(1 / (CONFIG.dim * 600)), "--lora_r", "1", "--lora_alpha", "2",
                          "--adapter_r", "4"],
            "lora": ["--lora_r", "3", "--lora_alpha", "6"]}
    after = {}
    for i, (name, flags) in enumerate(runs.items()):
        out = os.path.join(CACHE, f"run_{name}")
        shutil.rmtree(out, ignore_errors=True)                   # each demo run starts fresh
        print(f"[3/4] fine-tuning with {name}")
        T.main(["--model", base, "--method", name, "--data", data_path, "--out_dir", out, "--device", "cpu", "--max_steps",
                str(finetune_steps), "--batch_size", "16", "--micro_batch_size", "16", "--learning_rate", "1e-2",
                "--warmup_steps", "10", "--num_epochs", "100", "--val_set_size", "32", "--eval_step", "40", "--save_step", "1000",
                "--lora_dropout", "0.0", "--mask_prompt", "--quiet", *flags])
        adapter = os.path.join(out, "adapter" + methods.ADAPTER_EXT)
        after[name] = accuracy(base, adapter, test), accuracy(base, adapter, test, training_style_prompt)
    print(f"[4/4] accuracy on {n_test} held-out questions (chance: 25%; the base model has never seen the format),")
    print("      with LLM-Adapters' evaluation prompt | with the training prompt's whitespace")
    print(f"      base model, before fine-tuning: {100 * before[0]:5.1f}% | {100 * before[1]:5.1f}%")
    for name, (acc, acc_train) in after.items():
        print(f"      {name:>9} after fine-tuning: {100 * acc:5.1f}% | {100 * acc_train:5.1f}%")
    print("      (LMAM's map is indexed by token position; the evaluation prompt's whitespace differs from the\n"
          "      training prompt's, so every later token sits one position earlier than in training.)")
    draw_lmam(base, os.path.join(CACHE, "run_lorada_la", "adapter" + methods.ADAPTER_EXT), test[0])
    print(f"done in {time.time() - t0:.0f} s")
    return before, after


if __name__ == "__main__":
    main()
