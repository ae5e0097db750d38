"""The byte-level BPE tokenizers read from a Hugging Face tokenizer.json and from a GGUF file's
metadata (tokenizer.ByteLevelBPETokenizer, the GGUF sentencepiece path), id for id against
transformers' fast tokenizer (the tokenizers library): on every record of LLM-Adapters' test sets
(instruction and training prompt), on edge cases, the golden ids of SmolLM2's SOURCE.md, variants
of the tokenizer.json (Split, Digits, add_prefix_space, added-token flags, BOS/EOS template), and
what is refused.

The reference data is SmolLM2-135M-Instruct's GGUF (tokenizer.ggml.pre "smollm"). transformers
5.23 reads that file's tokenizer with a plain ByteLevel pre-tokenizer: it has no entry for "smollm",
so it does not split digits off, unlike llama.cpp ("smollm": \\p{N} isolated, then GPT-2's regex) and
SmolLM2's own tokenizer.json (Digits(individual_digits) then ByteLevel). Ours follows llama.cpp and
the model's tokenizer; the GGUF tests compare with transformers' GGUF tokenizer whose pre-tokenizer
is set back to SmolLM2's, and the tokenizer.json saved from transformers' GGUF tokenizer (plain
ByteLevel, as written) is compared with transformers as is. The two differ only where a digit
follows a run of white space ("x  123"): 62 of the 19,676 test instructions, 280 of their training
prompts."""
import functools
import glob
import json
import os
import sys

import pytest

from conftest import shared
from tokenizer import (GGUF_MISSING, ByteLevelBPETokenizer, SentencePieceTokenizer, load_tokenizer,
                       tokenizer_from_json)

GGUF_DIR = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GOLDEN_PROMPT, GOLDEN_IDS = "The capital of France is", [504, 3575, 282, 4649, 314]
GOLDEN_NEXT = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

EDGE_CASES = [
    "", " ", "  ", "\t", "\n", "\n\n", "\r\n", " " * 16, "x" + " " * 16 + "y", "\n" + " " * 16 + "12 apples",
    "a\n\n\nb", "\t \n \r\n  x", "hello   world  ", " leading", "trailing ", "tabs\tand\ttabs\t\t",
    "mixed \t\n \u00a0\u3000\u2028 spaces", "x  123", "  1", "12345678901234567890", "3.14159 and 2,718,281",
    "1st 2nd 3rd 10000th", "x\u00b2\u00b3 \u00bd \u216b \u0663\u0664", "caf\u00e9 na\u00efve r\u00e9sum\u00e9",
    "e\u0301 o\u0308 n\u0303", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u4e2d\u6587\uff0c\u6807\u70b9\u3002", "\ud55c\uad6d\uc5b4", "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0420\u0443\u0441\u0441\u043a\u0438\u0439",
    "\U0001F600\U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\u200d\U0001F467", "don't I'M we'll THEY'RE",
    "<|im_start|>user\nhi<|im_end|>", "<|im_start|><|im_end|>", "a<|endoftext|>b", " <|im_start|> x ",
    "<|im_start", "<repo_name>x<file_sep>", "\x00\x01 control \x7f", "!\x04!", "a\x04b", "\U00040000 \U000F0000",
]


@functools.cache
def llm_adapters_texts():
    """Every record of LLM-Adapters' test sets: (instructions, training prompts)."""
    from data.llm_adapters import train_prompt
    files = sorted(glob.glob(os.path.join(shared("llm_adapters", "dataset"), "*", "test.json")))
    if not files:
        pytest.skip("no LLM-Adapters test sets in ../shared/data/llm_adapters/dataset")
    records = [r for f in files for r in json.load(open(f, encoding="utf-8"))]
    return [r["instruction"] for r in records], [train_prompt(r) for r in records]


