"""LLM-Adapters' training and test sets by name: downloaded once from its GitHub repository at a
pinned commit, checked against the hashes that commit's tree pins, and cached.

    train_set_path("commonsense_170k")   # -> ~/.cache/lorada/data/LLM-Adapters-8166572/ft-training_set/commonsense_170k.json
    test_set_path("hellaswag")           # -> .../LLM-Adapters-8166572/dataset/hellaswag/test.json

data/llm_adapters.resolve() calls them for a name whose file is not under $LLM_ADAPTERS_DATA (a
local file always wins). The cache is $LORADA_CACHE/data, else
~/.cache/lorada/data. A download goes to a temporary file next to its destination, is checked, and
only then renamed into place (os.replace), so the cache never holds a partial or unverified file;
a cached file is checked again on every use. A full or read-only disk is said as such, not as a
network error.
Standard library only (urllib). $LORADA_DATA_URL replaces the base URL (a mirror of the
repository's files at the commit, laid out as in the repository).

The check: git names a file by the SHA-1 of "blob <size>\\0" + its bytes (`git hash-object`), and
a commit's tree lists that SHA-1 for every path, so `git ls-tree 8166572 ft-training_set/` is a
verifiable source for the hashes below (read from a clone of the repository at that commit).
Where the file's SHA-256 is known too (computed from a copy that matched the git hash), it is
checked as well.
"""
import hashlib
import os
import tempfile
import urllib.error
import urllib.request

LLM_ADAPTERS_REPO = "AGI-Edgerunners/LLM-Adapters"
# The repository's newest commit (2024-03-10, "Merge pull request #42"); ft-training_set/ has not
# changed since fe67503 (2023-12-08, "Move the training set files to the 'ft-training_set' directory").
LLM_ADAPTERS_COMMIT = "816657208af4db747803f87ba40a4c71383fed7a"

# name -> (path in the repository, git blob SHA-1 at LLM_ADAPTERS_COMMIT, SHA-256 or None where unknown)
TRAIN_SET_FILES = {
    "commonsense_170k": ("ft-training_set/commonsense_170k.json", "529e426b33d4cdb1d0c4a275a1a7245ad081fd91", None),
    "commonsense_15k": ("ft-training_set/commonsense_15k.json", "3716afef6d384c475dba13f88a5a96c8032dafe2", None),
    "math_10k": ("ft-training_set/math_10k.json", "27dba77d6ed80aa118d78fbafa5cecd651f6d463", None),
    "math_7k": ("ft-training_set/math_7k.json", "fd93bf268b53bb644b38e71270cdf633951ba3e0", None),
    "math_14k": ("ft-training_set/math_14k.json", "7dc3a2312d83bd5cd6388ecd5d530f2ff6ed1ad6", None),
    "math_50k": ("ft-training_set/math_50k.json", "61fcf3e08fc90a922be320441019d6022e25f5d0", None),
    "math_data": ("ft-training_set/math_data.json", "22a588e69121103120d4b5173f1a6ea804d15a44",
                  "1d06633b4db748b7cfa38f2891f8d7b17b3636717b3188dd382045b94cf999a7"),
}


# LLM-Adapters' evaluation sets: task -> (path, git blob SHA-1 at LLM_ADAPTERS_COMMIT, SHA-256 or None).
# The SHA-256s are of copies that matched the git hashes (../shared/data/llm_adapters); hellaswag's
# file was not available to compute one.
TEST_SET_FILES = {
    "boolq": ("dataset/boolq/test.json", "6d7edb0a8e8a6566b546ccf0d98d24e48db3fdf3",
              "89df2397cbca81dc31adcc6f7f5b635821aa0565aafde46725b2b4bd39b4dfa9"),
    "piqa": ("dataset/piqa/test.json", "f7a1c260692ef31796d4763cb6334f316a754fed",
             "3860d11b9b42e590b6b4bbc1643214d373ed0b0d4ac62fcc7bdceb8e044ad141"),
    "social_i_qa": ("dataset/social_i_qa/test.json", "eadf221799ca394367b144c0f86ee0436db409d2",
                    "71543f41127451945379d106ffedaef502f1c8770dff6d2f543aca85e3080b1d"),
    "hellaswag": ("dataset/hellaswag/test.json", "183c4920415f83ba4b793c4873a33e7e10bd1be5", None),
    "winogrande": ("dataset/winogrande/test.json", "21257263593dd4d00546e1918c88ca0f357b08ad",
                   "6946f5209e7114c65c6d04f8f644c5a061af20d730b1cfe158fff3dc44076fb9"),
    "ARC-Challenge": ("dataset/ARC-Challenge/test.json", "9540685439144200b5a7e48dab9ca4655be2af09",
                      "4a89ce368ae01a71d268d9851686738b2a0a1d84271116bab49a1dd2b48ecad7"),
    "ARC-Easy": ("dataset/ARC-Easy/test.json", "6c0d30aaedaeca148df6bcd7aaacf7c31e6ad70f",
                 "3f32a84716ca6d57d38728bf80cc8117aecd17445c2cf29a68b571b810eb82dc"),
    "openbookqa": ("dataset/openbookqa/test.json", "a6e69676104bcb77237388c3b5a3f0dcbb81d1e2",
                   "8479930f7b8a26052c78250280b5465a4016ca7fc806af440d0f37e243f3099e"),
    "AddSub": ("dataset/AddSub/test.json", "f3996cdf4159b4e1e4b6768865a4db72105f4e2f",
               "62a8662b1ad40879953c4df0e61883a749d03aa3fc5e71f1cdb842b816e139ff"),
    "MultiArith": ("dataset/MultiArith/test.json", "08e996c6cd8c633cc977f5c50709a8bbfc8fadff",
                   "a40f426807c8a563802c2a5b66bda3bcd1eba9c099038fd1199f0dd57de5fd28"),
    "SingleEq": ("dataset/SingleEq/test.json", "cce7a868400323e30e2094a15d482c1aa743dbb0",
                 "712b15edb851c97aab42a5de106d94008f94d917366c92537ed5400a8aacb207"),
    "gsm8k": ("dataset/gsm8k/test.json", "57a7a08e10e12e975e1f972d2b8125c0d4c722b1",
              "2cc616a1e0b23ea1df29370476365cde71c4e0aa823fb06cc194c5a8a9381abe"),
    "AQuA": ("dataset/AQuA/test.json", "731fbb456f7a93bb4121125de09c4adcf42e5dab",
             "de677f5f0139340009eb01f17c0db781b4161912cd1f4efa77292f2fcf3478ee"),
    "SVAMP": ("dataset/SVAMP/test.json", "98b8f1872db596f8aaff2c95d1d698a9fa13b94f",
              "ffed015784f738f317c5603177861d044c4fc94e09211d78b25e96d46c656e2c"),
    "mawps": ("dataset/mawps/test.json", "eca473c5b5d398acbae0b84ede833bbbccd63add",
              "c1a708979cbf2b3df9ac4020baacf3e8e73fcf089e1de7dd1b305b810bfaa15f"),
    "mathqa": ("dataset/mathqa/test.json", "4395ded7d91bd4fb1192ba3981f6ef00ccc88570",
               "58715cb7aaccc7f3f2994586073800a57a3e44f77d22e62bee7fd7ff8315172c"),
}


