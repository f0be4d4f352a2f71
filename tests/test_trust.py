"""What a user must be able to trust: a dataset's meta.pkl cannot run code, one run per
out_dir, a scratch run does not destroy a checkpoint, Ctrl-C saves and resumes exactly, a failing
command leaves nothing behind, and under torchrun an error in any process reaches the user."""

import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

import warm

from test_train import TINY, assert_one_sentence_error, read_log, run, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.common import read_meta  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # one thread: the same float sums every run


class Evil:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A checkpoint of 2 iterations on a tiny character dataset."""
    root = tmp_path_factory.mktemp("tiny")
    data = make_dataset(root / "data")
    train(root / "out", f"--dataset={data}", "--max_iters=2", "--eval_interval=2")
    return str(root / "out")


def make_dataset(path, meta=None, tokens=2000):
    """A tiny character dataset in path: train.bin, val.bin (uint16 ids below 10) and meta.pkl."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(10, size=tokens).astype(np.uint16).tofile(os.path.join(path, f"{split}.bin"))
    meta = {"vocab_size": 10, "stoi": {c: i for i, c in enumerate("abcdefghij")},
            "itos": {i: c for i, c in enumerate("abcdefghij")}} if meta is None else meta
    with open(os.path.join(path, "meta.pkl"), "wb") as f:
        f.write(meta if isinstance(meta, bytes) else pickle.dumps(meta))
    return str(path)


def train_env(out_dir, *args):
    """train.py to the end, in the environment of the interrupted runs."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out_dir}", *TINY, *args]
    proc = warm.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def start(out_dir, *args, fresh=False):
    """train.py in the background, in its own session (signals go to it alone); fresh: in a new interpreter
    that has to import torch first (warm.py)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out_dir}", *TINY, *args]
    return warm.start(cmd, cwd=ROOT, env=ENV, start_new_session=True, fresh=fresh)


def wait_for(condition, proc, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended early:\n" + "".join(proc.communicate())
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def logged_iters(out_dir):
    """The training iterations logged so far (a line still being written is skipped)."""
    try:
        lines = open(os.path.join(out_dir, "log.jsonl")).read().splitlines()
    except FileNotFoundError:
        return []
    iters = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train_loss" in record:
            iters.append(record["iter"])
    return iters


def step_losses(out_dir):
    return {r["iter"]: r["train_loss"] for r in read_log(out_dir) if "train_loss" in r}


def ckpt_iter(out_dir):
    """The iteration of out_dir's checkpoint: ckpt.pt of one process, or the sharded folder of several."""
    latest = os.path.join(out_dir, "latest")
    path = os.path.join(out_dir, open(latest).read().strip(), "training.pt") if os.path.exists(latest) else \
        os.path.join(out_dir, "ckpt.pt")
    return torch.load(path, weights_only=True)["iter_num"]


# -----------------------------------------------------------------------------
# 1. a dataset's meta.pkl is data, never code


def test_read_meta_accepts_plain_metas_only(tmp_path):
    char = {"vocab_size": 3, "stoi": {"a": 0, "b": 1, "\n": 2}, "itos": {0: "a", 1: "b", 2: "\n"}}
    bpe = {"vocab_size": 50257, "tokenizer": "gpt2", "train_counts": [0, 5, 7], "x": (1.5, None, True)}
    for meta in (char, bpe):
        for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):  # nanoGPT's prepare scripts write the default
            (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))
            assert read_meta(str(tmp_path / "meta.pkl")) == meta
    marker = tmp_path / "marker"
    bad = [pickle.dumps({"vocab_size": 3, "x": Evil(marker)}),  # code
           pickle.dumps({"vocab_size": np.int64(3)}),  # a numpy scalar: a class to import, refused too
           pickle.dumps({"vocab_size": 3, "x": {1, 2}}, protocol=2),  # a set, through builtins.set
           pickle.dumps([1, 2, 3]), pickle.dumps({"stoi": {}}), pickle.dumps({"vocab_size": -1})]
    for data in bad:
        (tmp_path / "meta.pkl").write_bytes(data)
        with pytest.raises(ValueError, match="not a plain dataset meta.*prepare the dataset again"):
            read_meta(str(tmp_path / "meta.pkl"))
    for data in (pickle.dumps(char)[:-7], b"", b"garbage, not a pickle"):
        (tmp_path / "meta.pkl").write_bytes(data)
        with pytest.raises(ValueError, match="not a readable dataset meta.*prepare the dataset again"):
            read_meta(str(tmp_path / "meta.pkl"))
    assert not marker.exists()


