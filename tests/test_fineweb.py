"""The large-corpus pipeline: data/fineweb/prepare.py on small local corpora (token counts,
end-of-text tokens, shard boundaries, resume after an interruption), and train.py on shards."""

import filecmp
import importlib.util
import json
import os
import pickle
import sys

import numpy as np
import pytest
import warm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.common import get_windows, gpt2_encoding, shakespeare_text, split_files  # noqa: E402

spec = importlib.util.spec_from_file_location("fineweb_prepare", os.path.join(ROOT, "data", "fineweb", "prepare.py"))
prepare = importlib.util.module_from_spec(spec)
sys.modules["fineweb_prepare"] = prepare  # so the worker processes can find its functions
spec.loader.exec_module(prepare)

EOT = 50256
SHARD, VAL = 20_000, 7_000  # tokens per training shard, tokens in the val shard


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 0.4 MB .jsonl corpus: Shakespeare's paragraphs, one of them longer than two shards."""
    docs = [p for p in shakespeare_text().split("\n\n") if p.strip()][:2500]
    docs.insert(700, " ".join(docs[:900]))  # about 50k tokens: spans three shards
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc, "id": len(doc)}) + "\n")
    return str(path), docs


def args_for(path, out_dir, *extra):
    return prepare.parse_args([f"--files={path}", f"--dataset={out_dir}", f"--shard_size={SHARD}",
                               f"--val_tokens={VAL}", "--workers=2", *extra])


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    """The corpus prepared in one go, as a user runs the script."""
    out = tmp_path_factory.mktemp("prepared")
    proc = warm.run([sys.executable, os.path.join(ROOT, "data", "fineweb", "prepare.py"), f"--files={corpus[0]}",
                           f"--dataset={out}", f"--shard_size={SHARD}", f"--val_tokens={VAL}", "--workers=2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return str(out)


def test_shards_hold_the_tokenised_documents_in_order(corpus, prepared):
    enc = gpt2_encoding()
    docs = [enc.encode_ordinary(d) + [EOT] for d in corpus[1]]
    stream = np.concatenate(docs)
    ends = np.cumsum([len(d) for d in docs])  # where each document's tokens end in the stream
    cut = ends[np.searchsorted(ends, VAL)]  # the end of the document that straddles the val/train boundary
    val = np.fromfile(os.path.join(prepared, "val_000000.bin"), dtype=np.uint16)
    train = [np.fromfile(f, dtype=np.uint16) for f in split_files(prepared, "train")]
    assert split_files(prepared, "val") == [os.path.join(prepared, "val_000000.bin")]
    # fixed-size shards, the last one shorter
    assert len(val) == VAL
    assert [len(t) for t in train[:-1]] == [SHARD] * (len(train) - 1) and 0 < len(train[-1]) <= SHARD
    assert len(train) == -(-(len(stream) - cut) // SHARD) >= 5
    # the tokens: the stream in order, minus the rest of the document cut at the val/train boundary
    assert np.array_equal(val, stream[:VAL])
    assert np.array_equal(np.concatenate(train), stream[cut:])
    # one end-of-text per document, after it
    assert (np.concatenate(train) == EOT).sum() == len(docs) - np.searchsorted(ends, VAL) - 1
    assert (val == EOT).sum() == np.searchsorted(ends, VAL)
    assert enc.decode(np.concatenate(train)[:len(docs[-1])].tolist()) != ""  # decodable
    with open(os.path.join(prepared, "meta.pkl"), "rb") as f:
        meta = pickle.load(f)
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2"
    assert np.array_equal(meta["train_counts"], np.bincount(stream[cut:], minlength=50257))
    assert not os.path.exists(os.path.join(prepared, "progress.json"))


def test_resume_after_an_interruption_gives_the_same_shards(corpus, prepared, tmp_path):
    out = tmp_path / "resumed"

    def interrupted(docs, n):
        for i, doc in enumerate(docs):
            if i == n:
                raise KeyboardInterrupt  # as Ctrl-C, or a lost connection while streaming
            yield doc

    # stop twice (documents are read in batches of 64 per worker: what came before a batch is done);
    # then leave a half-written shard
    shards = []
    for stop in (768, 1800):
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare(args_for(corpus[0], out), interrupted(corpus[1], stop))
        progress = json.loads((out / "progress.json").read_text())
        assert progress["docs"] < stop and not (out / "meta.pkl").exists()
        shards.append(progress["shards"])
    assert 2 <= shards[0] < shards[1]
    (out / f"train_{progress['shards']:06d}.bin.tmp").write_bytes(b"\x01\x02\x03")
    prepare.prepare(args_for(corpus[0], out), iter(corpus[1]))
    names = sorted(os.listdir(prepared))
    assert sorted(n for n in os.listdir(out) if not n.endswith(".tmp")) == names
    match, mismatch, errors = filecmp.cmpfiles(prepared, out, names, shallow=False)
    assert mismatch == [] and errors == []
    # a rerun of a finished folder does nothing; other settings on an unfinished one are refused
    prepare.prepare(args_for(corpus[0], out), iter(()))
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(args_for(corpus[0], tmp_path / "x"), interrupted(corpus[1], 1500))
    with pytest.raises(SystemExit, match="other settings"):
        prepare.prepare(args_for(corpus[0], tmp_path / "x", "--shard_size=5000"), iter(corpus[1]))


def test_interrupted_inside_a_document_that_spans_shards(corpus, prepared, tmp_path):
    """progress.json records how far into a document the last shard ended, and a rerun starts there."""
    long_doc = corpus[1][700]
    out = tmp_path / "long"

    def stop_after_long(docs):  # the batch of 128 that holds the long document, then stop
        for i, doc in enumerate(docs):
            if i == 768:
                raise KeyboardInterrupt
            yield doc
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(args_for(corpus[0], out), stop_after_long(corpus[1]))
    progress = json.loads((out / "progress.json").read_text())
    assert progress["docs"] == 700 and 0 < progress["offset"] < len(gpt2_encoding().encode_ordinary(long_doc))
    prepare.prepare(args_for(corpus[0], out), iter(corpus[1]))
    names = sorted(os.listdir(prepared))
    assert filecmp.cmpfiles(prepared, out, names, shallow=False)[0] == names


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\nthird, after a blank\n")
    txt = lambda split: list(prepare.read_documents(prepare.parse_args([f"--files={tmp_path}/a.txt", f"--txt_split={split}"])))
    assert txt("line") == ["first line", "second line", "third, after a blank"]  # empty documents are skipped
    assert txt("paragraph") == ["first line\nsecond line", "third, after a blank"]
    assert txt("file") == ["first line\nsecond line\n\nthird, after a blank\n"]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["one", "", "two", "three"]}), tmp_path / "b.parquet")
    args = prepare.parse_args([f"--files={tmp_path}/*.parquet", "--text_field=content"])
    assert list(prepare.read_documents(args)) == ["one", "two", "three"]
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n')
    with pytest.raises(SystemExit, match="line 2 of .*c.jsonl has no 'text' field.*--text_field"):
        list(prepare.read_documents(prepare.parse_args([f"--files={tmp_path}/c.jsonl"])))
    with pytest.raises(SystemExit, match="no file matches"):
        prepare.read_documents(prepare.parse_args([f"--files={tmp_path}/missing*.jsonl"]))