class DownloadError(ValueError):
    """A data file that could not be downloaded or did not match its pinned hash."""


def cache_dir() -> str:
    return os.path.join(os.environ.get("LORADA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorada"),
                        "data")


def base_url() -> str:
    return os.environ.get("LORADA_DATA_URL") or \
        f"https://raw.githubusercontent.com/{LLM_ADAPTERS_REPO}/{LLM_ADAPTERS_COMMIT}"


def git_blob_sha1(path: str) -> str:
    """`git hash-object PATH`: SHA-1 of b"blob <size>\\0" + the file's bytes."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str, git_sha1: str | None = None, sha256_hex: str | None = None,
             timeout: float = 60.0) -> str:
    """Download `url` to `dest` unless it is there: into a temporary file in dest's directory,
    checked against the hashes given, then renamed into place. On any failure the temporary file
    is removed and nothing is left at `dest`."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    for chunk in iter(lambda: r.read(1 << 20), b""):
                        try:
                            out.write(chunk)
                        except OSError as e:           # the disk, not the network
                            raise DownloadError(f"cannot write {dest} ({e.strerror or e}: a full or read-only "
                                                f"disk?); nothing was kept") from None
            except urllib.error.HTTPError as e:
                raise DownloadError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise DownloadError(f"cannot download {url} ({reason}): no network?") from None
        got = git_blob_sha1(tmp)
        if git_sha1 and got != git_sha1:
            raise DownloadError(f"{url}: the downloaded file's git blob SHA-1 is {got}, expected {git_sha1}; "
                                f"it is not the pinned file, and nothing was kept")
        if sha256_hex and (got := sha256(tmp)) != sha256_hex:
            raise DownloadError(f"{url}: the downloaded file's SHA-256 is {got}, expected {sha256_hex}; "
                                f"it is not the pinned file, and nothing was kept")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def train_set_path(name: str) -> str:
    """The cached file of an LLM-Adapters training set (TRAIN_SET_FILES), downloaded if absent."""
    if name not in TRAIN_SET_FILES:
        raise DownloadError(f"{name}: not one of LLM-Adapters' training sets ({', '.join(TRAIN_SET_FILES)})")
    return repository_file(name, *TRAIN_SET_FILES[name])


def test_set_path(task: str) -> str:
    """The cached test file of an LLM-Adapters evaluation task (TEST_SET_FILES), downloaded if absent."""
    if task not in TEST_SET_FILES:
        raise DownloadError(f"{task}: not one of LLM-Adapters' test sets ({', '.join(TEST_SET_FILES)})")
    return repository_file(task, *TEST_SET_FILES[task])


def repository_file(name: str, rel: str, git_sha1: str, sha256_hex: str | None) -> str:
    dest = os.path.join(cache_dir(), f"LLM-Adapters-{LLM_ADAPTERS_COMMIT[:7]}", rel)
    if os.path.exists(dest):                     # checked again on every use (a fraction of a second)
        if (got := git_blob_sha1(dest)) != git_sha1:
            raise DownloadError(f"{dest}: the cached {name} file's git blob SHA-1 is {got}, expected {git_sha1} "
                                f"(changed or damaged since it was downloaded); delete it to download it again")
        return dest
    url = f"{base_url()}/{rel}"
    print(f"data: downloading {name} from {url}", flush=True)
    try:
        download(url, dest, git_sha1, sha256_hex)
    except DownloadError as e:
        raise DownloadError(f"{name}: {e}; alternatively download {rel} of {LLM_ADAPTERS_REPO} (commit "
                            f"{LLM_ADAPTERS_COMMIT[:7]}) yourself and pass its path, or put it under "
                            f"$LLM_ADAPTERS_DATA/{rel}") from None
    print(f"data: {name} -> {dest}", flush=True)
    return dest
