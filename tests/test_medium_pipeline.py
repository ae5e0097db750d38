"""GLUE, XSum and WMT16 en-ro: loaders on the real files, metrics against hand computation, and a
tiny end-to-end run per pipeline (train.py with lorada_a, then eval.py)."""
import json
import os
import shutil

import pytest
import torch

import eval as E
import methods
import train as T
from checkpoint import load, read_safetensors
from conftest import main_stopped_by_sigterm, shared
from data import glue
from data import seq2seq
from helpers import glue_dir, markdown_tables, shows, tiny_bart_ckpt, tiny_roberta_ckpt
from hf_encdec import byte_vocab_dir, train_mbart_spm
from tokenizer import load_tokenizer

# -- loaders -------------------------------------------------------------------------------------

GLUE_COUNTS = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3667, 408), "stsb": (5749, 1500),
               "rte": (2490, 277), "wnli": (635, 71)}          # ../shared/data/glue/SOURCE.md


@pytest.mark.parametrize("task", list(GLUE_COUNTS))
def test_glue_loaders_on_the_real_files(task):
    root = shared("glue")
    train = glue.load_glue(task, glue.split_file(task, root, "train"))
    dev = glue.load_glue(task, glue.split_file(task, root, task))
    assert (len(train), len(dev)) == GLUE_COUNTS[task]
    labels = {r["label"] for r in dev}
    if task == "stsb":
        assert all(isinstance(v, float) and 0 <= v <= 5 for v in labels) and len(labels) > 10
    else:
        assert labels == set(range(glue.num_labels(task)))
    assert all(r["text_a"] for r in dev) and all((r["text_b"] is None) == (task in ("cola", "sst2")) for r in dev)


def test_glue_known_rows():
    """Rows read by hand from the files: CoLA without a header, quotes kept literally, MRPC's BOM."""
    root = shared("glue")
    cola = glue.load_glue("cola", glue.split_file("cola", root, "cola"))
    assert cola[0] == {"text_a": "The sailors rode the breeze clear of the rocks.", "text_b": None, "label": 1}
    mrpc = glue.load_glue("mrpc", glue.split_file("mrpc", root, "train"))
    assert mrpc[0]["text_a"].startswith('Amrozi accused his brother , whom he called " the witness "')
    rte = glue.load_glue("rte", glue.split_file("rte", root, "rte"))
    assert rte[0]["label"] == 1                                  # not_entailment


