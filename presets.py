"""Every number this project takes from the paper and from the papers it compares with: one row
each, with its source.

METHOD_PRESETS: (method, key) -> hyperparameters over the method's defaults (its keyword defaults in
methods.py). A key is a model family ("llama", "roberta", "bart", "mbart"), a checkpoint name
("llama-7b", ..., model.py's presets), a task ("sst2", ..., "math") or a family on a task
("roberta/sst2"). They apply in that order, family, then name, then task, then family/task, and the
command line last (methods.method_hparams). NAMED_PRESETS are chosen by train.py --preset.

TRAIN_PRESETS: training hyperparameters. TRAIN_DEFAULTS, then the pipeline's row ("llm", "glue",
"xsum", "mt", "quanta", ...), then the (method, pipeline), (method, checkpoint name) and (method, task) rows,
then the command line (methods.train_hparams).

Every row is added with the source it comes from (Rows.cite), which `train.py --dry_run` prints
beside each value. Sources: LLM-Adapters (Hu et al. 2023: finetune.py and its run commands), He et
al. 2021 ("Towards a Unified View", jxhe/unify-parameter-efficient-tuning: their exps/*.sh), the
DoRA and QuanTA scripts, and the LoRaDA paper's Tables 15-19 (the underlined choices). Where the
paper is silent or inconsistent, the row says which reading it takes (README, "Choices").
"""


class Rows(dict):
    """Preset rows, {key: {hyperparameter: value}}, each with the source it comes from
    (`source[key]`), added a block at a time by `cite`."""

    def __init__(self, name: str):
        super().__init__()
        self.name, self.source = name, {}

    def cite(self, source: str, rows: dict):
        """Add `rows`, all taken from `source` (a table of the paper, a script)."""
        self.update(rows)
        self.source.update(dict.fromkeys(rows, source))

    def where(self, key) -> str:
        """The row `key` and its source, as --dry_run prints them."""
        return f"presets.py {self.name}[{key!r}] ({self.source[key]})"


# --- Settings that several rows share, named once -------------------------------------------------
# He et al.'s baselines on the medium models: LoRA r=16 on q, v; Houlsby adapters of 200 after every
# attention and FFN.
HE_LORA = dict(lora_r=16, lora_alpha=32.0, lora_dropout=0.1, target_modules="q_proj,v_proj")
HE_SERIES = dict(adapter_r=200, adapter_scale=1.0, adapter_dropout=0.1, target_modules="out_proj,fc2")
# LMAM per model (the defaults of methods.lmam are LLaMA-7B's, Table 19: h_s 32, r 2, n 128, 1/s 4096·600)
LMAM_LLAMA3_8B = dict(lmam_scale=1 / (4096 * 1200))                                   # Table 19 (1200 of 1200, 1500)
LMAM_LLAMA_13B = dict(lmam_heads=40, lmam_scale=1 / (5120 * 600))                     # Table 19
LMAM_LLAMA2_70B = dict(lmam_heads=64, lmam_scale=1 / (8192 * 1600))                   # Table 19 (1600 of 1600, 1200)
LMAM_ROBERTA = dict(lmam_heads=3, lmam_rank=3, lmam_len=512, lmam_scale=1 / 255)      # Table 16 (n per task below)
LMAM_BART = dict(lmam_heads=16, lmam_rank=22, lmam_len=512, lmam_scale=1.0)           # Table 15, XSum
LMAM_MBART = dict(lmam_heads=16, lmam_rank=64, lmam_len=128, lmam_scale=1.0)          # Table 15, MT (n: 128 of 128/256/512)
LMAM_TINY = dict(lmam_heads=2, lmam_len=16, lmam_scale=1 / (64 * 600))                # tests, demo: 1/(d·600), d = 64
GLUE_LMAM_LEN = dict(mnli=512, sst2=512, mrpc=256, cola=512, qnli=256, qqp=256, rte=512, stsb=256)   # Table 16