def assert_same_ids(ours, reference_ids, texts, what):
    bad = [(t, r, o) for t, r in zip(texts, reference_ids) if (o := ours.encode(t)) != r]
    assert not bad, f"{what}: {len(bad)} of {len(texts)} texts differ, e.g. " + "; ".join(
        f"{t[:80]!r}: {r[:20]} != {o[:20]}" for t, r, o in bad[:3])


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    """SmolLM2's tokenizer: ours and transformers', from the GGUF and from the tokenizer.json
    transformers saves from it (in a temporary directory); `smollm_pre`: transformers' GGUF tokenizer
    with SmolLM2's own pre-tokenizer (Digits, then ByteLevel)."""
    path = shared(GGUF_DIR, GGUF_NAME)
    pytest.importorskip("gguf", reason="the optional gguf package is not installed (requirements-gguf.txt)")
    transformers = pytest.importorskip("transformers", reason="transformers (the test-only reference) is not installed")
    from tokenizers import Tokenizer, pre_tokenizers
    folder = os.path.dirname(path)
    before = sorted(os.listdir(folder))
    hf_gguf = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    saved = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf_gguf.save_pretrained(saved)
    smollm_pre = Tokenizer.from_str(hf_gguf.backend_tokenizer.to_str())
    smollm_pre.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tokenizers = dict(hf_gguf=hf_gguf, hf_json=transformers.AutoTokenizer.from_pretrained(saved),
                      smollm_pre=smollm_pre, saved=str(saved),
                      ours_gguf=load_tokenizer(folder), ours_json=load_tokenizer(str(saved)))
    assert sorted(os.listdir(folder)) == before, "reading the GGUF wrote next to it"
    return tokenizers


# ----------------------------------------------------------------------------- SmolLM2

def test_golden_ids_and_special_tokens(smollm):
    """SOURCE.md's golden prompt ids (no BOS: the tokenizer adds none) and generated text; the ids."""
    for name in ("ours_gguf", "ours_json"):
        tok = smollm[name]
        assert isinstance(tok, ByteLevelBPETokenizer), name
        assert tok.encode(GOLDEN_PROMPT) == GOLDEN_IDS, name
        assert tok.decode(GOLDEN_NEXT) == " Paris.\n\nThe answer is: 201", name
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152), name
        assert (tok.add_bos, tok.add_eos) == (False, False), name
        assert tok.encode(GOLDEN_PROMPT, bos=True, eos=True) == [1] + GOLDEN_IDS + [2], name
    assert smollm["ours_gguf"].path.endswith(GGUF_NAME)
    assert smollm["ours_json"].path == os.path.join(smollm["saved"], "tokenizer.json")
    assert smollm["hf_gguf"](GOLDEN_PROMPT).input_ids == GOLDEN_IDS


def test_tokenizer_json_matches_transformers_on_llm_adapters(smollm):
    """Every test-set record's instruction and LLM-Adapters training prompt, as transformers'
    tokenizer(text) gives them from the saved tokenizer.json, whose tokenizers pipeline is the one
    transformers built from the GGUF (so these are its ids too)."""
    pipeline = {name: json.loads(smollm[name].backend_tokenizer.to_str()) for name in ("hf_json", "hf_gguf")}
    assert pipeline["hf_json"] == pipeline["hf_gguf"]
    instructions, prompts = llm_adapters_texts()
    assert_same_ids(smollm["ours_json"], smollm["hf_json"](instructions).input_ids, instructions, "instructions")
    assert_same_ids(smollm["ours_json"], smollm["hf_json"](prompts).input_ids, prompts, "training prompts")


def test_gguf_matches_smollm_pre_tokenizer_on_llm_adapters(smollm):
    """The GGUF's tokenizer (tokenizer.ggml.pre "smollm": digits split off, as llama.cpp and SmolLM2's
    tokenizer.json do) against transformers' GGUF tokenizer with that pre-tokenizer."""
    instructions, prompts = llm_adapters_texts()
    for texts, what in ((instructions, "instructions"), (prompts, "training prompts")):
        reference = [e.ids for e in smollm["smollm_pre"].encode_batch(texts)]
        assert_same_ids(smollm["ours_gguf"], reference, texts, what)


