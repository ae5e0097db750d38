"""The pieces of the real-model study (scripts/real_model_study.py, docs/results.md): rank
classification in LLM-Adapters' layouts, the map removed at evaluation (--lmam_off), LMAM's own
learning rate (--lmam_lr_scale), SmolLM2's presets and the study's split and statistics."""
import json
import math
import os

import pytest
import torch
from torch.testing import assert_close

import eval as E
import methods
import presets
import train
from checkpoint import load
from conftest import shared
from data import llm_adapters
from tokenizer import load_tokenizer

RECORDS = [
    {"instruction": "Is the sky blue?\n\nAnswer format: true/false", "answer": "true"},
    {"instruction": "Pick one: Answer1: red Answer2: green Answer3: blue\n\nAnswer format: answer1/answer2/answer3",
     "answer": "answer2"},
    {"instruction": "Which fits? Option1: Sam Option2: Kim Answer format: option1/option2", "answer": "option1"},
]


@pytest.fixture(scope="module")
def stories():
    model = load(shared("stories260K", "stories260K.bin"))
    return model, load_tokenizer(shared("stories260K", "tok512.model"))


def written_out_scores(model, tok, record, prompt):
    """Each candidate's full sequence through the model on its own; the summed log-probability of
    the tokens after the part all candidates share."""
    cands = ["true", "false"] if "true/false" in record["instruction"] else \
        [c.strip() for c in record["instruction"].lower().split("answer format:")[1].split("/")]
    seqs = [tok.encode(prompt(record) + f"the correct answer is {c}") for c in cands]
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    scores = []
    for s in seqs:
        with torch.no_grad():
            logp = model(torch.tensor([s])).log_softmax(-1)[0]
        scores.append(sum(logp[j - 1, s[j]].item() for j in range(n, len(s))))
    return cands, scores