METHOD_PRESETS = Rows("METHOD_PRESETS")
# --- He et al.'s baselines (their exps/run_glue.sh, run_xsum.sh, run_mt.sh) --------------------------
METHOD_PRESETS.cite("He et al. 2021, exps/*.sh", {
    ("lora", "roberta"): HE_LORA, ("lora", "bart"): HE_LORA, ("lora", "mbart"): HE_LORA,
    ("dora", "roberta"): HE_LORA, ("dora", "bart"): HE_LORA, ("dora", "mbart"): HE_LORA,
    ("series", "roberta"): HE_SERIES, ("series", "bart"): HE_SERIES, ("series", "mbart"): HE_SERIES,
    ("prefix", "roberta"): dict(prefix_len=200, prefix_mid_dim=800),
    ("prefix", "bart"): dict(prefix_len=30, prefix_mid_dim=800),
    ("prefix", "mbart"): dict(prefix_len=30, prefix_mid_dim=800),
    ("adapter_ffn", "roberta"): dict(adapter_r=16, adapter_scale=2.0, adapter_dropout=0.1),   # run_glue.sh
    ("adapter_ffn", "bart"): dict(adapter_r=512, adapter_scale=4.0, adapter_dropout=0.1),     # run_xsum.sh
    ("adapter_ffn", "mbart"): dict(adapter_r=512, adapter_scale=4.0, adapter_dropout=0.1),    # run_mt.sh
    ("mam", "roberta"): dict(prefix_len=16, adapter_r=16, adapter_scale=2.0, adapter_dropout=0.1),   # run_glue.sh
    ("mam", "bart"): dict(adapter_dropout=0.1),
    ("mam", "mbart"): dict(adapter_dropout=0.1),
})

# --- QuanTA's commonsense scripts: 16-8-8-4 for d = 4096, 16-8-8-5 for d = 5120 ----------------------
METHOD_PRESETS.cite("QuanTA's commonsense scripts", {
    ("quanta", "llama-13b"): dict(quanta_dims="16-8-8-5"),
    ("quanta", "llama2-13b"): dict(quanta_dims="16-8-8-5"),
    ("quanta", "llama2-70b"): dict(quanta_dims="16-8-8-8"),
})

# --- LMAM alone ----------------------------------------------------------------------------------------
METHOD_PRESETS.cite("Table 19", {
    ("lmam", "llama3-8b"): LMAM_LLAMA3_8B,
    ("lmam", "llama-13b"): LMAM_LLAMA_13B,
    ("lmam", "llama2-13b"): LMAM_LLAMA_13B,
    ("lmam", "llama2-70b"): LMAM_LLAMA2_70B,
})
METHOD_PRESETS.cite("Table 16", {("lmam", "roberta"): LMAM_ROBERTA})
METHOD_PRESETS.cite("Table 15", {("lmam", "bart"): LMAM_BART, ("lmam", "mbart"): LMAM_MBART})

# --- LoRaDA-LA, Table 19 (the defaults are LLaMA-7B's). Table 19 lists two LoRA placements,
# O+Down and O+Up+Down; the printed # Params (%) say which each model used. "Dropout 0.05" is
# read as LoRA's dropout.
METHOD_PRESETS.cite("Table 19", {
    ("lorada_la", "llama2-7b"): dict(adapter_r=15),
    ("lorada_la", "llama3-8b"): dict(LMAM_LLAMA3_8B, lora_r=2, lora_alpha=4.0, adapter_r=2,
                                     target_modules="o_proj,up_proj,down_proj"),
    ("lorada_la", "llama-13b"): dict(LMAM_LLAMA_13B, adapter_r=12),              # adapter 12 of 12, 14
    ("lorada_la", "llama2-13b"): dict(LMAM_LLAMA_13B, adapter_r=12),
    ("lorada_la", "llama2-70b"): dict(LMAM_LLAMA2_70B, adapter_r=7, target_modules="o_proj,up_proj,down_proj"),
})

# --- LoRaDA-Q, Table 17 (the defaults: LMAM r=1, n=128, QuanTA 16-8-8-4 on q_proj, v_proj).
# Table 17 gives no s: Table 19's 1/(d·600) for the same model is taken. Counts: 7B 3,014,656 =
# 0.0447% (Table 4: 0.044), 3-8B 0.0375% (0.037), 13B 4,126,720 = 0.0317% where Table 4 prints
# 0.029, QuanTA 16-8-8-5's own share (3,717,120 = 0.0286%) without LMAM's 409,600.
# Table 4's row is reproduced in QuanTA's pipeline: train.py --protocol quanta (5 epochs, below).
METHOD_PRESETS.cite("Table 17, with Table 19's s", {
    ("lorada_q", "llama3-8b"): LMAM_LLAMA3_8B,
    ("lorada_q", "llama-13b"): dict(LMAM_LLAMA_13B, quanta_dims="16-8-8-5"),
    ("lorada_q", "llama2-13b"): dict(LMAM_LLAMA_13B, quanta_dims="16-8-8-5"),
    ("lorada_q", "llama2-70b"): dict(LMAM_LLAMA2_70B, quanta_dims="16-8-8-8"),
})
# §4.1.3: "For the Arithmetic Reasoning benchmark, our rank and length are set to 2 and 256"
# (A.5 says Table 17, r=1 and n=128, applies there too; §4.1.3 is taken). Table 8 prints 0.19%,
# which no QuanTA setting of Table 17 reaches: this row gives 0.056% on LLaMA2-7B.
METHOD_PRESETS.cite("§4.1.3", {("lorada_q", "math"): dict(lmam_rank=2, lmam_len=256)})