def test_malicious_meta_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    data = make_dataset(tmp_path / "evil", pickle.dumps({"vocab_size": 10, "x": Evil(marker)}))
    with open(os.path.join(data, "meta.pkl"), "rb") as f:  # the file is armed: pickle.load runs it
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    proc = train(tmp_path / "out", f"--dataset={data}", "--max_iters=2", check=False)
    assert_one_sentence_error(proc, "not a plain dataset meta", "prepare the dataset again")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_nothing_unpickles_with_plain_pickle():
    """Every meta.pkl is read by data.common.read_meta, which imports nothing; no other file of the project
    calls pickle.load or pickle.loads, which would run what a crafted file asks for."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = []
    for folder, _, files in os.walk(root):
        if any(part.startswith(".") for part in os.path.relpath(folder, root).split(os.sep)) or "tests" in folder:
            continue
        for name in files:
            if name.endswith((".py", ".ipynb")):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                found += [f"{name}: {m}" for m in ("pickle.load(", "pickle.loads(", "weights_only=False") if m in text]
    assert not found, found


def test_checkpoint_that_asks_to_run_code_is_refused(tmp_path, trained_tiny):
    """A ckpt.pt carrying a pickled call (a crafted or tampered file) is refused as such, never run."""
    marker = tmp_path / "marker"
    ckpt = torch.load(os.path.join(trained_tiny, "ckpt.pt"), weights_only=True)
    ckpt["meta"] = {"vocab_size": 10, "x": Evil(marker)}
    os.makedirs(tmp_path / "out")
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    for proc in (run("sample.py", f"--out_dir={tmp_path / 'out'}", check=False),
                 train(tmp_path / "out", "--init_from=resume", check=False)):
        assert_one_sentence_error(proc, "was refused: it asks to import posix.system when loaded, which could run code")
    assert not marker.exists()


def sharded_copy(trained, out):
    """The checkpoint of trained as torch.distributed.checkpoint writes it under torchrun (one process here),
    in out: a folder of shards, the rest in training.pt beside them, and `latest` naming the folder."""
    import torch.distributed.checkpoint as dcp
    ckpt = torch.load(os.path.join(trained, "ckpt.pt"), weights_only=True)
    folder = out / f"ckpt-{ckpt['iter_num']}"
    with warnings.catch_warnings():  # one process writing a sharded checkpoint is what we mean
        warnings.simplefilter("ignore")
        dcp.save({"model": ckpt.pop("model"), "optimizer": ckpt.pop("optimizer")}, checkpoint_id=folder, no_dist=True)
    torch.save(ckpt, folder / "training.pt")
    (out / "latest").write_text(folder.name + "\n")
    return folder


def crafted_call(module, name, arg):
    """A pickle that calls the attribute `name` of module with one string argument. Under protocol 4 (its
    first two bytes) pickle follows a dotted name attribute by attribute: module
    torch.distributed.checkpoint.metadata, name os.system reaches os.system through that module's `import os`."""
    arg = arg.encode()
    return b"\x80\x04c" + f"{module}\n{name}\n".encode() + b"X" + len(arg).to_bytes(4, "little") + arg + b"\x85R."


# what a sharded checkpoint's index may be made to ask for: dotted names through the modules that
# torch.distributed.checkpoint imports or its index names, through torch, the standard library, builtins
CRAFTED = [("torch.distributed.checkpoint.metadata", "os.system"), ("torch.distributed.checkpoint.filesystem", "os.system"),
           ("torch.serialization", "os.system"), ("torch", "os.system"), ("pathlib", "os.system"),
           ("collections", "_sys.modules.os.system"), ("torch", "float32.__class__"), ("builtins", "eval"),
           ("builtins", "getattr"), ("posix", "system"), ("os", "system"), ("subprocess", "getoutput")]


