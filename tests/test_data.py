"""The prepare scripts and the offline GPT-2 tokenizer (data/common.py)."""

import hashlib
import os
import shutil
import sys

import numpy as np
import pytest
import warm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))
import common  # noqa: E402


def test_shakespeare_char_prepare():
    warm.run([sys.executable, os.path.join(ROOT, "data", "shakespeare_char", "prepare.py")], check=True,
                   capture_output=True)
    d = common.dataset_dir("shakespeare_char")  # the tests' temporary data folder (conftest.py)
    meta = common.read_meta(os.path.join(d, "meta.pkl"))  # plain data, as train.py reads it
    train = np.fromfile(os.path.join(d, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(d, "val.bin"), dtype=np.uint16)
    text = common.shakespeare_text()
    assert len(text) > 5_000_000 and len(train) + len(val) == len(text)
    assert len(train) == int(0.9 * len(text))
    assert meta["vocab_size"] == len(meta["stoi"]) == len(meta["itos"]) == 84
    assert "".join(meta["itos"][i] for i in train[:200]) == text[:200]
    assert "".join(meta["itos"][i] for i in val[-200:]) == text[-200:]


def test_gpt2_encoding_through_pypi_when_tiktoken_cannot_download(tmp_path, monkeypatch):
    import tiktoken
    whisper = common.fetch_sdist(*common.WHISPER)  # from the cache, or PyPI once
    monkeypatch.setattr(common, "CACHE_DIR", str(tmp_path))
    shutil.copy(whisper, tmp_path)

    def offline(name):
        raise ConnectionError("no route to host")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    enc = common.gpt2_encoding()
    assert enc.n_vocab == 50257
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler"
    assert enc.decode(enc.encode(text)) == text
    cached = tmp_path / "gpt2.tiktoken"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == common.GPT2_TIKTOKEN_SHA256
    os.remove(tmp_path / os.path.basename(whisper))  # the second time needs nothing but the cache
    assert common.gpt2_encoding().encode("Hello world") == [15496, 995]
    cached.write_bytes(cached.read_bytes()[:-10])  # a damaged cache is caught, with what to do
    with pytest.raises(SystemExit, match="corrupt.*delete it"):
        common.gpt2_encoding()


def test_shakespeare_bpe_prepare():
    warm.run([sys.executable, os.path.join(ROOT, "data", "shakespeare", "prepare.py")], check=True,
                   capture_output=True)
    d = common.dataset_dir("shakespeare")
    meta = common.read_meta(os.path.join(d, "meta.pkl"))  # plain data, as train.py reads it
    assert meta == {"vocab_size": 50257, "tokenizer": "gpt2"}
    train = np.fromfile(os.path.join(d, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(d, "val.bin"), dtype=np.uint16)
    enc, text = common.gpt2_encoding(), common.shakespeare_text()
    n = int(0.9 * len(text))
    assert enc.decode(train.tolist()) == text[:n] and enc.decode(val.tolist()) == text[n:]
    assert 1_000_000 < len(train) < 2_000_000