# --- LoRaDA-A: Table 16 (RoBERTa-base, GLUE) and Table 15 (BART-large XSum, mBART-large MT).
# On LLaMA the paper gives none: the defaults (Table 19's LMAM, He et al.'s GLUE adapter).
METHOD_PRESETS.cite("Table 16", {
    ("lorada_a", "roberta"): dict(LMAM_ROBERTA, adapter_r=16, adapter_scale=2.0, adapter_dropout=0.1)})
METHOD_PRESETS.cite("Table 15", {
    ("lorada_a", "bart"): dict(LMAM_BART, adapter_r=512, adapter_scale=4.0, adapter_dropout=0.1),
    ("lorada_a", "mbart"): dict(LMAM_MBART, adapter_r=820, adapter_scale=4.0, adapter_dropout=0.1),
})
METHOD_PRESETS.cite("Table 19's LMAM (no LoRaDA-A row on LLaMA)", {
    ("lorada_a", "llama3-8b"): LMAM_LLAMA3_8B,
    ("lorada_a", "llama-13b"): LMAM_LLAMA_13B,
    ("lorada_a", "llama2-13b"): LMAM_LLAMA_13B,
    ("lorada_a", "llama2-70b"): LMAM_LLAMA2_70B,
})

# --- LMAM as a plug-in, Tables 6 and 18. On LLaMA the defaults are Table 18's baselines (LoRA
# r=4, DoRA r=4, the series adapter r=2; α is not given: 2r, LLM-Adapters' ratio) with Table
# 19's LMAM. On the medium models: He et al.'s baseline and the family's LMAM.
METHOD_PRESETS.cite("He et al.'s baseline + the family's LMAM (Tables 15, 16)", {
    ("lora+lmam", "roberta"): dict(HE_LORA, **LMAM_ROBERTA),
    ("lora+lmam", "bart"): dict(HE_LORA, **LMAM_BART),
    ("lora+lmam", "mbart"): dict(HE_LORA, **LMAM_MBART),
    ("dora+lmam", "roberta"): dict(HE_LORA, **LMAM_ROBERTA),
    ("dora+lmam", "bart"): dict(HE_LORA, **LMAM_BART),
    ("dora+lmam", "mbart"): dict(HE_LORA, **LMAM_MBART),
    ("series+lmam", "roberta"): dict(HE_SERIES, **LMAM_ROBERTA),
    ("series+lmam", "bart"): dict(HE_SERIES, **LMAM_BART),
    ("series+lmam", "mbart"): dict(HE_SERIES, **LMAM_MBART),
})
METHOD_PRESETS.cite("Table 19's LMAM", {
    ("lora+lmam", "llama3-8b"): LMAM_LLAMA3_8B, ("dora+lmam", "llama3-8b"): LMAM_LLAMA3_8B,
    ("series+lmam", "llama3-8b"): LMAM_LLAMA3_8B, ("parallel+lmam", "llama3-8b"): LMAM_LLAMA3_8B,
    ("lora+lmam", "llama-13b"): LMAM_LLAMA_13B, ("dora+lmam", "llama-13b"): LMAM_LLAMA_13B,
    ("series+lmam", "llama-13b"): LMAM_LLAMA_13B, ("parallel+lmam", "llama-13b"): LMAM_LLAMA_13B,
    ("lora+lmam", "llama2-13b"): LMAM_LLAMA_13B, ("dora+lmam", "llama2-13b"): LMAM_LLAMA_13B,
    ("series+lmam", "llama2-13b"): LMAM_LLAMA_13B, ("parallel+lmam", "llama2-13b"): LMAM_LLAMA_13B,
    ("lora+lmam", "llama2-70b"): LMAM_LLAMA2_70B, ("dora+lmam", "llama2-70b"): LMAM_LLAMA2_70B,
    ("series+lmam", "llama2-70b"): LMAM_LLAMA2_70B, ("parallel+lmam", "llama2-70b"): LMAM_LLAMA2_70B,
    ("longlora+lmam", "llama3-8b"): LMAM_LLAMA3_8B, ("longlora+lmam", "llama-13b"): LMAM_LLAMA_13B,
    ("longlora+lmam", "llama2-13b"): LMAM_LLAMA_13B, ("longlora+lmam", "llama2-70b"): LMAM_LLAMA2_70B,
})