def assert_said_once_by_train_py(proc):
    """torchrun failed with one sentence from its processes, and no traceback of ours (torchrun prints its own
    report of the exit, a traceback through its own code)."""
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1, proc.stderr
    assert not re.search(rf'File "{re.escape(ROOT)}/[^/"]+\.py"', proc.stderr), proc.stderr


def test_crafted_index_is_refused_whatever_it_names(tmp_path, trained_tiny, capsys):
    """No sharded checkpoint's .metadata runs code when read: each crafted one above is shown armed (plain
    pickle runs it) and then refused by name, by the reader every command uses and by the loader of the shards
    alone; a ckpt.pt holding the same pickle is refused too. (In this process; the commands are below.)"""
    import zipfile

    import checkpoint
    marker = tmp_path / "marker"
    pickle.loads(crafted_call(*CRAFTED[0], f"touch {marker}"))  # armed: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    for module, name in CRAFTED:
        folder = sharded_copy(trained_tiny, tmp_path / f"{module}-{name}")
        (folder / ".metadata").write_bytes(crafted_call(module, name, f"touch {marker}"))
        for fn, args in ((checkpoint.read, (str(folder.parent),)), (checkpoint.load_sharded, ({}, str(folder)))):
            with pytest.raises(SystemExit):
                fn(*args)
            err = capsys.readouterr().err
            assert err == f"error: {folder} was refused: it asks to import {module}.{name} when loaded, which " \
                          f"could run code (a checkpoint of train.py holds tensors and plain values only); do not " \
                          f"use it\n", err
        # and the same pickle as a ckpt.pt's data (torch.load with weights_only reads that)
        os.makedirs(tmp_path / "full", exist_ok=True)
        full = tmp_path / "full" / "ckpt.pt"
        torch.save({"iter_num": 1}, full)
        entries = {i.filename: zipfile.ZipFile(full).read(i) for i in zipfile.ZipFile(full).infolist()}
        with zipfile.ZipFile(full, "w") as z:
            for filename, data in entries.items():
                z.writestr(filename, crafted_call(module, name, f"touch {marker}") if filename.endswith("data.pkl") else data)
        with pytest.raises(SystemExit):
            checkpoint.read(str(full))
        assert "was refused: it asks to import" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("script", ["sample.py", "buckets.py", "export.py", "train.py", "torchrun"])
def test_crafted_index_runs_nothing_in_any_command(tmp_path, trained_tiny, script):
    """The file found on 2026-12-07 (78 bytes that ran a shell command in each of these) is refused by every
    command that reads a checkpoint, in one process and under torchrun, and the marker it would make is never made."""
    marker = tmp_path / "marker"
    folder = sharded_copy(trained_tiny, tmp_path / "out")
    (folder / ".metadata").write_bytes(crafted_call(*CRAFTED[0], f"touch {marker}"))
    out = str(tmp_path / "out")
    if script == "torchrun":
        proc = warm.torchrun(train_py(out, f"--dataset={os.path.dirname(trained_tiny)}/data", "--init_from=resume"),
                             cwd=ROOT, env=ENV, timeout=300)
        assert_said_once_by_train_py(proc)
    else:
        args = {"buckets.py": [out], "train.py": [f"--out_dir={out}", "--init_from=resume"]}.get(script, [f"--out_dir={out}"])
        proc = run(script, *args, check=False)
        assert_one_sentence_error(proc)
    assert proc.returncode != 0
    assert "was refused: it asks to import torch.distributed.checkpoint.metadata.os.system" in proc.stderr
    assert not marker.exists()


