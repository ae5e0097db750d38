"""Models by name: a local path, a Hugging Face Hub id or one of the paper's names -> a local directory.

    resolve_model("/ckpt/llama-7b-hf")            # a local directory or file: always wins, used as it is
    resolve_model("meta-llama/Llama-2-7b-hf")     # a hub id: downloaded once into the Hub cache
    resolve_model("llama-7b")                     # a paper name: its hub id in PAPER_MODELS, downloaded

Every entry point (train.py, eval.py, export.py) passes --model through `resolve_model`, and prints
the directory a name resolved to. A download fetches only what the loaders read (MODEL_FILES:
config, weights, tokenizer), safetensors when the repository has them, else the .bin files.

huggingface_hub is an optional extra (requirements-hub.txt), imported only when a hub id or a paper
name is resolved. Its environment applies unchanged, since nothing here overrides it: HF_TOKEN (or
`hf auth login`) for gated repositories, HF_HOME / HF_HUB_CACHE for where the cache is,
HF_HUB_OFFLINE=1 to use the cache without network, HF_ENDPOINT for a mirror.
"""
import os
import re

# The paper's model names -> the Hugging Face repository each is downloaded from. The meta-llama
# repositories are gated: accept Meta's license on the repository's page, then set HF_TOKEN.
PAPER_MODELS = {
    "llama-7b": "huggyllama/llama-7b",                  # LLaMA-7B (Touvron et al. 2023), Meta's weights in HF layout; LLM-Adapters used the same conversion (yahma/llama-7b-hf)
    "llama-13b": "huggyllama/llama-13b",                # LLaMA-13B, the same conversion
    "llama2-7b": "meta-llama/Llama-2-7b-hf",            # Llama 2 7B (gated)
    "llama2-13b": "meta-llama/Llama-2-13b-hf",          # Llama 2 13B (gated)
    "llama2-70b": "meta-llama/Llama-2-70b-hf",          # Llama 2 70B (gated), GQA with 8 KV heads
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",          # Llama 3 8B (gated); its tiktoken tokenizer.model is in original/
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",   # not in the paper: a real model for a CPU (docs/results.md)
    "roberta-base": "FacebookAI/roberta-base",          # RoBERTa-base (Liu et al. 2019), GLUE (Tables 5, 16)
    "bart-large": "facebook/bart-large",                # BART-large (Lewis et al. 2020), XSum (Table 10)
    "mbart-large-cc25": "facebook/mbart-large-cc25",    # mBART-large-cc25 (Liu et al. 2020), WMT16 en-ro (Table 10)
    "deberta-v3-base": "microsoft/deberta-v3-base",     # DeBERTaV3-base (He et al. 2021), GLUE (Table 11)
}

# What the loaders read (checkpoint.load, tokenizer.load_tokenizer), plus the tokenizer and generation
# files transformers needs to use a merged export (export.py copies them).
COMMON_FILES = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.json", "merges.txt", "sentencepiece.bpe.model",
                "sentence.bpe.model", "spm.model", "original/tokenizer.model"]
WEIGHT_FILES = {"safetensors": ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"],
                "bin": ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"]}
TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "sentencepiece.bpe.model", "sentence.bpe.model")

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


class HubError(ValueError):
    """A model that could not be resolved or downloaded; the message says what to do."""


def paper_name(name_or_path: str) -> str | None:
    """The paper's model name the user gave (for presets.py), None for a path or a hub id."""
    return name_or_path if name_or_path in PAPER_MODELS and not os.path.exists(name_or_path) else None


def hub_id(name_or_path: str) -> str | None:
    """The repository a name stands for: a paper name's row of PAPER_MODELS, an org/name as it is;
    None for an existing local path or anything that is not a hub id."""
    if os.path.exists(name_or_path):
        return None
    repo = PAPER_MODELS.get(name_or_path, name_or_path)
    return repo if HUB_ID.fullmatch(repo) and not repo.startswith((".", "~")) else None