# --- The tiny test models (model.py's llama-tiny, d = 64): not in the paper; LMAM's 1/(d·600), QuanTA
# dims that multiply to 64.
METHOD_PRESETS.cite("not in the paper: the tiny test models", {
    (method, tiny): row for tiny in ("llama-tiny", "llama-tiny-gqa") for method, row in {
        "quanta": dict(quanta_dims="4-4-4"), "lmam": LMAM_TINY, "lorada_la": dict(LMAM_TINY, adapter_r=4),
        "lorada_q": dict(LMAM_TINY, quanta_dims="4-4-4"), "lorada_a": LMAM_TINY, "lora+lmam": LMAM_TINY,
        "dora+lmam": LMAM_TINY, "series+lmam": LMAM_TINY, "parallel+lmam": LMAM_TINY}.items()})

# --- SmolLM2-135M (d = 576, 9 heads, 3 KV heads): not in the paper; its rows in the paper's form, for the
# real-model study (docs/results.md). LMAM: Table 19's LLaMA-7B row with h_s = the number of heads (32 of
# 32 there, 9 of 9 here), r = 2, n = 128 and 1/s = d·600. LoRA and DoRA: LLM-Adapters' / DoRA's r = 32 at
# d = 4096 scaled to the width, 32·576/4096 = 4.5 -> 4 (α = 2r, their ratio). LoRaDA-LA: Table 19's LoRA
# r = 1 (no smaller rank exists) and its Adapter-FFN r = 18 at d = 4096 scaled the same way, 18·576/4096
# = 2.5 -> 3. LoRA + LMAM keeps the LoRA row's r = 4, so that the pair differs by the map alone.
LMAM_SMOLLM2 = dict(lmam_heads=9, lmam_rank=2, lmam_len=128, lmam_scale=1 / (576 * 600))
SMOLLM2_LORA = dict(lora_r=4, lora_alpha=8.0)
METHOD_PRESETS.cite("not in the paper: Table 19's form at SmolLM2's width (docs/results.md)", {
    ("lmam", "smollm2-135m"): LMAM_SMOLLM2,
    ("lora", "smollm2-135m"): SMOLLM2_LORA, ("dora", "smollm2-135m"): SMOLLM2_LORA,
    ("lorada_la", "smollm2-135m"): dict(LMAM_SMOLLM2, adapter_r=3),
    ("lorada_q", "smollm2-135m"): dict(LMAM_SMOLLM2, lmam_rank=1, quanta_dims="8-8-9"),
    ("lorada_a", "smollm2-135m"): LMAM_SMOLLM2,
    ("lora+lmam", "smollm2-135m"): dict(SMOLLM2_LORA, **LMAM_SMOLLM2),
    ("dora+lmam", "smollm2-135m"): dict(SMOLLM2_LORA, **LMAM_SMOLLM2),
    ("series+lmam", "smollm2-135m"): LMAM_SMOLLM2, ("parallel+lmam", "smollm2-135m"): LMAM_SMOLLM2,
})
METHOD_PRESETS.cite("Table 16, n per GLUE task", {
    (method, task): dict(lmam_len=n) for method in ("lmam", "lorada_a", "lora+lmam", "dora+lmam", "series+lmam")
    for task, n in GLUE_LMAM_LEN.items()})