def test_damaged_checkpoints_are_one_sentence_naming_what_else_to_use(tmp_path, trained_tiny, capsys):
    """A damaged index, shard, training.pt or `latest`, or a ckpt.pt, each says what is damaged and which
    other checkpoint looks complete (or that none does), never that it is an attack; a good one loads."""
    import checkpoint
    import torch.distributed.checkpoint as dcp

    def error(fn, *args):
        with pytest.raises(SystemExit) as stop:
            fn(*args)
        err = capsys.readouterr().err
        assert stop.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "refused" not in err, err
        return err
    sharded_copy(trained_tiny, tmp_path / "good")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as written, it loads without a word
        model, ckpt = checkpoint.load_model(str(tmp_path / "good"))
    assert ckpt["sharded"].endswith("ckpt-2") and model.config.n_layer == 1
    other_shape = train(tmp_path / "good", "--init_from=auto", "--n_layer=2", check=False)  # auto: it resumes
    assert_one_sentence_error(other_shape, "n_layer=2 differs from the checkpoint's 1")

    def damaged(name, damage, older=False):
        """A copy of the good sharded checkpoint in tmp_path/name, damaged by damage(folder); with older, an
        earlier complete folder ckpt-1 beside it."""
        folder = sharded_copy(trained_tiny, tmp_path / name)
        if older:
            shutil.copytree(folder, folder.parent / "ckpt-1")
        damage(folder)
        return folder

    def truncate(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    folder = damaged("index", lambda f: truncate(f / ".metadata"), older=True)
    err = error(checkpoint.read, str(folder.parent))
    assert f"{folder} is damaged (UnpicklingError: pickle data was truncated)" in err
    assert f"{folder.parent / 'ckpt-1'} looks complete: to use it, write ckpt-1 into {folder.parent / 'latest'}" in err
    folder = damaged("shard", lambda f: truncate(f / "__0_0.distcp"))
    err = error(checkpoint.read, str(folder.parent))
    assert "is damaged (EOFError: shard __0_0.distcp is truncated" in err and "no other checkpoint is in" in err
    folder = damaged("missing", lambda f: os.remove(f / "__0_0.distcp"))
    assert "is damaged (FileNotFoundError: shard __0_0.distcp is missing)" in error(checkpoint.load_model, str(folder.parent))
    folder = damaged("zeroed", lambda f: (f / "__0_0.distcp").write_bytes(bytes(os.path.getsize(f / "__0_0.distcp"))))
    assert "is damaged (UnpicklingError: Unsupported operand 0): a shard may be corrupt" in \
        error(checkpoint.load_model, str(folder.parent))
    folder = damaged("training", lambda f: os.remove(f / "training.pt"), older=True)
    assert f"{folder} is damaged: its training.pt is missing; {folder.parent / 'ckpt-1'} looks complete" in \
        error(checkpoint.read, str(folder.parent))
    for text in ("garbage\n", "ckpt-7\n", "\xff\xfe"):
        folder = damaged("latest", lambda f: (f.parent / "latest").write_bytes(text.encode("latin-1")))
        assert f"{folder.parent / 'latest'} is damaged: it names" in error(checkpoint.read, str(folder.parent))
    # a ckpt.pt beside a complete folder: torn, it names the folder (and the scratch-run check reads it too)
    out = tmp_path / "full"
    folder = sharded_copy(trained_tiny, out)
    os.remove(out / "latest")
    shutil.copy(os.path.join(trained_tiny, "ckpt.pt"), out / "ckpt.pt")
    truncate(out / "ckpt.pt")
    err = error(checkpoint.read, str(out))
    assert f"{out / 'ckpt.pt'} is damaged" in err and f"write ckpt-2 into {out / 'latest'} and remove {out / 'ckpt.pt'}" in err
    (out / "latest").write_text("ckpt-2\n")  # as the sentence says
    os.remove(out / "ckpt.pt")
    assert checkpoint.read(str(out))["sharded"] == str(folder)
    # a crafted value (not a tensor) inside a shard is refused as such
    marker = tmp_path / "marker"
    dcp.save({"x": Evil(marker)}, checkpoint_id=tmp_path / "value", no_dist=True)
    with pytest.raises(SystemExit):
        checkpoint.load_sharded({"x": None}, str(tmp_path / "value"))
    assert "was refused: it asks to import posix.system" in capsys.readouterr().err
    assert not marker.exists()


def test_damaged_shard_under_torchrun_is_one_sentence(tmp_path, trained_tiny):
    """A shard torch.distributed.checkpoint finds corrupt while every process loads its part: one sentence,
    from one process, no traceback (its error message was once empty, and the handler itself failed)."""
    folder = sharded_copy(trained_tiny, tmp_path / "out")
    (folder / "__0_0.distcp").write_bytes(bytes(os.path.getsize(folder / "__0_0.distcp")))
    proc = warm.torchrun(train_py(tmp_path / "out", f"--dataset={os.path.dirname(trained_tiny)}/data",
                                  "--init_from=resume"), cwd=ROOT, env=ENV, timeout=300)
    assert_said_once_by_train_py(proc)
    assert f"{folder} is damaged (UnpicklingError: Unsupported operand 0): a shard may be corrupt" in proc.stderr


def test_checkpoint_without_its_dataset_meta_is_one_sentence(tmp_path, trained_tiny):
    ckpt = torch.load(os.path.join(trained_tiny, "ckpt.pt"), weights_only=True)
    del ckpt["meta"]
    os.makedirs(tmp_path / "out")
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    assert_one_sentence_error(run("sample.py", f"--out_dir={tmp_path / 'out'}", check=False),
                              "is a PyTorch file but not a checkpoint written by train.py")


# -----------------------------------------------------------------------------
# 2. one run per out_dir; 3. a scratch run does not destroy a checkpoint


# train.py on a file system without locks (NFS without lockd: ENOLCK) that also refuses to fsync a directory
NO_LOCKS = """
import errno, fcntl, os, runpy, stat, sys
def flock(*args):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
def fsync(fd, fsync=os.fsync):
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    fsync(fd)
fcntl.flock, os.fsync = flock, fsync
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_file_system_without_locks_warns_and_trains(tmp_path, monkeypatch, capsys):
    """Only a lock held by another process refuses a run; a file system that has no locks (ENOLCK, or Lustre's
    ENOSYS) is one warning line and the run goes on, and so does a refused fsync of the out_dir."""
    import errno

    import checkpoint
    proc = warm.run([sys.executable, "-c", NO_LOCKS, os.path.join(ROOT, "train.py"), f"--out_dir={tmp_path / 'out'}",
                     *TINY, "--max_iters=2"], cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("warning: the file system of") == 1 and "has no locks (No locks available)" in proc.stderr
    assert (tmp_path / "out" / "ckpt.pt").exists()
    for number in (errno.ENOSYS, errno.EWOULDBLOCK):
        def flock(*args):
            raise OSError(number, os.strerror(number))
        monkeypatch.setattr(checkpoint.fcntl, "flock", flock)
        if number == errno.EWOULDBLOCK:  # held by another process: the only refusal
            with pytest.raises(SystemExit):
                checkpoint.lock(str(tmp_path / "out"))
            assert "is in use by another run" in capsys.readouterr().err
        else:
            checkpoint.lock(str(tmp_path / "out")).close()
            assert "has no locks (Function not implemented)" in capsys.readouterr().err


def test_second_run_on_the_same_out_dir_stops(tmp_path):
    out = tmp_path / "out"
    first = start(out, "--max_iters=100000", "--eval_interval=100000")
    try:
        wait_for(lambda: len(logged_iters(out)) >= 2, first)
        lock = (out / ".lock").read_text()
        assert f"pid {first.pid} on {socket.gethostname()}" in lock and "train.py" in lock
        config, log = (out / "config.json").read_bytes(), (out / "log.jsonl").read_bytes()
        second = train(out, "--loss=ce", "--max_iters=2", check=False)
        assert_one_sentence_error(second, "is in use by another run", f"pid {first.pid}", "another --out_dir")
        assert (out / ".lock").read_text() == lock and (out / "config.json").read_bytes() == config
        assert (out / "log.jsonl").read_bytes().startswith(log)  # only the first run appends to it
        assert first.poll() is None
    finally:
        first.kill()
        first.communicate()
    train(out, "--max_iters=2", "--eval_interval=2")  # the lock died with its process: no stale lock


def test_scratch_run_does_not_destroy_a_checkpoint(tmp_path):
    out = tmp_path / "out"
    train(out, "--max_iters=4", "--eval_interval=4")
    ckpt, log = (out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_bytes()
    proc = train(out, "--max_iters=2", check=False)
    assert_one_sentence_error(proc, "already holds a checkpoint", "--init_from=resume", "--out_dir",
                              "--overwrite=True")
    assert (out / "ckpt.pt").read_bytes() == ckpt and (out / "log.jsonl").read_bytes() == log
    train(out, "--max_iters=2", "--eval_interval=2", "--overwrite=True")
    assert [r["iter"] for r in read_log(out)] == [0, 2, 2]  # a fresh log: the old run's records are gone
    assert ckpt_iter(out) == 2


# -----------------------------------------------------------------------------
# 5. say only what happened; a failing command leaves no out_dir behind


def test_max_iters_zero_writes_and_claims_no_checkpoint(tmp_path):
    proc = train(tmp_path / "out", "--max_iters=0")
    assert not (tmp_path / "out" / "ckpt.pt").exists()
    assert "checkpoint in" not in proc.stdout and "no checkpoint written" in proc.stdout


@pytest.mark.parametrize("args", [["--dataset=nonexistent"], ["--block_size=1000000"], ["--init_from=resume"],
                                  ["--learning_rate=-1"], ["--beta1=2"], ["--seed=-5"]])
def test_failing_command_leaves_no_out_dir(tmp_path, args):
    proc = train(tmp_path / "new", *args, check=False)
    assert proc.returncode == 1 and not (tmp_path / "new").exists()


# -----------------------------------------------------------------------------
# 6. bad input: one sentence each


def test_bad_dataset_files(tmp_path):
    data = make_dataset(tmp_path / "d", tokens=2000)
    with open(os.path.join(data, "val.bin"), "ab") as f:
        f.write(b"\x01")  # half a token
    proc = train(tmp_path / "out", f"--dataset={data}", check=False)
    assert_one_sentence_error(proc, "val.bin has 4001 bytes, not a whole number of 2-byte token ids")
    # buckets.py reads a checkpoint's dataset as train.py does: the same sentence
    data = make_dataset(tmp_path / "later", tokens=2000)
    train(tmp_path / "trained", f"--dataset={data}", "--max_iters=1", "--eval_interval=1")
    with open(os.path.join(data, "val.bin"), "ab") as f:
        f.write(b"\x01")
    assert_one_sentence_error(run("buckets.py", str(tmp_path / "trained"), check=False),
                              "val.bin has 4001 bytes, not a whole number of 2-byte token ids")
    data = make_dataset(tmp_path / "m", b"\x80\x04\x95 truncated", tokens=2000)
    assert_one_sentence_error(train(tmp_path / "out", f"--dataset={data}", check=False),
                              "not a readable dataset meta", "prepare the dataset again")
    assert not (tmp_path / "out").exists()


def test_block_size_too_long_names_the_longest_that_fits(tmp_path):
    data = make_dataset(tmp_path / "d", tokens=300)
    proc = train(tmp_path / "out", f"--dataset={data}", "--block_size=500", check=False)
    assert_one_sentence_error(proc, "block_size 500 is too long", "use --block_size=299 or less")
    train(tmp_path / "out", f"--dataset={data}", "--block_size=299", "--max_iters=1")  # the advice works
    proc = train(tmp_path / "out2", f"--dataset={data}", "--block_size=300", check=False)
    assert_one_sentence_error(proc, "use --block_size=299 or less")


def test_missing_checkpoint_message_fits_each_command(tmp_path):
    proc = run("buckets.py", str(tmp_path / "none"), check=False)
    assert_one_sentence_error(proc, "no checkpoint at", "python buckets.py DIR")
    assert "--out_dir" not in proc.stderr  # buckets.py has no such flag
    for script in ("train.py", "sample.py"):
        args = ["--init_from=resume"] if script == "train.py" else []
        proc = run(script, f"--out_dir={tmp_path / 'none'}", *args, check=False)
        assert_one_sentence_error(proc, "no checkpoint at", "point --out_dir at the directory")


# -----------------------------------------------------------------------------
# 4. Ctrl-C saves the last completed step and says how to resume; the resumed run is exact


def interrupt(out, args, at):
    """Start a run, Ctrl-C it once `at` training iterations are logged; (stdout, stderr) after it exits 130."""
    proc = start(out, *args)
    wait_for(lambda: len(logged_iters(out)) >= at, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr, stderr
    return stdout, stderr


def resume_command(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("interrupted at iteration"))
    return shlex.split(line.split("resume with: ")[1])


def test_ctrl_c_saves_and_resumes_exactly(tmp_path):
    """Ctrl-C lands, almost always, within a step of 20 micro-batches: the step is dropped (its gradients, and
    the dropout draws it made), the one before it saved, and the resumed run is bit-exact."""
    args = ["--max_iters=12", "--eval_interval=1000", "--log_interval=1", "--dropout=0.1",  # dropout: RNG matters
            "--gradient_accumulation_steps=20"]
    train_env(tmp_path / "straight", *args)
    straight = step_losses(tmp_path / "straight")
    for attempt in range(3):  # a signal between two steps saves as well, but drops nothing: try again
        out = tmp_path / f"stopped{attempt}"
        stdout, stderr = interrupt(out, args, at=4)
        stopped_at = ckpt_iter(out)  # eval_interval is past the end: this checkpoint is the interrupt's own
        if "was dropped" in stdout:
            break
    assert 4 <= stopped_at < 12 and max(logged_iters(out)) == stopped_at
    assert f"interrupted at iteration {stopped_at} (iteration {stopped_at + 1}, under way, was dropped): " \
           f"checkpoint in {out / 'ckpt.pt'}; resume with: " in stdout
    cmd = resume_command(stdout)
    assert cmd[-1] == "--init_from=resume" and f"--out_dir={out}" in cmd
    proc = warm.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)  # as printed
    assert proc.returncode == 0, proc.stderr
    resumed = step_losses(out)
    assert sorted(resumed) == sorted(straight) == list(range(1, 13))
    for it in straight:  # bit-exact: the same batches, weights, optimizer and dropout state
        assert resumed[it] == straight[it], it


def test_ctrl_c_during_startup_and_first_evaluation(tmp_path):
    out = tmp_path / "out"
    proc = start(out, "--max_iters=100", fresh=True)  # at once: while it imports and checks
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "nothing to save" in stdout + stderr and not (out / "ckpt.pt").exists()
    # during the evaluation at iteration 0 (long: 1500 batches a split): it is dropped, and the run stops
    proc = start(out, "--max_iters=100", "--eval_iters=1500")  # seconds, however fast the machine
    wait_for(lambda: "parameters" in proc.stdout.readline(), proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted before the first step: nothing to save" in stdout
    assert not (out / "ckpt.pt").exists() and not (out / "log.jsonl").exists()  # no evaluation logged


def test_second_ctrl_c_stops_at_once(tmp_path):
    """The first Ctrl-C waits for the micro-batch under way (here one long one, a whole step), the second not."""
    out = tmp_path / "out"
    proc = start(out, "--max_iters=100", "--eval_interval=1000", "--eval_iters=1", "--log_interval=1",
                 "--batch_size=4000")
    wait_for(lambda: 2 in logged_iters(out), proc)  # step 3 is under way
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals at once would count as one
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert "stopping at once" in stderr and not (out / "ckpt.pt").exists()


# -----------------------------------------------------------------------------
# 7. under torchrun: every process stops at the same step, and an error in any process is told


def train_py(out, *args):
    """The command of a tiny run in two processes, for torchrun (or warm.torchrun) to start."""
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}", *TINY, "--gradient_accumulation_steps=2",
            *args]


def torchrun(out, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *train_py(out, *args)[1:]]


def rank_pid(parent, rank):
    """The pid of the train.py process with this RANK among parent's children (Linux /proc)."""
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) == parent:
                if f"RANK={rank}".encode() in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                    return int(pid)
        except OSError:
            continue
    return None


