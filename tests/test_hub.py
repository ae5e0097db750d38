"""Models and training sets by name, without network: hub.py through the real huggingface_hub
client, against a Hub cache laid out here (offline) and against a small Hub server on 127.0.0.1;
data/fetch.py against a local HTTP server. Clear messages for gated, missing and unreachable."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import torch
from torch.testing import assert_close

import hub
import model as M
from checkpoint import load
from conftest import ROOT, shared
from data import fetch
from data import llm_adapters as D
from hf_llama import save_bin, tiny_hf_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ----------------------------------------------------------------------------- a local HTTP server

class Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread that shuts itself down after `limit`
    seconds (or when the test's `with` block ends). `route(handler, method, path)` answers."""

    def __init__(self, route, limit=60.0):
        outer = self
        self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, method):
                outer.requests.append((method, self.path, self.headers.get("Authorization")))
                status, headers, body = route(method, unquote(urlparse(self.path).path))
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                if method == "GET":
                    self.wfile.write(body)

            def do_GET(self):
                self.answer("GET")

            def do_HEAD(self):
                self.answer("HEAD")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.timer = threading.Timer(limit, self.httpd.shutdown)

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                      # nothing listens there now
    return f"http://127.0.0.1:{port}"


def hub_route(repos, gated=()):
    """The Hub endpoints snapshot_download (huggingface_hub 2.x) uses: the revision's info (sha,
    and the siblings older clients read), the recursive tree listing, and HEAD / GET of
    /{repo}/resolve/{rev}/{file} with X-Repo-Commit, ETag and Content-Length. A missing repository
    is a 404 with X-Error-Code: RepoNotFound; a gated one answers its files with 401 GatedRepo."""
    def route(method, path):
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo = "/".join(parts[2:4] if api else parts[:2])
        if repo not in repos:
            return 404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        files = repos[repo]
        if api and parts[4] == "revision":
            return 200, {"Content-Type": "application/json"}, json.dumps(
                {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}).encode()
        if api and parts[4] == "tree":
            return 200, {"Content-Type": "application/json"}, json.dumps(
                [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                 for f, b in files.items()]).encode()
        if parts[2] == "resolve":
            if repo in gated:
                return 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted"}, b""
            name = "/".join(parts[4:])
            if name not in files:
                return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b""
            body = files[name]
            return 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                         "Content-Type": "application/octet-stream"}, body
        return 404, {}, b""
    return route


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny LLaMA checkpoint (safetensors) with a real 512-token sentencepiece tokenizer."""
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    tiny_hf_llama("gqa").save_pretrained(path)
    shutil.copy(shared("stories260K", "tok512.model"), path / "tokenizer.model")
    return path


def run(code_or_args, env, timeout=120):
    """A fresh Python process (huggingface_hub reads HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE at import)."""
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"PYTHONPATH": ROOT} | env
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


RESOLVE = """
import json, sys, hub
for name in sys.argv[1:]:
    try:
        print(json.dumps({"ok": hub.resolve_model(name, quiet=True)}))
    except hub.HubError as e:
        print(json.dumps({"error": str(e)}))