# --- DeBERTaV3-base, Table 11 -----------------------------------------------------------------------
# A.5: Table 16 applies, "when using the DeBERTaV3_base model, the only modification is setting the
# rank to 2" (LMAM's rank; the n-per-task rows above apply). A.2.1 says "LMAM's rank and length set to
# 2 and 128": its n = 128 contradicts A.5's "only modification"; A.5 is taken (--lmam_len 128 gives
# A.2.1's). Neither reaches Table 11's 0.29M: LMAM r2 + Adapter-FFN r16 is 378,048 (n 512) or 341,184
# (n 256) parameters without the GLUE head, the adapter alone 304,320 (README, "Choices").
# The other methods have no DeBERTa settings in the paper: He et al.'s GLUE settings, as on RoBERTa.
LMAM_DEBERTA = dict(LMAM_ROBERTA, lmam_rank=2)
ENCODER_LINEAR = "q_proj,k_proj,v_proj,out_proj,fc1,fc2"      # every linear layer of an encoder block
METHOD_PRESETS.cite("A.5: Table 16 with LMAM rank 2", {
    ("lorada_a", "deberta"): dict(LMAM_DEBERTA, adapter_r=16, adapter_scale=2.0, adapter_dropout=0.1),
    ("lmam", "deberta"): LMAM_DEBERTA,
})
METHOD_PRESETS.cite("He et al.'s GLUE settings (none for DeBERTa in the paper)", {
    ("lora", "deberta"): HE_LORA, ("dora", "deberta"): HE_LORA, ("series", "deberta"): HE_SERIES,
    ("prefix", "deberta"): dict(prefix_len=200, prefix_mid_dim=800),
    ("adapter_ffn", "deberta"): dict(adapter_r=16, adapter_scale=2.0, adapter_dropout=0.1),
    ("mam", "deberta"): dict(prefix_len=16, adapter_r=16, adapter_scale=2.0, adapter_dropout=0.1),
    ("lora+lmam", "deberta"): dict(HE_LORA, **LMAM_DEBERTA), ("dora+lmam", "deberta"): dict(HE_LORA, **LMAM_DEBERTA),
    ("series+lmam", "deberta"): dict(HE_SERIES, **LMAM_DEBERTA),
})
# AdaLoRA and SoRA on the encoders: every linear layer of a block (AdaLoRA's NLU scripts, --lora_module
# query,key,value,intermediate,layer.output,attention.output; SoRA's default_modified_modules).
METHOD_PRESETS.cite("AdaLoRA's NLU scripts, SoRA's default_modified_modules", {
    (method, family): dict(target_modules=ENCODER_LINEAR)
    for family in ("deberta", "roberta", "bart", "mbart") for method in ("adalora", "sora")})
# AdaLoRA's DeBERTaV3-base GLUE scripts (QingruZhang/AdaLoRA, NLU/scripts/run_debertav3_<task>.sh):
# --target_rank, --lora_r (the initial rank), --reg_orth_coef, --init_warmup, --final_warmup,
# --mask_interval, --lora_alpha; β1 = β2 = 0.85 everywhere. They are the 0.32M budget of the AdaLoRA
# paper; Table 11's AdaLoRA row (1.27M, copied from the SoRA paper) has no released script.
METHOD_PRESETS.cite("AdaLoRA's run_debertav3_<task>.sh", {
    ("adalora", task): dict(adalora_target_r=target, adalora_init_r=init, adalora_orth_reg=orth, adalora_tinit=tinit,
                            adalora_tfinal=tfinal, adalora_delta_t=dt, lora_alpha=alpha)
    for task, (target, init, orth, tinit, tfinal, dt, alpha) in {
        "mnli": (1, 3, 0.1, 8000, 50000, 100, 16.0), "sst2": (1, 2, 0.1, 6000, 22000, 100, 16.0),
        "cola": (1, 3, 0.1, 800, 3500, 10, 32.0), "qqp": (1, 2, 0.1, 8000, 25000, 100, 16.0),
        "qnli": (1, 2, 0.1, 2000, 8000, 100, 32.0), "rte": (1, 2, 0.3, 600, 1800, 1, 32.0),
        "mrpc": (1, 2, 0.1, 600, 1800, 1, 32.0), "stsb": (1, 2, 0.3, 800, 2000, 10, 32.0)}.items()})