@pytest.mark.parametrize("layout", [llm_adapters.eval_prompt, llm_adapters.train_prompt_only])
def test_rank_classification_equals_each_candidate_scored_on_its_own(stories, tmp_path, layout):
    model, tok = stories
    out = tmp_path / "t.rank.jsonl"
    correct, total = E.evaluate_rank(model, tok, "t", RECORDS, str(out), batch_size=2, prompt=layout, progress=False)
    lines = {r["index"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert total == 3 and correct == sum(r["correct"] for r in lines.values())
    paths = set()
    for i, rec in enumerate(RECORDS):
        cands, ref = written_out_scores(model, tok, rec, layout)
        _, own = E.candidate_sequences(tok, layout(rec), cands)
        paths.add(all(len(o) == 1 for o in own))
        assert_close(torch.tensor(lines[i]["scores"]), torch.tensor(ref), atol=1e-4, rtol=1e-4)
        assert lines[i]["prediction"] == cands[max(range(len(cands)), key=ref.__getitem__)]
    assert paths == {True, False}, "both the one-pass and the per-candidate paths must be exercised"


def test_rank_classification_rejects_an_answer_outside_the_candidates(stories):
    model, tok = stories
    with pytest.raises(ValueError, match="record 0: answer 'maybe' is not one of"):
        E.evaluate_rank(model, tok, "boolq", [{"instruction": "Q?\n\nAnswer format: true/false", "answer": "maybe"}],
                        progress=False)


def test_lmam_off_removes_the_map_and_nothing_else(stories):
    model, _ = stories
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        base = model(ids)
    methods.apply_method(model, "lora+lmam", lmam_heads=2, lmam_len=32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (1.0 if ".attn_map." in n else 0.05))   # a map and a LoRA update
        adapted = model(ids)
        assert (adapted - base).abs().max() > 1e-3
        assert E.remove_lmam(model) == model.cfg.n_layers
        without_map = model(ids)
        # the same LoRA, no map: LoRA's own contribution only
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
        assert_close(model(ids), base, atol=1e-5, rtol=1e-5)
    assert (without_map - adapted).abs().max() > 1e-4, "removing the map must change a model whose map is not zero"
    with pytest.raises(ValueError, match="no LMAM map"):
        E.remove_lmam(model)


def test_lmam_lr_scale_gives_the_map_its_own_learning_rate(tmp_path):
    data = os.path.join(llm_adapters.SAMPLES, "commonsense_sample.json")
    if not os.path.exists(data):
        pytest.skip(f"{data}: no sample file")
    seen = {}
    original = torch.optim.AdamW

    class Spy(original):
        def __init__(self, groups, **kw):
            super().__init__(groups, **kw)
            seen["groups"] = [(len(g["params"]), g["lr"]) for g in self.param_groups]
    torch.optim.AdamW = Spy
    try:
        train.main(["--model", shared("stories260K", "stories260K.bin"), "--tokenizer",
                    shared("stories260K", "tok512.model"), "--method", "lora+lmam", "--data", data, "--max_steps", "1",
                    "--lmam_heads", "2", "--lmam_len", "16",
                    "--out_dir", str(tmp_path), "--lmam_lr_scale", "0.1", "--learning_rate", "1e-3", "--quiet",
                    "--val_set_size", "0"])
    except SystemExit as e:
        assert not e.code
    finally:
        torch.optim.AdamW = Spy.__mro__[1]
    (n_rest, lr_rest), (n_map, lr_map) = seen["groups"]
    assert n_map == 5 * 2 and lr_rest == pytest.approx(1e-3) and lr_map == pytest.approx(1e-4)


def test_smollm2_presets_follow_the_paper_scaled_to_its_width():
    keys = ("llama", "smollm2-135m")
    lmam = methods.method_hparams("lmam", keys)
    assert (lmam["lmam_heads"], lmam["lmam_rank"], lmam["lmam_len"]) == (9, 2, 128)
    assert lmam["lmam_scale"] == pytest.approx(1 / (576 * 600))
    la = methods.method_hparams("lorada_la", keys)
    assert (la["lora_r"], la["adapter_r"], la["target_modules"]) == (1, round(18 * 576 / 4096), "o_proj,down_proj")
    for m in ("lora", "dora"):
        assert methods.method_hparams(m, keys)["lora_r"] == int(32 * 576 / 4096)
    both = methods.method_hparams("lora+lmam", keys)
    assert both["lora_r"] == methods.method_hparams("lora", keys)["lora_r"] and both["lmam_heads"] == 9
    assert 9 % lmam["lmam_heads"] == 0


def test_smollm2_dry_run_prints_the_shares(capsys):
    train.main(["--model", "smollm2-135m", "--method", "lorada_la", "--dry_run"])
    out = capsys.readouterr().out
    # LMAM 9·2·128·2·30 + LoRA r=1 on o (576+576) and down (1536+576) + Adapter-FFN r=3 (576·3·2 + 3 + 576) per layer
    added = 30 * (9 * 128 * 2 * 2 + (576 + 576) + (1536 + 576) + (576 * 3 * 2 + 3 + 576))
    assert f"trainable params: {added:,d}" in out


def study():
    import importlib.util
    spec = importlib.util.spec_from_file_location("real_model_study", os.path.join(E.__file__.rsplit("/", 1)[0],
                                                  "scripts", "real_model_study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mcnemar_and_wilson_against_known_values():
    mcnemar, wilson = study().mcnemar, study().wilson
    # 10 discordant pairs split 9:1 -> two-sided exact p = 2·(1 + 10) / 2^10
    a = [1] * 9 + [0] * 1 + [1] * 5
    b = [0] * 9 + [1] * 1 + [1] * 5
    assert mcnemar(a, b) == (9, 1, pytest.approx(22 / 1024))
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert mcnemar([1, 0], [1, 0])[2] == 1.0


def test_study_split_is_seeded_disjoint_and_refuses_other_settings(tmp_path):
    make_split = study().make_split
    shared("llm_adapters", "dataset", "piqa", "test.json")
    rule = make_split(str(tmp_path), ["piqa", "boolq"], 20, 30, seed=0)
    train_set = json.load(open(tmp_path / "data" / "train.json"))
    held = json.load(open(tmp_path / "data" / "heldout" / "piqa.json"))
    assert len(train_set) == 40 and len(held) == 30
    assert not {r["instruction"] for r in train_set} & {r["instruction"] for r in held}
    again = make_split(str(tmp_path), ["piqa", "boolq"], 20, 30, seed=0)
    assert again == rule
    with pytest.raises(SystemExit, match="seed"):
        make_split(str(tmp_path), ["piqa", "boolq"], 20, 30, seed=1)


def test_default_precision_is_bf16_where_the_cpu_has_it_and_names_itself(monkeypatch, capsys):
    import runs
    monkeypatch.delenv("LORADA_PRECISION", raising=False)
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(runs, "native_bf16_cpu", lambda: native)
        assert runs.default_precision("cpu") == want
    assert runs.default_precision("cuda:0") == "bf16"
    monkeypatch.setenv("LORADA_PRECISION", "fp32")
    assert runs.default_precision("cuda") == "fp32"
    monkeypatch.setenv("LORADA_PRECISION", "fp16")
    with pytest.raises(ValueError, match="LORADA_PRECISION='fp16': expected fp32 or bf16"):
        runs.default_precision("cpu")


def test_rank_by_text_scores_each_option_per_character(stories):
    model, tok = stories
    rec = {"instruction": "Please choose: Make tea.\n\nSolution1: Boil water and add leaves.\n\nSolution2: Freeze "
                          "the cup.\n\nAnswer format: solution1/solution2", "answer": "solution1"}
    assert llm_adapters.option_texts(rec["instruction"]) == {"solution1": "Boil water and add leaves.",
                                                  "solution2": "Freeze the cup."}
    (correct, total) = E.evaluate_rank(model, tok, "piqa", [rec], progress=False, by="text",
                                       prompt=llm_adapters.train_prompt_only)
    texts = list(llm_adapters.option_texts(rec["instruction"]).values())
    question = {**rec, "instruction": "Please choose: Make tea."}          # the options are not shown
    assert llm_adapters.without_options(rec["instruction"]) == question["instruction"]
    seqs = [tok.encode(llm_adapters.train_prompt_only(question) + f"the correct answer is {t}") for t in texts]
    n = next(j for j in range(min(map(len, seqs))) if seqs[0][j] != seqs[1][j])
    ref = []
    for s in seqs:
        with torch.no_grad():
            logp = model(torch.tensor([s])).log_softmax(-1)[0]
        ref.append(sum(logp[j - 1, s[j]].item() for j in range(n, len(s))) / len(tok.decode(s[n:])))
    assert total == 1 and correct == int(ref[0] > ref[1])


def test_plots_study_draws_the_results_and_refuses_other_json(tmp_path):
    pytest.importorskip("matplotlib")
    import plots
    results = {"chance": {"piqa": 0.5}, "majority": {"piqa": 0.52},
               "runs": {"base": {"rank/train": {"per_task": {"piqa": 0.6}, "avg": 0.6, "avg_ci": [0.5, 0.7]}},
                        "lmam (map removed)": {"rank/train": {"per_task": {"piqa": 0.55}, "avg": 0.55,
                                                              "avg_ci": [0.45, 0.65]}}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    out = tmp_path / "study.png"
    plots.main(["study", str(tmp_path / "results.json"), "--out", str(out)])
    assert out.stat().st_size > 10_000
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a results.json of scripts/real_model_study.py"):
        plots.main(["study", str(tmp_path / "other.json"), "--out", str(tmp_path / "x.png")])
