"""export.py against transformers and peft: adapters out in peft's format (loaded by
PeftModel.from_pretrained), back in (and NVlabs/DoRA's format), merged checkpoints (loaded by
from_pretrained), RoPE scaling, and the errors for what cannot be exported."""
import json
import os

import pytest
import torch
from torch.testing import assert_close

import export
import methods
from checkpoint import CheckpointError, load, read_safetensors, write_safetensors
from hf_encdec import batch as enc_batch, save, tiny_bart, tiny_roberta
from hf_llama import hf_positions, tiny_hf_llama

LLAMA_TARGETS = "q_proj,v_proj,up_proj,down_proj"


def llama_batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 512, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0                                  # left padding: token positions matter
    return ids, mask


def randomize(model, seed=3):
    """Non-trivial values in everything the method trains (LoRA's B starts at zero, DoRA's m at ‖W‖)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    tiny_hf_llama("gqa").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def roberta_ckpt(tmp_path_factory):
    return save(tiny_roberta(num_labels=3), tmp_path_factory.mktemp("roberta") / "ckpt")


def trained(path, method, **hp):
    """Our model from `path` with `method` applied and trained-like (random) values."""
    return randomize(methods.apply_method(load(path), method, **hp))


def ours_logits(model, kind):
    if kind == "llama":
        ids, mask = llama_batch()
        return model(ids, attention_mask=mask)[mask.bool()]
    ids, mask = enc_batch()
    return model(ids, mask)


def hf_logits(hf, kind):
    if kind == "llama":
        ids, mask = llama_batch()
        return hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits[mask.bool()]
    ids, mask = enc_batch()
    return hf(input_ids=ids, attention_mask=mask).logits


def hf_class(kind):
    from transformers import LlamaForCausalLM, RobertaForSequenceClassification
    return LlamaForCausalLM if kind == "llama" else RobertaForSequenceClassification


# ----------------------------------------------------------------------------- peft's format

@pytest.mark.parametrize("kind", ["llama", "roberta"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_peft_round_trip(tmp_path, kind, method, llama_ckpt, roberta_ckpt):
    """Our adapter file -> export.py --format peft -> PeftModel.from_pretrained: the same logits;
    the directory back into our model (eval.py's path): the same logits again."""
    from peft import PeftModel
    path = llama_ckpt if kind == "llama" else roberta_ckpt
    targets = LLAMA_TARGETS if kind == "llama" else "q_proj,v_proj,fc2"     # RoBERTa's fc2: output.dense
    ours = trained(path, method, lora_r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=targets).eval()
    methods.save_adapter(ours, str(tmp_path / "adapter.safetensors"))
    out = str(tmp_path / "peft")
    export.main(["--model", path, "--adapter", str(tmp_path / "adapter.safetensors"), "--format", "peft", "--out", out])
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["use_dora"] == (method == "dora") and config["r"] == 4
    if kind == "roberta":
        assert config["target_modules"] == ["0.output.dense", "1.output.dense", "query", "value"]
        assert config["modules_to_save"] == ["classifier"]
    with torch.no_grad():
        ref = ours_logits(ours, kind)
        pm = PeftModel.from_pretrained(hf_class(kind).from_pretrained(path), out).eval()
        assert_close(hf_logits(pm, kind), ref, atol=1e-5, rtol=1e-5)
        back = export.load_any_adapter(load(path), out).eval()
        assert back.peft_method["name"] == method
        assert_close(ours_logits(back, kind), ref, atol=1e-6, rtol=1e-6)


def test_peft_saved_adapter_imports(tmp_path, llama_ckpt):
    """An adapter written by peft itself (save_pretrained), with use_rslora, imports with peft's logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(llama_ckpt)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj"], use_dora=True,
                                       use_rslora=True))
    randomize(pm)
    pm.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        ref = hf_logits(pm.eval(), "llama")
        ours = export.load_peft_adapter(load(llama_ckpt), str(tmp_path / "p")).eval()
        assert ours.peft_method["hparams"]["target_modules"] == "k_proj,o_proj"
        assert_close(ours_logits(ours, "llama"), ref, atol=1e-5, rtol=1e-5)


def test_nvlabs_dora_format_imports(tmp_path, llama_ckpt):
    """NVlabs/DoRA's released checkpoints (their peft fork): peft_type DORA, adapter_model.bin,
    lora_A/lora_B as nn.Linear weights and the magnitude as weight_m_wdecomp.weight, (out, 1)."""
    ours = trained(llama_ckpt, "dora", lora_r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules="q_proj,v_proj")
    state = {}
    for name, m in ours.named_modules():
        if hasattr(m, "magnitude"):
            pre = f"base_model.model.model.{name}."
            state[pre + "lora_A.weight"] = m.lora_A.detach().half()      # their fp16 training
            state[pre + "lora_B.weight"] = m.lora_B.detach().half()
            state[pre + "weight_m_wdecomp.weight"] = m.magnitude.detach()[:, None].half()
            with torch.no_grad():                                      # ours with the same rounding
                for t in (m.lora_A, m.lora_B, m.magnitude):
                    t.copy_(t.half().float())
    d = tmp_path / "nvlabs"
    d.mkdir()
    torch.save(state, d / "adapter_model.bin")
    (d / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "yahma/llama-7b-hf", "bias": "none", "dora_simple": True, "enable_lora": None,
        "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 8, "lora_dropout": 0.05,
        "merge_weights": False, "modules_to_save": None, "peft_type": "DORA", "r": 4,
        "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM", "Wdecompose_target_modules": None}))
    with torch.no_grad():
        back = export.load_any_adapter(load(llama_ckpt), str(d)).eval()
        assert back.peft_method["name"] == "dora"
        assert_close(ours_logits(back, "llama"), ours_logits(ours.eval(), "llama"), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- merged checkpoints

@pytest.mark.parametrize("kind,method", [("llama", "lora"), ("llama", "dora"), ("llama", "quanta"),
                                         ("roberta", "lora"), ("roberta", "dora")])
def test_merged_checkpoint_loads_in_transformers(tmp_path, kind, method, llama_ckpt, roberta_ckpt):
    path = llama_ckpt if kind == "llama" else roberta_ckpt
    hp = dict(quanta_dims="4-4-4") if method == "quanta" else dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
    if kind == "roberta":
        hp["target_modules"] = "q_proj,v_proj,fc2"
    ours = trained(path, method, **hp).eval()
    methods.save_adapter(ours, str(tmp_path / "a.safetensors"))
    out = str(tmp_path / "merged")
    shard = "20KB" if (kind, method) == ("llama", "lora") else "5GB"       # several shards + an index once
    export.main(["--model", path, "--adapter", str(tmp_path / "a.safetensors"), "--format", "hf", "--out", out,
                 "--max_shard_size", shard])
    files = os.listdir(out)
    assert ("model.safetensors.index.json" in files) == (shard == "20KB")
    with torch.no_grad():
        ref = ours_logits(ours, kind)
        hf = hf_class(kind).from_pretrained(out).eval()
        assert_close(hf_logits(hf, kind), ref, atol=1e-5, rtol=1e-5)
        assert_close(ours_logits(load(out), kind), ref, atol=1e-5, rtol=1e-5)     # and our loader reads it


def test_merged_bart(tmp_path):
    """BART's names: fc1 / fc2 without ffn., the tied embedding once (model.shared.weight)."""
    from transformers import BartForConditionalGeneration
    path = save(tiny_bart("bart"), tmp_path / "bart")
    ours = trained(path, "lora", lora_r=4, lora_dropout=0.0, target_modules="q_proj,fc1").eval()
    tensors = export.merged_state(ours)
    assert "model.shared.weight" in tensors and "model.encoder.layers.0.fc1.weight" in tensors
    export.export_merged(ours, path, str(tmp_path / "out"))
    ids, mask = enc_batch()
    dec = torch.randint(4, 120, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ours(ids, mask, dec)
        hf = BartForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
        assert_close(hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, ref, atol=1e-5, rtol=1e-5)


def test_meta_layout_converts_to_hf(tmp_path):
    """--format hf without an adapter converts: Meta's params.json + consolidated.00.pth -> a
    Hugging Face checkpoint with a config.json written from the model's config."""
    from hf_llama import save_meta
    from transformers import LlamaForCausalLM
    hf = tiny_hf_llama("gqa")
    save_meta(hf, str(tmp_path / "meta"))
    export.main(["--model", str(tmp_path / "meta"), "--format", "hf", "--out", str(tmp_path / "out")])
    with torch.no_grad():
        assert_close(hf_logits(LlamaForCausalLM.from_pretrained(tmp_path / "out").eval(), "llama"),
                     hf_logits(hf, "llama"), atol=1e-5, rtol=1e-5)


def test_key_maps_are_inverse(llama_ckpt, roberta_ckpt, tmp_path):
    for m in (load(llama_ckpt), load(roberta_ckpt), load(save(tiny_bart("mbart"), tmp_path / "mbart"))):
        for k in m.state_dict():
            assert export.our_key(m, export.hf_key(m, k)) == k


# ----------------------------------------------------------------------------- what cannot be exported

def test_what_cannot_be_exported(tmp_path, llama_ckpt):
    la = methods.apply_method(load(llama_ckpt), "lorada_la", lmam_heads=2, lmam_len=6, adapter_r=4)
    with pytest.raises(ValueError, match="'lorada_la' has no peft format.*LMAM adds a learned low-rank map"):
        export.export_peft(la, str(tmp_path / "p"))
    with pytest.raises(ValueError, match="cannot merge method 'lorada_la': LMAM is an attention term, not a weight delta"):
        export.export_merged(la, llama_ckpt, str(tmp_path / "m"))
    q = methods.apply_method(load(llama_ckpt), "quanta", quanta_dims="4-4-4")
    with pytest.raises(ValueError, match="'quanta' has no peft format.*--format hf can merge it"):
        export.export_peft(q, str(tmp_path / "p"))
    s = methods.apply_method(load(llama_ckpt), "series", adapter_r=4)
    with pytest.raises(ValueError, match="cannot merge method 'series': the bottleneck adapters add a non-linear"):
        export.export_merged(s, llama_ckpt, str(tmp_path / "m"))
    with pytest.raises(SystemExit, match="already holds a checkpoint"):
        export.main(["--model", llama_ckpt, "--format", "hf", "--out", llama_ckpt])


def test_what_is_exported_follows_what_the_method_attached(tmp_path, llama_ckpt, monkeypatch):
    """A method of one's own, with nothing declared for export.py: LoRA layers under another name go
    to peft's format (PeftModel loads them with the same logits, their r, α and targets read from
    the layers); a module export.py does not know is refused by both formats, naming its class,
    instead of being left out of the merged weights."""
    from peft import PeftModel
    from helpers import pasted_methods, readme_example

    def lora_attention(model, rank=4, target_modules="q_proj,k_proj"):        # r and α by other names
        methods.lora(model, rank, 2.0 * rank, 0.0, target_modules)
    monkeypatch.setitem(methods.METHODS, "lora_attention", lora_attention)
    ours = randomize(methods.apply_method(load(llama_ckpt), "lora_attention")).eval()
    export.export_peft(ours, str(tmp_path / "p"))
    config = json.load(open(tmp_path / "p" / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["target_modules"], config["use_dora"]) == \
        (4, 8.0, ["k_proj", "q_proj"], False)
    with torch.no_grad():
        pm = PeftModel.from_pretrained(hf_class("llama").from_pretrained(llama_ckpt), str(tmp_path / "p")).eval()
        assert_close(hf_logits(pm, "llama"), ours_logits(ours, "llama"), atol=1e-5, rtol=1e-5)
    ia3 = pasted_methods(readme_example()).apply_method(load(llama_ckpt), "ia3")
    with pytest.raises(ValueError, match="'ia3' has no peft format \\(IA3Linear: export.py knows no peft type for "
                                         "IA3Linear\\)"):
        export.export_peft(ia3, str(tmp_path / "p2"))
    with pytest.raises(ValueError, match="cannot merge method 'ia3': its IA3Linear is not a weight delta"):
        export.export_merged(ia3, llama_ckpt, str(tmp_path / "m"))


def test_bad_adapters_are_refused(tmp_path, llama_ckpt, roberta_ckpt):
    """An adapter for another model or method: the message names both."""
    lora = trained(llama_ckpt, "lora", lora_r=4, target_modules="q_proj")
    lora.cfg.name = "tiny-a"                   # as a paper name or the loader's preset_name sets it
    methods.save_adapter(lora, str(tmp_path / "lora.safetensors"))
    dora = methods.apply_method(load(llama_ckpt), "dora", lora_r=4, target_modules="q_proj")
    with pytest.raises(ValueError, match="holds method 'lora'.*has 'dora'"):
        methods.load_adapter(dora, str(tmp_path / "lora.safetensors"))
    other = tmp_path / "other"
    tiny_hf_llama("mha", vocab=256).save_pretrained(other)
    other_model = load(str(other))
    other_model.cfg.name = "tiny-b"
    with pytest.raises(ValueError, match=r"was trained on a base model \(tiny-a\) with n_kv_heads=2, this model "
                                         r"\(tiny-b\) has 4"):
        methods.load_adapter(other_model, str(tmp_path / "lora.safetensors"))
    # a peft adapter for another architecture, and for another size
    export.export_peft(lora, str(tmp_path / "peft"), "tiny-llama")
    with pytest.raises(ValueError, match=r"this model \(a Roberta with dim=32\) has no layer 'model.layers.0.self_attn"
                                         r".q_proj'; the adapter was made for another architecture \(tiny-llama\)"):
        export.load_peft_adapter(load(roberta_ckpt), str(tmp_path / "peft"))
    cfg = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    tensors = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else v
               for k, v in read_safetensors(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    write_safetensors(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 128\), this model \(.*\) expects \(4, 64\): the "
                                         r"adapter was trained on another base model \(tiny-llama\)"):
        export.load_peft_adapter(load(llama_ckpt), str(tmp_path / "peft"))
    json.dump(dict(cfg, peft_type="IA3"), open(tmp_path / "peft" / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="peft_type 'IA3': only LoRA and DoRA"):
        export.load_peft_adapter(load(llama_ckpt), str(tmp_path / "peft"))
    json.dump(dict(cfg, bias="all"), open(tmp_path / "peft" / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="bias='all'"):
        export.load_peft_adapter(load(llama_ckpt), str(tmp_path / "peft"))


# ----------------------------------------------------------------------------- RoPE scaling

@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64}])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    """Checkpoints with rope_scaling (transformers 5 writes rope_parameters; transformers 4's
    rope_scaling, with "type" in older files, is read too): logits as transformers', at positions
    past the original context where the scaling matters."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                      rope_theta=500000.0, tie_word_embeddings=False, rope_scaling=dict(scaling))
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "new")
    written = json.load(open(tmp_path / "new" / "config.json"))
    assert written["rope_parameters"]["rope_type"] == scaling["rope_type"]
    old = dict(written)                          # the same checkpoint as transformers 4 wrote it
    old.pop("rope_parameters")
    legacy = {"type": "linear", "factor": 2.0} if scaling["rope_type"] == "linear" else scaling   # older files: "type"
    old.update(rope_theta=500000.0, rope_scaling=legacy)
    os.makedirs(tmp_path / "old")
    os.link(tmp_path / "new" / "model.safetensors", tmp_path / "old" / "model.safetensors")
    json.dump(old, open(tmp_path / "old" / "config.json", "w"))
    ids = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        for d in ("new", "old"):
            ours = load(str(tmp_path / d))
            assert ours.cfg.rope_scaling == scaling
            assert_close(ours(ids), ref, atol=1e-5, rtol=1e-5)
        plain = load(str(tmp_path / "new"))
        plain.cfg.rope_scaling = None                  # the scaling does change the logits here
        assert not torch.allclose(plain(ids), ref, atol=1e-3)


def test_unsupported_rope_scaling_is_refused(tmp_path, llama_ckpt):
    os.makedirs(tmp_path / "c")
    cfg = json.load(open(os.path.join(llama_ckpt, "config.json")))
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    json.dump(cfg, open(tmp_path / "c" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="RoPE scaling 'yarn'.*not supported \\(supported: linear, llama3\\)"):
        load(str(tmp_path / "c"))
    cfg["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0}
    json.dump(cfg, open(tmp_path / "c" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="'llama3' needs 'low_freq_factor'"):
        load(str(tmp_path / "c"))