def resolve_model(name_or_path: str, quiet: bool = False) -> str:
    """A local directory or file (as it is), or the local directory of a hub id or paper name
    (downloaded into the Hugging Face cache if it is not there). Prints the directory a name
    resolved to. Anything else is a HubError: "PATH: no such checkpoint"."""
    if os.path.exists(name_or_path):
        return name_or_path
    repo = hub_id(name_or_path)
    if repo is None:
        raise HubError(f"{name_or_path}: no such checkpoint (expected a directory with config.json or params.json, "
                       f"a llama2.c .bin file, a Hugging Face Hub id such as meta-llama/Llama-2-7b-hf, or one of "
                       f"the paper's names: {', '.join(PAPER_MODELS)})")
    path = download(repo, name_or_path)
    if not quiet:
        print(f"model: {name_or_path}{f' = {repo}' if repo != name_or_path else ''} -> {path}", flush=True)
    return path


def has_weights(path: str, kind: str) -> bool:
    import fnmatch
    names = os.listdir(path) if os.path.isdir(path) else []
    return any(fnmatch.fnmatch(n, p) for n in names for p in WEIGHT_FILES[kind] if not p.endswith(".json"))


def download(repo: str, asked: str | None = None) -> str:
    """snapshot_download of MODEL_FILES (safetensors weights, else .bin) -> the snapshot directory.
    The client's errors become HubErrors that name the repository and what to do."""
    asked = asked or repo
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise HubError(f"--model {asked}: downloading {repo} from the Hugging Face Hub needs huggingface_hub: "
                       f"pip install -r requirements-hub.txt (or give the path of a local checkpoint)") from None
    try:
        path = snapshot_download(repo, allow_patterns=COMMON_FILES + WEIGHT_FILES["safetensors"])
        if not has_weights(path, "safetensors"):           # an older repository: pytorch_model*.bin
            path = snapshot_download(repo, allow_patterns=COMMON_FILES + WEIGHT_FILES["bin"])
    except GatedRepoError:                                 # (a subclass of RepositoryNotFoundError)
        raise HubError(f"{repo} is a gated repository on the Hugging Face Hub and this machine has no access: "
                       f"accept its license at https://huggingface.co/{repo} with your account, then set HF_TOKEN "
                       f"to a read token of that account (or run `hf auth login`) and rerun") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo}: no such repository on the Hugging Face Hub (or a private one: set HF_TOKEN or run "
                       f"`hf auth login`); {asked} is not a local path either") from None
    except RevisionNotFoundError as e:
        raise HubError(f"{repo}: the Hub has no such revision ({e})") from None
    except LocalEntryNotFoundError as e:                   # offline, or the Hub unreachable, and not cached
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{repo} is not (completely) in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                           f"HF_HUB_OFFLINE=1 forbids downloading it: unset HF_HUB_OFFLINE on a machine with "
                           f"network, or fill the cache elsewhere (`hf download {repo}`) and copy it "
                           f"to HF_HOME, or give the path of a local checkpoint") from None
        raise HubError(f"cannot download {repo}: the Hugging Face Hub is not reachable from here and the model is "
                       f"not in the cache ({constants.HF_HUB_CACHE}). Check the network (or set HF_ENDPOINT to a "
                       f"mirror), or give the path of a local checkpoint. ({type(e).__name__}: "
                       f"{str(e).splitlines()[0]})") from None
    except HfHubHTTPError as e:
        raise HubError(f"cannot download {repo}: the Hub answered {str(e).splitlines()[0]}") from None
    if not (has_weights(path, "safetensors") or has_weights(path, "bin")):
        where = ("the cached snapshot, which is incomplete (HF_HUB_OFFLINE=1: rerun with network to complete it)"
                 if constants.HF_HUB_OFFLINE else "the repository")
        raise HubError(f"{repo}: no model.safetensors or pytorch_model.bin weights in {where} ({path})")
    return path


def tokenizer_source(path: str) -> str:
    """Where load_tokenizer finds a checkpoint's tokenizer: its directory (a file's directory), or
    original/tokenizer.model where only that has one (Meta's Llama 3 repositories on the Hub)."""
    if path.endswith(".gguf"):                 # a GGUF file carries its own tokenizer in its metadata
        return path
    d = path if os.path.isdir(path) else os.path.dirname(path)
    nested = os.path.join(d, "original", "tokenizer.model")
    if not any(os.path.exists(os.path.join(d, f)) for f in TOKENIZER_FILES) and os.path.exists(nested):
        return nested
    return d