def test_edge_cases(smollm):
    """White space runs, digits, accents, CJK, combining marks, emoji, special tokens in the text,
    control characters, bytes SmolLM2's vocabulary lacks (0x04, 0xF1), the empty string; decode
    inverts encode (skip_special=False keeps the special tokens' text), and decodes as transformers."""
    hf_json, hf_gguf = smollm["hf_json"], smollm["hf_gguf"]
    assert_same_ids(smollm["ours_json"], hf_json(EDGE_CASES).input_ids, EDGE_CASES, "tokenizer.json")
    assert_same_ids(smollm["ours_json"], hf_gguf(EDGE_CASES).input_ids, EDGE_CASES, "tokenizer.json vs GGUF")
    assert_same_ids(smollm["ours_gguf"], [e.ids for e in smollm["smollm_pre"].encode_batch(EDGE_CASES)],
                    EDGE_CASES, "GGUF")
    assert smollm["ours_gguf"].encode("x  123") != hf_gguf("x  123").input_ids    # transformers' "smollm" gap
    lacking = ("\x04", "\U00040000")                # bytes the vocabulary lacks are dropped: no round trip
    for tok in (smollm["ours_json"], smollm["ours_gguf"]):
        for text in EDGE_CASES:
            ids = tok.encode(text)
            assert tok.decode(ids) == hf_json.decode(ids, skip_special_tokens=True), repr(text)
            assert tok.decode(ids, skip_special=False) == hf_json.decode(ids), repr(text)
            if not any(c in text for c in lacking):
                assert tok.decode(ids, skip_special=False) == text, repr(text)
    assert smollm["ours_json"].decode(smollm["ours_json"].encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"


# ----------------------------------------------------------------------------- tokenizer.json variants

def write_variant(smollm, tmp_path, name, edit):
    with open(os.path.join(smollm["saved"], "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    edit(spec)
    folder = tmp_path / name
    folder.mkdir()
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return str(path)


def split_template_added(spec):
    """Llama 3's layout: Split (its regex) + ByteLevel without regex, merges as "a b" strings, a
    [BOS] $A [EOS] template; and added tokens with each matching rule."""
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
    special = lambda token: {"SpecialToken": {"id": token, "type_id": 0}}
    sequence = lambda name: {"Sequence": {"id": name, "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [special("<|im_start|>"), sequence("A"), special("<|im_end|>")],
        "pair": [sequence("A"), sequence("B")],
        "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in (("<|im_start|>", 1), ("<|im_end|>", 2))}}
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=False)
    spec["added_tokens"] += [
        {**flags, "id": 49152, "content": "<tool>", "lstrip": True, "rstrip": True},
        {**flags, "id": 49153, "content": "zork", "single_word": True, "normalized": True},
        {**flags, "id": 49154, "content": "[NL]", "normalized": True, "rstrip": True, "special": True},
        {**flags, "id": 49155, "content": "<tool>x", "special": True}]


def digits_prefix_space(spec):
    """SmolLM2's own pre-tokenizer, with ByteLevel's add_prefix_space on."""
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}


VARIANT_TEXTS = EDGE_CASES + [
    "a  <tool>  b", "<tool>x and <tool> x", "\n<tool>\n", "zork zorkzork zork_ zorks, zork", "(zork) zork.",
    "x [NL]  y", "[NL][NL]", "a<|im_start|>b", "It's 3:45pm, 12\u00b0C.\n\n  Done."]


@pytest.mark.parametrize("edit", [split_template_added, digits_prefix_space])
def test_tokenizer_json_variants_match_tokenizers(smollm, tmp_path, edit):
    """Variants of the tokenizer.json against the tokenizers library reading the same file: edge
    cases and the first 400 training prompts; decode against it too."""
    from tokenizers import Tokenizer
    path = write_variant(smollm, tmp_path, edit.__name__, edit)
    ours, reference = load_tokenizer(path), Tokenizer.from_file(path)
    texts = VARIANT_TEXTS + llm_adapters_texts()[1][:400]
    assert_same_ids(ours, [e.ids for e in reference.encode_batch(texts)], texts, edit.__name__)
    for text in VARIANT_TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == reference.decode(ids), repr(text)
        assert ours.decode(ids, skip_special=False) == reference.decode(ids, skip_special_tokens=False), repr(text)
    if edit is split_template_added:
        assert (ours.add_bos, ours.add_eos, ours.bos_id, ours.eos_id, ours.vocab_size) == (True, True, 1, 2, 49156)
        assert ours.encode("hi", bos=False, eos=False) == reference.encode("hi", add_special_tokens=False).ids


def test_llama3_tokenizer_json(tmp_path):
    """Llama 3's layout, built by transformers' TikTokenConverter from Meta's tokenizer.model: a
    Split regex + ByteLevel without regex, 280k merges (several per token), ignore_merges, 256
    special tokens, a Sequence post-processor whose template adds <|begin_of_text|>. Same ids as the
    tokenizers library and (without the BOS) as TiktokenTokenizer."""
    model_file = shared("llama3-tokenizer", "tokenizer.model")
    converter = pytest.importorskip("transformers.convert_slow_tokenizer",
                                    reason="transformers (the test-only reference) is not installed")
    from tokenizers import processors
    from tokenizer import TiktokenTokenizer
    reference = converter.TikTokenConverter(model_file, extra_special_tokens=TiktokenTokenizer.SPECIAL).converted()
    reference.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 128000)])])
    reference.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    ours, tiktoken_model = load_tokenizer(str(tmp_path)), TiktokenTokenizer(model_file)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (128000, 128001, 128001, True)
    assert ours.vocab_size == 128256
    texts = EDGE_CASES + llm_adapters_texts()[1][:1000]
    assert_same_ids(ours, [e.ids for e in reference.encode_batch(texts)], texts, "Llama 3 tokenizer.json")
    plain = [t for t in texts if "<|" not in t]
    assert_same_ids(ours, [tiktoken_model.encode(t) for t in plain], plain, "Llama 3 tokenizer.model")
    assert ours.encode("<|start_header_id|>user<|end_header_id|>", bos=False) == [128006, 882, 128007]