# --- Training -------------------------------------------------------------------------------------
# LLM-Adapters' finetune.py commands: batch 16, micro-batch 4, lr 3e-4, 3 epochs, cutoff 256, 120
# validation examples, eval/save every 80 steps, 100 warmup steps, no weight decay, clip 1.0,
# seed 42. The keys after seed are for the RoBERTa/BART pipelines (0 = off): max_steps (overrides
# num_epochs), warmup_ratio (of the steps, instead of warmup_steps), label_smoothing,
# max_target_len (cutoff_len is the source's), max_tokens (token-budget micro-batches, MT) with
# update_freq of them per step, Adam's beta2 and eps (transformers' defaults).
TRAIN_DEFAULTS = dict(batch_size=16, micro_batch_size=4, num_epochs=3, learning_rate=3e-4, cutoff_len=256,
                      val_set_size=120, eval_step=80, save_step=80, warmup_steps=100, weight_decay=0.0,
                      max_grad_norm=1.0, seed=42, max_steps=0, warmup_ratio=0.0, label_smoothing=0.0,
                      max_target_len=0, max_tokens=0, update_freq=1, adam_beta2=0.999, adam_eps=1e-8,
                      lr_schedule="linear", s2_ratio=0.0, lmam_lr_scale=1.0)
TRAIN_DEFAULTS_SOURCE = "LLM-Adapters' finetune.py; the rest: off, or transformers'"

TRAIN_PRESETS = Rows("TRAIN_PRESETS")
# The pipelines. The medium models: He et al.'s scripts; eval_step / save_step 0: once per epoch;
# val_set_size: their max_eval_samples (the first 1600 examples).
TRAIN_PRESETS.cite("LLM-Adapters' finetune.py", {"llm": dict()})
TRAIN_PRESETS.cite("He et al. 2021, exps/*.sh", {
    "glue": dict(batch_size=32, micro_batch_size=32, num_epochs=10, learning_rate=1e-4, cutoff_len=512,
                 val_set_size=1600, eval_step=0, save_step=0, warmup_steps=0, warmup_ratio=0.06, weight_decay=0.1,
                 adam_beta2=0.98, adam_eps=1e-6),
    "xsum": dict(batch_size=64, micro_batch_size=16, num_epochs=30, max_steps=100_000, learning_rate=5e-5,
                 cutoff_len=512, max_target_len=128, val_set_size=1600, eval_step=3000, save_step=3000,
                 warmup_steps=0, weight_decay=0.01, max_grad_norm=0.1, label_smoothing=0.1),
    "mt": dict(batch_size=1, micro_batch_size=1, num_epochs=100, max_steps=50_000, learning_rate=5e-5,
               cutoff_len=150, max_target_len=150, max_tokens=4096, update_freq=4, val_set_size=1600,
               eval_step=5000, save_step=5000, warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
               label_smoothing=0.1, adam_beta2=0.98, adam_eps=1e-6),
    ("prefix", "mt"): dict(label_smoothing=0.0, weight_decay=0.0),            # He et al.'s run_en_ro note
})
# plain text cut into rows of cutoff_len tokens (LongLoRA's RedPajama pipeline); no validation
TRAIN_PRESETS.cite("LongLoRA's pipeline: no validation split", {"lm": dict(val_set_size=0, eval_step=0, save_step=100)})
# LongLoRA's README command: 8 GPUs × 1 × gradient accumulation 8 = 64 rows of 8192 tokens, lr 2e-5
# constant after 20 warmup steps, 1000 steps, no weight decay; S²-Attn with groups of L/4
LONGLORA_TRAIN = dict(batch_size=64, micro_batch_size=1, max_steps=1000, num_epochs=0, learning_rate=2e-5,
                      lr_schedule="constant", warmup_steps=20, weight_decay=0.0, cutoff_len=8192, s2_ratio=0.25)
TRAIN_PRESETS.cite("LongLoRA's README command",
                   {("longlora", "lm"): LONGLORA_TRAIN, ("longlora+lmam", "lm"): LONGLORA_TRAIN})

# LLaMA rows: each method's reference script
TRAIN_PRESETS.cite("LLM-Adapters' math command", {
    ("prefix", "llm"): dict(batch_size=8, num_epochs=5, learning_rate=3e-2, eval_step=10, save_step=10)})
TRAIN_PRESETS.cite("DoRA's scripts", {
    ("dora", "llm"): dict(learning_rate=2e-4), ("dora", "llama3-8b"): dict(learning_rate=1e-4)})
TRAIN_PRESETS.cite("QuanTA's ft_com.sh", {
    ("quanta", "llm"): dict(batch_size=4, micro_batch_size=1, num_epochs=5, learning_rate=5e-5, warmup_steps=0)})