@pytest.mark.heavy
def test_ctrl_c_in_one_process_stops_all_at_the_same_step(tmp_path):
    args = ["--loss=mile", "--max_iters=30", "--eval_interval=1000", "--log_interval=1"]
    out = tmp_path / "out"
    proc = subprocess.Popen(torchrun(out, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, start_new_session=True)
    wait_for(lambda: len(logged_iters(out)) >= 5, proc)
    os.kill(rank_pid(proc.pid, 1), signal.SIGINT)  # the second process only: the first must learn of it
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    stopped_at = ckpt_iter(out)
    assert 5 <= stopped_at < 30 and max(logged_iters(out)) == stopped_at
    cmd = resume_command(stdout)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] and \
        cmd[-1] == "--init_from=resume"
    resumed = warm.torchrun([sys.executable, *cmd[5:]], cwd=ROOT, env=ENV, timeout=600)  # that command's processes
    assert resumed.returncode == 0, resumed.stderr
    warm.torchrun(train_py(tmp_path / "straight", *args), cwd=ROOT, env=ENV, check=True, timeout=600)
    straight, resumed = step_losses(tmp_path / "straight"), step_losses(out)
    assert sorted(resumed) == sorted(straight) == list(range(1, 31))
    for it in straight:
        assert resumed[it] == straight[it], it