def minimal_tokenizer_json(**changes):
    """A small byte-level BPE tokenizer.json (the 256 byte tokens, two merges), with changes."""
    from tokenizer import bytes_to_unicode
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(alphabet)} | {"Ġt": 256, "he": 257}
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [["Ġ", "t"], ["h", "e"]]}}
    for key, value in changes.items():
        if key.startswith("model_"):
            spec["model"][key[len("model_"):]] = value
        else:
            spec[key] = value
    return spec


@pytest.mark.parametrize("changes, named", [
    (dict(pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}),
     "pre_tokenizer Metaspace is not supported (supported: ByteLevel, Split+ByteLevel"),
    (dict(model_type="WordPiece"), "model WordPiece is not supported"),
    (dict(model_type="Unigram"), "model Unigram is not supported"),
    (dict(normalizer={"type": "NFC"}), "normalizer NFC is not supported"),
    (dict(model_byte_fallback=True), "model byte_fallback True is not supported"),
    (dict(model_dropout=0.1), "model dropout 0.1 is not supported"),
    (dict(model_continuing_subword_prefix="##"), "model continuing_subword_prefix '##' is not supported"),
    (dict(pre_tokenizer=None), "pre_tokenizer null is not supported"),
    (dict(pre_tokenizer={"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "ByteLevel"}]}),
     "pre_tokenizer Whitespace is not supported"),
    (dict(pre_tokenizer={"type": "Split", "pattern": {"Regex": "x"}, "behavior": "Removed", "invert": False}),
     "pre_tokenizer Split with behavior Removed is not supported"),
    (dict(decoder={"type": "Metaspace"}), "decoder Metaspace is not supported"),
    (dict(post_processor={"type": "RobertaProcessing"}), "post_processor RobertaProcessing is not supported"),
    (dict(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "use_regex": False}]}), "regex does not compile"),
])
def test_tokenizer_json_refusals_name_the_piece(tmp_path, changes, named):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(minimal_tokenizer_json(**changes)), encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_tokenizer(str(tmp_path))
    assert str(path) in str(e.value) and named in str(e.value)