"""


def resolve_all(names, env):
    out = run(["-c", RESOLVE, *names], env)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


# ----------------------------------------------------------------------------- models

def test_paper_names_are_presets():
    for name, repo in hub.PAPER_MODELS.items():
        assert name in M.LLAMA_PRESETS or name in M.ENCDEC_PRESETS
        assert hub.HUB_ID.fullmatch(repo)


@pytest.mark.slow
def test_local_paths_win_and_bad_paths_say_so(tmp_path, tiny_dir):
    assert hub.resolve_model(str(tiny_dir)) == str(tiny_dir)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()                 # a local folder shaped like a hub id wins
    assert hub.resolve_model(str(tmp_path / "org" / "name")) == str(tmp_path / "org" / "name")
    with pytest.raises(hub.HubError, match=r"^/no/such/dir: no such checkpoint"):
        hub.resolve_model("/no/such/dir")
    out = subprocess.run([sys.executable, "train.py", "--model", "/no/such/dir", "--method", "lora"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "error: /no/such/dir: no such checkpoint" in out.stderr, out.stderr[-2000:]


@pytest.mark.slow
def test_offline_cache_and_a_paper_name(tmp_path, tiny_dir):
    """HF_HUB_OFFLINE=1 with a cache laid out as huggingface_hub does (models--org--name/snapshots/
    <commit>/..., refs/main): train.py --model llama-7b trains on huggyllama/llama-7b's cached files
    and applies the llama-7b presets; a repository not in the cache says what to do."""
    repo_dir = tmp_path / "hf" / "hub" / "models--huggyllama--llama-7b"
    shutil.copytree(tiny_dir, repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = run(["train.py", "--model", "llama-7b", "--method", "lora", "--data", "commonsense_sample",
               "--out_dir", str(tmp_path / "run"), "--max_steps", "1", "--batch_size", "2", "--micro_batch_size", "1",
               "--val_set_size", "2", "--lora_r", "2", "--quiet"], env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"model: llama-7b = huggyllama/llama-7b -> {repo_dir / 'snapshots' / COMMIT}" in out.stdout
    assert "presets: lora on llama-7b" in out.stdout
    assert os.path.exists(tmp_path / "run" / "adapter.safetensors")
    [missing] = resolve_all(["meta-llama/Llama-2-7b-hf"], env)
    assert "meta-llama/Llama-2-7b-hf is not (completely) in the Hugging Face cache" in missing["error"]
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in missing["error"]


@pytest.mark.slow
def test_download_from_a_local_hub(tmp_path, tiny_dir):
    """snapshot_download against a Hub on 127.0.0.1 (HF_ENDPOINT): only the loader's files, .bin
    when a repository has no safetensors, HF_TOKEN sent as the client sends it; gated, missing and
    unreachable repositories give messages that say what to do."""
    ckpt = {f: (tiny_dir / f).read_bytes() for f in ("config.json", "model.safetensors", "tokenizer.model")}
    bin_dir = tmp_path / "bin"
    save_bin(tiny_hf_llama("gqa"), str(bin_dir))
    repos = {"org/tiny": {**ckpt, "pytorch_model.bin": b"not wanted", "README.md": b"# card",
                          "original/consolidated.00.pth": b"not wanted"},
             "org/old": {"config.json": (bin_dir / "config.json").read_bytes(),
                         "pytorch_model.bin": (bin_dir / "pytorch_model.bin").read_bytes()},
             "org/gated": ckpt}
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "hf_test_token"}
    with Server(hub_route(repos, gated=("org/gated",))) as server:
        env["HF_ENDPOINT"] = server.url
        tiny, old, gated, missing = resolve_all(["org/tiny", "org/old", "org/gated", "org/missing"], env)
        assert any(auth == "Bearer hf_test_token" for _, _, auth in server.requests)
    assert tiny["ok"] == str(tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / COMMIT)
    assert sorted(os.listdir(tiny["ok"])) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert sorted(os.listdir(old["ok"])) == ["config.json", "pytorch_model.bin"]
    ids = torch.randint(3, 512, (1, 6))
    with torch.no_grad():
        assert_close(load(tiny["ok"])(ids), load(str(tiny_dir))(ids))
    assert gated["error"].startswith("org/gated is a gated repository on the Hugging Face Hub")
    assert "https://huggingface.co/org/gated" in gated["error"] and "HF_TOKEN" in gated["error"]
    assert "hf auth login" in gated["error"]
    assert missing["error"].startswith("org/missing: no such repository on the Hugging Face Hub")
    # cached now: offline (and train.py's --dry_run with a hub id) use the snapshot
    out = run(["train.py", "--model", "org/tiny", "--method", "lora", "--lora_r", "2", "--dry_run"],
              {"HF_HOME": env["HF_HOME"], "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and "trainable params: 3,200 ||" in out.stdout, out.stdout + out.stderr[-2000:]
    # no Hub to reach, nothing cached
    [down] = resolve_all(["org/other"], {"HF_HOME": str(tmp_path / "hf2"), "HF_ENDPOINT": closed_port_url()})
    assert down["error"].startswith("cannot download org/other: the Hugging Face Hub is not reachable from here")


@pytest.mark.slow
def test_without_huggingface_hub(tmp_path):
    """The extra is optional: a preset --dry_run runs without it, a hub id says how to install it."""
    block = "import sys; sys.modules['huggingface_hub'] = None; "
    out = run(["-c", block + "import hub; hub.resolve_model('org/name')"], {})
    assert "pip install -r requirements-hub.txt" in out.stderr
    out = run(["-c", block + "import runpy; sys.argv = ['train.py', '--model', 'llama2-7b', '--method', 'lora', "
               "'--dry_run']; runpy.run_path('train.py', run_name='__main__')"], {})
    assert out.returncode == 0 and "trainable params:" in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------------------- training sets

def data_route(files):
    def route(method, path):
        body = files.get(path.lstrip("/"))
        return (404, {}, b"") if body is None else (200, {"Content-Type": "application/json"}, body)
    return route


def test_training_sets_download_check_and_cache(tmp_path, monkeypatch):
    """math_data (the one training set whose bytes are here) against the hashes pinned from the
    repository's tree; a changed file, a missing one and no network leave nothing in the cache."""
    real = open(shared("llm_adapters", "ft-training_set", "math_data.json"), "rb").read()
    monkeypatch.setenv("LORADA_CACHE", str(tmp_path / "cache"))
    files = {"good/ft-training_set/math_data.json": real,
             "bad/ft-training_set/math_data.json": real.replace(b"Answer", b"answer", 1)}
    with Server(data_route(files)) as server:
        for base, message in ((f"{server.url}/bad", "the downloaded file's git blob SHA-1 is [0-9a-f]{40}, expected "
                                                    "22a588e69121103120d4b5173f1a6ea804d15a44"),
                              (f"{server.url}/none", "HTTP 404"),
                              (closed_port_url(), "no network")):
            monkeypatch.setenv("LORADA_DATA_URL", base)
            with pytest.raises(fetch.DownloadError, match=message):
                fetch.train_set_path("math_data")
            left = [f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]
            assert left == [], left                       # no partial or unverified file in the cache
        monkeypatch.setenv("LORADA_DATA_URL", f"{server.url}/good")
        path = fetch.train_set_path("math_data")
        assert open(path, "rb").read() == real and path.endswith(os.path.join("ft-training_set", "math_data.json"))
        n = len(server.requests)
        assert fetch.train_set_path("math_data") == path and len(server.requests) == n     # cached
        # by name through the data loader: a file under the root wins, else the download
        assert D.resolve("math_data", split="train") == shared("llm_adapters", "ft-training_set", "math_data.json")
        with pytest.raises(fetch.DownloadError, match=r"math_10k: cannot download .*HTTP 404.*LLM_ADAPTERS_DATA"):
            D.resolve("math_10k", root=str(tmp_path / "empty"), split="train")
        # a test set: downloaded where the root has none; where that fails, the missing path (eval.py skips it)
        boolq = open(shared("llm_adapters", "dataset", "boolq", "test.json"), "rb").read()
        files["good/dataset/boolq/test.json"] = boolq
        assert open(D.resolve("boolq", root=str(tmp_path / "empty")), "rb").read() == boolq
        assert D.resolve("piqa", root=str(tmp_path / "empty")) == str(tmp_path / "empty" / "dataset" / "piqa" / "test.json")
    assert fetch.git_blob_sha1(path) == fetch.TRAIN_SET_FILES["math_data"][1]