def two_machines(tmp_path, *args):
    """train.py as 2 processes on 2 "machines" that do not share their files: each its own working
    directory (the dataset is a relative path), LOCAL_RANK 0 in both, as on two nodes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(warm.start([sys.executable, os.path.join(ROOT, "train.py"), *TINY, *args],
                                      cwd=tmp_path / f"node{rank}", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    return [(p, *p.communicate(timeout=300)) for p in procs]


@pytest.mark.parametrize("broken", ["missing", "malformed"])
def test_an_error_in_the_second_process_reaches_the_user(tmp_path, broken):
    make_dataset(tmp_path / "node0" / "d", tokens=5000)
    if broken == "missing":
        os.makedirs(tmp_path / "node1")
    else:
        make_dataset(tmp_path / "node1" / "d", b"\x80\x04 a truncated pickle", tokens=5000)
    out = tmp_path / "out"
    results = two_machines(tmp_path, "--dataset=./d", f"--out_dir={out}", "--gradient_accumulation_steps=2",
                           "--max_iters=2")
    assert all(p.returncode == 1 for p, _, _ in results), results
    stderr = "".join(err for _, _, err in results)
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: process 1 on {socket.gethostname()}: "), stderr
    assert ("no dataset" if broken == "missing" else "not a readable dataset meta") in errors[0]
    assert not out.exists()  # nothing started


def test_lock_refusal_under_torchrun_is_said_once(tmp_path):
    out = tmp_path / "out"
    holder = start(out, "--max_iters=100000", "--eval_interval=100000")
    try:
        wait_for(lambda: len(logged_iters(out)) >= 1, holder)
        proc = warm.torchrun(train_py(out, "--max_iters=2"), cwd=ROOT, env=ENV, timeout=300)
        assert proc.returncode != 0
        assert proc.stderr.count("error: ") == 1 and f"in use by another run (pid {holder.pid}" in proc.stderr
    finally:
        holder.kill()
        holder.communicate()


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_stops_even_inside_one_long_operation(signal_number):
    """Python runs its own signal handlers between operations only: inside one long matmul (seconds on one
    core) a second Ctrl-C would wait for it. system.StopSignals acts from a watcher thread, at once."""
    script = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import torch; from system import StopSignals\n"
              "torch.set_num_threads(1); stop = StopSignals(); stop.training = True\n"
              "a = torch.randn(6000, 6000); a @ a[:, :10]; print('ready', flush=True)\n"
              "t = time.time(); a @ a; print(f'the operation ended after {time.time() - t:.1f} s', flush=True)\n")
    proc = warm.start([sys.executable, "-c", script], env=ENV)
    assert proc.stdout.readline() == "ready\n"
    time.sleep(0.5)  # inside the matmul: 6000^3 multiply-adds, several seconds on one core
    proc.send_signal(signal_number)
    time.sleep(0.3)
    sent = time.time()
    proc.send_signal(signal_number)
    stdout, stderr = proc.communicate(timeout=120)
    assert time.time() - sent < 1.0, "the second signal waited for the operation to end"
    assert proc.returncode == 128 + signal_number and stdout == "", stdout
    assert "saving a checkpoint after this step" in stderr and "stopping at once" in stderr