# Table 17; epochs are not given: LLM-Adapters' 3, the pipeline this runs in (QuanTA's ft_com.sh: 5)
TRAIN_PRESETS.cite("Table 17", {
    ("lorada_q", "llm"): dict(batch_size=8, learning_rate=1e-4, warmup_steps=0, num_epochs=3)})
TRAIN_PRESETS.cite("Table 19", {
    ("lorada_la", "llm"): dict(batch_size=4, learning_rate=1e-4),
    ("lorada_la", "llama3-8b"): dict(learning_rate=2e-4),
    ("lorada_la", "llama-13b"): dict(batch_size=3),
    ("lorada_la", "llama2-13b"): dict(batch_size=3),
    ("lorada_la", "llama2-70b"): dict(batch_size=2),
})

# LoRaDA-A: Table 16 (GLUE, 20 of "20,40" epochs, per-task learning rates) and Table 15
TRAIN_PRESETS.cite("Table 16", {
    ("lorada_a", "glue"): dict(num_epochs=20),
    ("lorada_a", "mnli"): dict(learning_rate=3e-4), ("lorada_a", "sst2"): dict(learning_rate=3e-4),
    ("lorada_a", "mrpc"): dict(learning_rate=3e-4), ("lorada_a", "cola"): dict(learning_rate=5e-4),
    ("lorada_a", "qnli"): dict(learning_rate=1e-4), ("lorada_a", "qqp"): dict(learning_rate=1e-4),
    ("lorada_a", "rte"): dict(learning_rate=7e-4), ("lorada_a", "stsb"): dict(learning_rate=5e-4),
})
TRAIN_PRESETS.cite("Table 15", {
    ("lorada_a", "xsum"): dict(learning_rate=5e-5),                            # 5e-5 of 3e-5, 5e-5
    ("lorada_a", "mt"): dict(learning_rate=5e-5),
})

# --- Table 11's baselines on DeBERTaV3-base (GLUE) ----------------------------------------------------
# AdaLoRA's scripts (run_debertav3_<task>.sh): batch 32, their max_seq_length, learning rate, epochs,
# warmup and weight decay, transformers' Trainer defaults otherwise (Adam β2 0.999, ε 1e-8, clip 1.0).
# Their --cls_dropout (0 to 0.2) is the head's, which here comes from the checkpoint's config.
TRAIN_PRESETS.cite("AdaLoRA's run_debertav3_<task>.sh", {
    ("adalora", "glue"): dict(warmup_ratio=0.0, adam_beta2=0.999, adam_eps=1e-8, max_grad_norm=1.0),
    **{("adalora", task): dict(batch_size=32, micro_batch_size=32, cutoff_len=length, learning_rate=lr,
                               num_epochs=epochs, warmup_steps=warmup, weight_decay=wd)
       for task, (length, lr, epochs, warmup, wd) in {
           "mnli": (256, 5e-4, 7, 1000, 0.0), "sst2": (128, 8e-4, 24, 1000, 0.01), "cola": (64, 8e-4, 25, 100, 0.0),
           "qqp": (320, 8e-4, 5, 2000, 0.01), "qnli": (512, 5e-4, 5, 500, 0.01), "rte": (320, 1.2e-3, 50, 200, 0.01),
           "mrpc": (320, 1e-3, 30, 0, 0.01), "stsb": (128, 2.2e-3, 25, 100, 0.1)}.items()}})
TRAIN_PRESETS[("adalora", "mrpc")]["warmup_ratio"] = 0.1                   # run_debertav3_mrpc.sh: --warmup_ratio 0.1
# SoRA's run_glue_sora_no_schedule.sh (its example task is STS-B; the repository has no per-task
# settings): batch 8, 20 epochs, lr 8e-4 (the gates' too), clip 0.1, warmup ratio 0.06, weight decay
# 0.1, max_seq_length 128, transformers' Adam defaults.
TRAIN_PRESETS.cite("SoRA's run_glue_sora_no_schedule.sh", {
    ("sora", "glue"): dict(batch_size=8, micro_batch_size=8, num_epochs=20, learning_rate=8e-4, cutoff_len=128,
                           max_grad_norm=0.1, warmup_ratio=0.06, weight_decay=0.1, adam_beta2=0.999, adam_eps=1e-8)})