def test_streaming_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SystemExit, match="needs the datasets package: pip install datasets"):
        prepare.read_documents(prepare.parse_args([]))


def test_too_small_a_corpus_is_one_sentence(tmp_path):
    (tmp_path / "tiny.txt").write_text("a few words\n")
    proc = warm.run([sys.executable, os.path.join(ROOT, "data", "fineweb", "prepare.py"),
                           f"--files={tmp_path}/tiny.txt", f"--dataset={tmp_path}/out", "--workers=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: the corpus gave only 4 tokens" in proc.stderr


def test_windows_never_cross_a_shard_and_cover_every_shard(tmp_path):
    for i, n in enumerate([50, 9, 200]):  # the middle shard is too short for a window of 10 + 1
        np.full(n, i, dtype=np.uint16).tofile(tmp_path / f"train_{i:06d}.bin")
    seen = set()
    for step in range(40):
        w = get_windows(str(tmp_path), "train", 1337, step, 0, batch_size=8, block_size=10)
        assert w.shape == (8, 11)
        assert all(len(set(row)) == 1 for row in w.tolist())  # each window lies in one shard
        seen.update(w[:, 0].tolist())
    assert seen == {0, 2}
    # one file draws what nanoGPT's get_batch draws
    data = np.arange(1000, dtype=np.uint16)
    data.tofile(tmp_path / "val.bin")
    rng = np.random.default_rng([7, 1, 1, 3, 2])
    ix = rng.integers(len(data) - 16, size=4)
    assert np.array_equal(get_windows(str(tmp_path), "val", 7, 3, 2, 4, 16), np.stack([data[i:i + 17] for i in ix]))


def test_train_on_shards_and_evaluate(prepared, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--dataset={prepared}", f"--out_dir={out}", "--n_layer=1",
           "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=4", "--eval_interval=4",
           "--eval_iters=2", "--log_interval=2"]
    proc = warm.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    last = [json.loads(line) for line in open(out / "log.jsonl")][-1]
    assert 10.0 < last["val_ce"] < 11.5  # about log(50257) at the start: it read GPT-2 tokens
    proc = warm.run([sys.executable, os.path.join(ROOT, "buckets.py"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"| {out} | {last['val_ce']:.3f} ({last['val_ppl']:.2f}) |" in proc.stdout