def test_minimal_tokenizer_json_and_config(tmp_path):
    """The minimal file loads (through load_tokenizer's file path too); tokenizer_config.json names
    BOS/EOS/PAD (an AddedToken dict or a string) without making encode add them."""
    spec = minimal_tokenizer_json(added_tokens=[
        {"id": 258, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True},
        {"id": 259, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}])
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    bare = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert (bare.bos_id, bare.eos_id, bare.pad_id, bare.vocab_size) == (None, None, None, 260)
    assert bare.encode("the") == [ord("t"), 257] and bare.decode([116, 257, 259]) == "the"
    with pytest.raises(ValueError, match="no BOS token"):
        bare.encode("the", bos=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "</s>", "add_bos_token": True}))
    tok = tokenizer_from_json(str(tmp_path / "tokenizer.json"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (258, 259, 259, False)
    assert tok.encode(" the", bos=True, eos=True) == [258, 256, 257, 259]


# ----------------------------------------------------------------------------- GGUF files

def write_gguf(path, model, tokens, types, pre=None, merges=(), scores=None, **ids):
    import gguf
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(list(merges))
    if scores is not None:
        writer.add_token_scores(scores)
    for key, value in ids.items():
        (writer.add_bool if isinstance(value, bool) else writer.add_uint32)(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_gguf_refusals_and_folders(tmp_path, monkeypatch):
    """An unknown tokenizer.ggml.pre and tokenizer.ggml.model are refused by name; a folder with two
    GGUF files asks for one; without the gguf package, the error says how to install it."""
    pytest.importorskip("gguf", reason="the optional gguf package is not installed (requirements-gguf.txt)")
    from tokenizer import bytes_to_unicode
    byte_tokens = [bytes_to_unicode()[b] for b in range(256)]
    unknown = write_gguf(tmp_path / "a.gguf", "gpt2", byte_tokens, [1] * 256, pre="no-such-pre", merges=["Ġ t"])
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'no-such-pre' is not supported .*smollm"):
        load_tokenizer(unknown)
    bert = write_gguf(tmp_path / "b.gguf", "bert", byte_tokens, [1] * 256)
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'bert' is not supported"):
        load_tokenizer(bert)
    with pytest.raises(ValueError, match="several GGUF files"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "gpt2").mkdir()
    gpt2 = write_gguf(tmp_path / "gpt2" / "c.gguf", "gpt2", byte_tokens + ["Ġt", "<|end|>"], [1] * 257 + [3],
                      pre="gpt-2", merges=["Ġ t"], eos_token_id=257)
    tok = load_tokenizer(str(tmp_path / "gpt2"))
    assert tok.encode(" t<|end|>") == [256, 257] and (tok.eos_id, tok.pad_id, tok.bos_id) == (257, 257, None)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ValueError) as e:
        load_tokenizer(gpt2)
    assert GGUF_MISSING in str(e.value) and gpt2 in str(e.value)


def test_gguf_sentencepiece_matches_tokenizer_model(tmp_path):
    """A GGUF "llama" vocabulary (written here from LLaMA 2's tokenizer.model, as llama.cpp's
    converter does: pieces, scores, types) encodes and decodes as the tokenizer.model itself, on
    the edge cases and 5,000 LLM-Adapters instructions; BOS by default (tokenizer.ggml.add_bos_token)."""
    pytest.importorskip("gguf", reason="the optional gguf package is not installed (requirements-gguf.txt)")
    pytest.importorskip("google.protobuf", reason="protobuf is not installed")
    model_file = shared("llama2-tokenizer", "tokenizer.model")
    reference = SentencePieceTokenizer(model_file)
    sp = reference.sp
    n = sp.GetPieceSize()
    kinds = [6 if sp.IsByte(i) else 3 if sp.IsControl(i) else 2 if sp.IsUnknown(i) else 5 if sp.IsUnused(i) else 1
             for i in range(n)]
    path = write_gguf(tmp_path / "llama2.gguf", "llama", [sp.IdToPiece(i) for i in range(n)], kinds,
                      scores=[sp.GetScore(i) for i in range(n)], bos_token_id=1, eos_token_id=2, unknown_token_id=0,
                      add_bos_token=True, add_eos_token=False)
    ours = load_tokenizer(path)
    assert isinstance(ours, SentencePieceTokenizer) and os.listdir(tmp_path) == ["llama2.gguf"]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 0, 32000)
    texts = EDGE_CASES + llm_adapters_texts()[0][::4]
    assert_same_ids(ours, [reference.encode(t) for t in texts], texts, "GGUF llama vocabulary")
    assert ours.encode("Hello world") == [1, 15043, 3186] and ours.encode("Hello world", bos=False) == [15043, 3186]
    assert all(ours.decode(reference.encode(t)) == reference.decode(reference.encode(t)) for t in EDGE_CASES)