def test_glue_malformed(tmp_path):
    bad = tmp_path / "dev.tsv"
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match=r"dev.tsv:3: column 4: label 'maybe' is not one of entailment, not_entailment"):
        glue.load_glue("rte", str(bad))
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: 3 columns, expected at least 4 \(column 4 missing\)"):
        glue.load_glue("rte", str(bad))
    bad.write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match=r"dev.tsv:1: header .* expected 'index' \(GLUE rte\)"):
        glue.load_glue("rte", str(bad))
    bad.write_text("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                   "0\tg\tf\ty\to\ts\ts\ta\tb\tfive\n")
    with pytest.raises(ValueError, match=r"dev.tsv:2: column 10: score 'five' is not a number"):
        glue.load_glue("stsb", str(bad))
    with pytest.raises(FileNotFoundError, match="no dev_matched.tsv for GLUE mnli"):
        glue.split_file("mnli", str(tmp_path), "mnli-m")


def test_seq2seq_loaders_on_the_real_files():
    root = shared("hf-seq2seq-samples")
    xsum = seq2seq.load_pairs("xsum", os.path.join(root, "xsum", "sample.json"))
    assert len(xsum) == 10 and xsum[0]["source"].startswith("The warning begins at 22:00 GMT on Saturday")
    for split, n in (("train", 11), ("val", 16), ("test", 20)):
        js = seq2seq.load_pairs("wmt16-en-ro", os.path.join(root, "wmt_en_ro_json"), split)
        txt = seq2seq.load_pairs("wmt16-en-ro", os.path.join(root, "wmt_en_ro_text"), split)
        assert len(js) == len(txt) == n
        assert js == txt                              # the two layouts hold the same sentences


def test_seq2seq_malformed(tmp_path):
    f = tmp_path / "train.json"
    f.write_text('{"document": "a", "summary": "b"}\n{"document": "a"}\n')
    with pytest.raises(ValueError, match=r"train.json:2: missing field 'summary'"):
        seq2seq.load_pairs("xsum", str(f))
    f.write_text('{"translation": {"en": "a", "ro": 3}}\n')
    with pytest.raises(ValueError, match=r"train.json:1: field 'translation.ro' is a int, expected a string"):
        seq2seq.load_pairs("wmt16-en-ro", str(f))
    f.write_text('{"translation": {"en": "a"\n')
    with pytest.raises(ValueError, match=r"train.json:1: not valid JSON"):
        seq2seq.load_pairs("wmt16-en-ro", str(f))
    os.remove(f)
    (tmp_path / "train.source").write_text("a\nb\n")
    (tmp_path / "train.target").write_text("x\n")
    with pytest.raises(ValueError, match=r"train.source has 2 lines but .*train.target has 1"):
        seq2seq.load_pairs("wmt16-en-ro", str(tmp_path), "train")


def test_token_batches_respect_the_budget():
    import random
    rng = random.Random(0)
    lengths = [rng.randint(3, 60) for _ in range(500)]
    batches = seq2seq.token_batches(lengths, 256, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(len(b) * max(lengths[i] for i in b) <= 256 for b in batches)
    assert batches == seq2seq.token_batches(lengths, 256, seed=1) != seq2seq.token_batches(lengths, 256, seed=2)


# -- metrics -------------------------------------------------------------------------------------

def test_glue_metrics_by_hand():
    p, l = [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1]
    # tp 3, tn 1, fp 1, fn 1: accuracy 4/6, F1 = 2·3 / (4 + 4), MCC = (3 - 1) / √(4·4·2·2)
    assert E.glue_metric("mrpc", p, l) == pytest.approx({"accuracy": 4 / 6, "f1": 0.75})
    assert E.glue_metric("cola", p, l) == pytest.approx({"matthews_correlation": 2 / 8})
    assert E.glue_metric("cola", [1, 1], [0, 1]) == {"matthews_correlation": 0.0}      # undefined -> 0
    assert E.glue_metric("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}
    # STS-B: y = 2x has Pearson 1; Spearman with a tie: ranks (1, 2.5, 2.5, 4) vs (1, 2, 3, 4)
    x = [1.0, 2.0, 3.0, 4.0]
    assert E.glue_metric("stsb", x, [2 * v for v in x]) == pytest.approx({"pearson": 1.0, "spearmanr": 1.0})
    sp = E.glue_metric("stsb", [1.0, 2.0, 2.0, 4.0], x)["spearmanr"]
    assert sp == pytest.approx(4.5 / (4.5 * 5) ** 0.5)       # Σ(rx-2.5)(ry-2.5)=4.5, Σ(rx-2.5)²=4.5, Σ(ry-2.5)²=5


def test_rouge_by_hand():
    pytest.importorskip("rouge_score")
    # unigrams: pred {the, cat, sat} vs ref {the, cat, ran}: P = R = 2/3; bigrams: "the cat" 1 of 2
    r = E.rouge(["the cat sat"], ["the cat ran"])
    assert r == pytest.approx({"rouge1": 100 * 2 / 3, "rouge2": 50.0, "rougeL": 100 * 2 / 3})
    assert E.rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(100.0)      # Porter stemming


def test_bleu_by_hand():
    pytest.importorskip("sacrebleu")
    same = "Acesta este un test foarte simplu ."
    assert E.bleu([same], [same]) == pytest.approx({"sacrebleu": 100.0, "bleu_ro_tok": 100.0})
    # diacritics (and cedilla vs comma-below forms) count only in the standard score
    hyp, ref = "Şi aceasta este o ţară frumoasă, în mod clar.", "Și aceasta este o țară frumoasa, in mod clar."
    b = E.bleu([hyp], [ref])
    assert b["bleu_ro_tok"] == pytest.approx(100.0) and b["sacrebleu"] < 60
    # by hand: 3/4 unigrams, 2/3 bigrams, 1/2 trigrams, 0/1 4-grams, no brevity penalty. He et al.'s convention
    # has no smoothing: 0; sacreBLEU's default "exp" smoothing counts the empty 4-gram precision as 1/2
    b = E.bleu(["a b c d"], ["a b c e"])
    assert b["bleu_ro_tok"] == 0.0
    assert b["sacrebleu"] == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)
    assert E.romanian_postprocess("Ştiinţă „citată”") == 'Stiinta "citata"'


def test_tables():
    res = {"mnli-m": {"accuracy": 0.8}, "mnli-mm": {"accuracy": 0.7}, "cola": {"matthews_correlation": 0.5}}
    [[row]] = markdown_tables(E.glue_table(res, "lorada_a"))
    assert list(row) == ["Method", "MNLI", "SST2", "QQP", "QNLI", "STS-B", "MRPC", "RTE", "CoLA", "mean"]   # Table 5's
    assert row["Method"] == "lorada_a" and shows(row["MNLI"], 80.0) and shows(row["CoLA"], 50.0), row   # MNLI: matched
    assert shows(row["mean"], 65.0) and all(row[c] == "–" for c in ("SST2", "QQP", "QNLI", "STS-B", "MRPC", "RTE")), row
    [[row]] = markdown_tables(E.seq2seq_table({"xsum": {"rouge1": 40.0, "rouge2": 20.0, "rougeL": 30.0}}, "m"))
    assert row["Method"] == "m" and row["MT (BLEU)"] == "–", row
    r1, r2, rl = row["XSum (R-1/2/L)"].split("/")
    assert shows(r1, 40.0) and shows(r2, 20.0) and shows(rl, 30.0), row


# -- tiny end-to-end runs --------------------------------------------------------------------------

LORADA_A_TINY = ["--lmam_heads", "2", "--lmam_rank", "2", "--lmam_len", "32", "--adapter_r", "4", "--quiet"]


def test_glue_end_to_end_and_resume(tmp_path):
    ckpt = tiny_roberta_ckpt(tmp_path / "roberta")
    data = glue_dir(tmp_path)
    args = ["--model", ckpt, "--method", "lorada_a", "--task", "sst2", "--data", data, "--batch_size", "4",
            "--num_epochs", "2", "--learning_rate", "1e-2", "--eval_step", "3", "--save_step", "2",
            *LORADA_A_TINY]
    T.main(args + ["--out_dir", str(tmp_path / "a")])
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and all("val_accuracy" in r for r in log if r["step"] % 3 == 0)
    best = max(r["val_accuracy"] for r in log if "val_accuracy" in r)
    # eval.py on the dev set reproduces the best validation accuracy with the saved adapter (head included)
    res = E.main(["--model", ckpt, "--adapter", str(tmp_path / "a" / "adapter.safetensors"), "--task", "sst2",
                  "--data", data, "--out_dir", str(tmp_path / "eval")])
    assert res["sst2"]["accuracy"] == pytest.approx(best) and res["sst2"]["total"] == 8
    assert json.load(open(tmp_path / "eval" / "results.json"))["sst2"]["accuracy"] == pytest.approx(best)
    # a run stopped by SIGTERM after step 5 and resumed ends bit-identical (dropout 0.1: the RNG matters)
    main_stopped_by_sigterm(T.main, args + ["--out_dir", str(tmp_path / "b")], T.PIPELINES, "glue", after=5)
    T.main(args + ["--out_dir", str(tmp_path / "b"), "--resume"])
    a, b = (read_safetensors(str(tmp_path / d / "adapter.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("head.") for k in a)                      # the GLUE head trained and saved


def test_stsb_regression_end_to_end(tmp_path):
    ckpt = tiny_roberta_ckpt(tmp_path / "roberta")
    d = tmp_path / "STS-B"
    d.mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = "".join(f"{i}\tg\tf\t2012\t{i}\tx\ty\ta b {i}\ta c {i}\t{i % 6}.0\n" for i in range(12))
    (d / "train.tsv").write_text(head + rows)
    (d / "dev.tsv").write_text(head + rows)
    T.main(["--model", ckpt, "--method", "bitfit", "--task", "stsb", "--data", str(d), "--batch_size", "4",
            "--num_epochs", "1", "--out_dir", str(tmp_path / "o"), "--quiet"])
    res = E.main(["--model", ckpt, "--adapter", str(tmp_path / "o" / "adapter.safetensors"), "--task", "stsb",
                  "--data", str(d), "--out_dir", str(tmp_path / "e")])
    assert set(res["stsb"]) == {"pearson", "spearmanr", "total", "fingerprint"}


def test_xsum_end_to_end(tmp_path):
    pytest.importorskip("rouge_score")
    sample = shared("hf-seq2seq-samples", "xsum", "sample.json")
    data = tmp_path / "xsum"
    data.mkdir()
    for split in ("train", "val", "test"):
        shutil.copy(sample, data / f"{split}.json")
    ckpt = tiny_bart_ckpt(tmp_path / "bart")
    byte_vocab_dir(ckpt)
    T.main(["--model", ckpt, "--method", "lorada_a", "--task", "xsum", "--data", str(data), "--batch_size", "4",
            "--micro_batch_size", "2", "--max_steps", "3", "--cutoff_len", "128", "--max_target_len", "48",
            "--val_set_size", "4", "--eval_step", "3", "--out_dir", str(tmp_path / "o"), *LORADA_A_TINY])
    log = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and "val_loss" in log[-1]
    assert json.load(open(tmp_path / "o" / "args.json"))["train"]["label_smoothing"] == 0.1
    res = E.main(["--model", ckpt, "--adapter", str(tmp_path / "o" / "adapter.safetensors"), "--task", "xsum",
                  "--data", str(data), "--limit", "3", "--num_beams", "2", "--out_dir", str(tmp_path / "e")])
    assert set(res["xsum"]) == {"rouge1", "rouge2", "rougeL", "total", "fingerprint"} and res["xsum"]["total"] == 3
    lines = (tmp_path / "e" / "xsum.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all("hypothesis" in json.loads(x) for x in lines)
    positions = load(ckpt).cfg.max_positions
    with pytest.raises(SystemExit, match=f"--max_source_len {positions + 1}: expected 1 to the model's {positions}"):
        E.main(["--model", ckpt, "--task", "xsum", "--data", str(data), "--limit", "1", "--max_source_len",
                str(positions + 1), "--out_dir", str(tmp_path / "e2")])


def test_mt_end_to_end(tmp_path):
    pytest.importorskip("sacrebleu")
    data = shared("hf-seq2seq-samples", "wmt_en_ro_text")
    lines = []
    for split in ("train", "val"):
        for ext in ("source", "target"):
            lines += open(os.path.join(data, f"{split}.{ext}"), encoding="utf-8").read().splitlines()
    ckpt = str(tmp_path / "mbart")
    train_mbart_spm(lines, ckpt, vocab_size=300)
    tiny_bart_ckpt(ckpt, "mbart", vocab=327)
    tok = load_tokenizer(ckpt)
    assert tok.vocab_size == 327
    T.main(["--model", ckpt, "--method", "lorada_a", "--task", "wmt16-en-ro", "--data", data, "--max_tokens", "600",
            "--update_freq", "2", "--max_steps", "3", "--val_set_size", "4", "--eval_step", "3",
            "--out_dir", str(tmp_path / "o"), *LORADA_A_TINY])
    log = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and "val_loss" in log[-1]
    model = load(ckpt)
    methods.load_adapter(model, str(tmp_path / "o" / "adapter.safetensors"))
    assert model.peft_method["hparams"]["adapter_r"] == 4 and model.encoder.layers[0].self_attn.attn_map is not None
    assert model.decoder.layers[0].self_attn.attn_map is None          # LMAM in the encoder only (Table 15)
    res = E.main(["--model", ckpt, "--adapter", str(tmp_path / "o" / "adapter.safetensors"), "--task",
                  "wmt16-en-ro", "--data", data, "--limit", "3", "--num_beams", "2", "--out_dir", str(tmp_path / "e")])
    assert set(res["wmt16-en-ro"]) == {"sacrebleu", "bleu_ro_tok", "total", "fingerprint"}


def test_glue_layouts_absent_from_shared(tmp_path):
    """MNLI (two dev files, gold_label last), QNLI and QQP in their GLUE layouts (not in ../shared)."""
    d = tmp_path / "MNLI"
    d.mkdir()
    head = "index\tpromptID\tpairID\tgenre\ts1_bin\ts2_bin\ts1_parse\ts2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
    (d / "dev_matched.tsv").write_text(head + "0\tp\tq\tg\tb\tb\tp\tp\tA cat sits.\tAn animal sits.\tentailment\tentailment\n")
    (d / "dev_mismatched.tsv").write_text(head + "0\tp\tq\tg\tb\tb\tp\tp\tIt rains.\tIt is dry.\tcontradiction\tcontradiction\n"
                                                  "1\tp\tq\tg\tb\tb\tp\tp\tX.\tY.\tneutral\tneutral\n")
    m = glue.load_glue("mnli", glue.split_file("mnli", str(tmp_path), "mnli-m"))
    mm = glue.load_glue("mnli", glue.split_file("mnli", str(d), "mnli-mm"))
    assert m == [{"text_a": "A cat sits.", "text_b": "An animal sits.", "label": 0}]
    assert [r["label"] for r in mm] == [2, 1] and glue.num_labels("mnli") == 3
    q = tmp_path / "qnli.tsv"
    q.write_text("index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tnot_entailment\n")
    assert glue.load_glue("qnli", str(q)) == [{"text_a": "Who?", "text_b": "Him.", "label": 1}]
    qq = tmp_path / "qqp.tsv"
    qq.write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tHow?\tHow so?\t1\n1\t3\t4\tbroken row\n")
    assert glue.load_glue("qqp", str(qq)) == [{"text_a": "How?", "text_b": "How so?", "label": 1}]   # bad row skipped