# --- Reproduction presets (README, "Reproduction notes") --------------------------------------------
# Table 5's baselines on RoBERTa-base at its printed 0.5% (MNLI and SST-2 copied from He et al., the
# other tasks run "following He et al."), which gives no sizes: each is derived from Table 5's 0.5%,
# the size whose count (this code's count without the GLUE head, share = added / (base + added), as
# peft prints it) is nearest to 0.5%. Keyed "roberta/TASK": a GLUE task on RoBERTa only (DeBERTa's
# Table 11 has other baselines), after the family's He et al. rows above.
#   prefix l=34 (no reparametrisation MLP: the 0.5% are the prefixes themselves; He et al.'s MLP of
#     mid_dim 800, --prefix_mid_dim 800, trains 14.8M more, which they do not count): 626,688 = 0.503%
#     (l=33: 0.488%);
#   Houlsby adapter r=16 after attention (with its LayerNorm) and FFN: 627,072 = 0.503% (r=15: 0.473%);
#   Adapter-FFN r=33: 617,868 = 0.496% (r=34: 0.510%).
# LoRA r=16 on q, v (0.473%) and MAM l=16 + r=16 (0.481% counting the prefixes, 11.2% with the MLP)
# keep He et al.'s rows; LoRaDA-A keeps Table 16 (0.333% without the head).
TABLE5_SIZES = {"prefix": dict(prefix_len=34, prefix_mid_dim=0), "series": dict(adapter_r=16),
                "adapter_ffn": dict(adapter_r=33)}
METHOD_PRESETS.cite("Table 5's 0.5%, the nearest size (README, Reproduction notes)", {
    (method, f"roberta/{task}"): hp for method, hp in TABLE5_SIZES.items() for task in GLUE_LMAM_LEN})
# LLaMA prefix tuning on commonsense: LLM-Adapters' default num_virtual_tokens=30 (finetune.py; its
# only prefix command, math, passes 10): 7,864,320 = 0.1166% of LLaMA-7B, Table 4's 0.11 (truncated).
# On LLaMA-13B the same l=30 counts 12,288,000 = 0.0943%, where Table 4 prints 0.03: that row is
# l=10 (4,096,000 = 0.0315%). Table 4 copies both rows (LLM-Adapters/DoRA); no one l gives both.
# Math keeps l=10 (the method's default).
METHOD_PRESETS.cite("LLM-Adapters' finetune.py default (Table 4)", {("prefix", "commonsense"): dict(prefix_len=30)})

# Named presets (train.py --preset NAME): a paper row's settings that are not the default for the
# method, model and task. The method's row fills the flags the command line leaves unset.
NAMED_PRESETS = {
    "table5-0.06": dict(
        about="Table 5's two 0.06% rows, RoBERTa-base on GLUE, sizes not given by the paper (a guess): "
              "lorada_a with Adapter-FFN r=3 and LMAM h_s=1, r=1 (Figure 3's 'Ours (0.06%)' has h_s = r = 1; "
              "Table 16's n per task): 76,836 = 0.062% (n 512) or 70,692 = 0.057% (n 256); adapter_ffn r=4: "
              "82,992 = 0.067%, the nearest to 0.06% (r=3: 0.052%; no rank gives 0.06% rounded)",
        rows={"lorada_a": dict(adapter_r=3, lmam_heads=1, lmam_rank=1), "adapter_ffn": dict(adapter_r=4)}),
}

# QuanTA's protocol (train.py --protocol quanta, its run/ft_com.sh): batch 4 (micro-batch 1 ×
# gradient accumulation 4), 5 epochs, lr 5e-5, no warmup, no weight decay, seed 31415 (the split's
# seed, 271828, is data/quanta.py's), 400 dev examples, evaluation and saving every 25000 / 4 =
# 6250 steps, max_length 2048. The math settings are not released (ft_com.sh is commonsense's; its
# run.sh is DROP's): the same are taken.
TRAIN_PRESETS.cite("QuanTA's run/ft_com.sh", {
    "quanta": dict(batch_size=4, micro_batch_size=1, num_epochs=5, learning_rate=5e-5, warmup_steps=0,
                   weight_decay=0.0, seed=31415, val_set_size=400, eval_step=6250, save_step=6250, cutoff_len=2048)})
# LoRaDA-Q "following QuanTA" (Table 17: batch 8, lr 1e-4, no warmup; its epochs: QuanTA's 5)
TRAIN_PRESETS.cite("Table 17", {("lorada_q", "quanta"): dict(batch_size=8, learning_rate=1e-4, warmup_steps=0)})
