"""
Module: out_dir's files, imported by train.py and every command that reads a checkpoint.

The files of a run in out_dir: one run at a time (a lock), checkpoints written atomically and read as
tensors only, and a trained model back from out_dir for sample.py, buckets.py and export.py.
docs/checkpoints.md says what each promise means.

Two kinds of checkpoint: one process writes ckpt.pt, one file; under torchrun every process writes its
own shard into a folder ckpt-<iteration>/ (torch.distributed.checkpoint), and the file `latest` names
the newest complete folder. Either kind resumes on any number of processes and loads in sample.py.
"""

import errno
import os
import pickle
import re
import shutil
import shlex
import socket
import sys
import time
import warnings

import torch

import distributed
import settings
from model import GPT, GPTConfig
from system import fail

try:
    import fcntl  # the out_dir lock
except ImportError:  # Windows: no lock
    fcntl = None

CHECKPOINT = "ckpt.pt"
LATEST = "latest"  # names the newest complete sharded checkpoint folder, ckpt-<iteration>
TRAINING = "training.pt"  # in a sharded folder, beside the shards: what is not sharded (NEEDED less the state)
NEEDED = ("model", "optimizer", "model_args", "config", "meta", "iter_num", "rng")


def command_line():
    """The command that started this process, as a list: python's, or under torchrun torchrun's (the parent)."""
    parent = f"/proc/{os.getppid()}/cmdline"
    if "TORCHELASTIC_RUN_ID" in os.environ and os.path.exists(parent):
        with open(parent) as f:
            argv = f.read().split("\0")[:-1]
        return argv[1:] if os.path.basename(argv[1]) == "torchrun" else argv  # not python's path before it
    return sys.orig_argv


def lock(out_dir):
    """Hold out_dir for this run through an advisory lock on out_dir/.lock, which the operating system drops
    when the process ends, however it ends, and write who holds it there. Returns the open lock file (the
    lock lasts while it is open), or stops with one sentence naming the holder."""
    os.makedirs(out_dir, exist_ok=True)
    holder = open(os.path.join(out_dir, ".lock"), "a+")
    if fcntl:
        try:
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # NFS without lockd (ENOLCK), Lustre (ENOSYS)
                print(f"warning: the file system of {out_dir} has no locks ({e.strerror}), so a second run in this "
                      f"out_dir would not be stopped: start one run in it at a time", file=sys.stderr)
            else:
                holder.seek(0)
                fail(f"{out_dir} is in use by another run ({holder.read().strip() or 'just starting'}); wait for it "
                     f"to end or stop it, or train into another --out_dir")
    holder.truncate(0)
    holder.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{shlex.join(command_line())}\n")
    holder.flush()
    return holder


def save(path, state):
    """torch.save(state, path), atomically: a temporary file, flushed to disk, then renamed over the old
    one, so a kill at any moment leaves the last good checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable, where the file system lets us
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        except OSError:  # some network file systems refuse it (EINVAL): their rename is durable as it is
            pass
        finally:
            os.close(fd)


def find(out_dir):
    """The newest checkpoint in out_dir: the path of ckpt.pt or of a sharded folder, or None. (A run killed
    between writing one kind and removing the other leaves both: the newer one counts.) A `latest` that
    names no checkpoint folder stops with one sentence saying which checkpoint could be used instead."""
    full = os.path.join(out_dir, CHECKPOINT)
    pointer = os.path.join(out_dir, LATEST)
    sharded = None
    if os.path.isfile(pointer):
        try:
            with open(pointer) as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError):
            name = "?"
        sharded = os.path.join(out_dir, name)
        if not re.fullmatch(r"ckpt-\d+", name) or not os.path.isdir(sharded):
            fail(f"{pointer} is damaged: it names {name[:40]!r}, which is not a checkpoint folder in {out_dir}; "
                 f"{instead(pointer)}", local=True)
    if sharded and os.path.isfile(full):
        return sharded if os.path.getmtime(pointer) >= os.path.getmtime(full) else full
    return sharded or (full if os.path.isfile(full) else None)


def instead(damaged):
    """How a sentence about a damaged checkpoint (ckpt.pt, a sharded folder, or `latest`) ends: the newest other
    checkpoint in its out_dir that looks complete (a folder does once training.pt, written last, is in it),
    and how to use it."""
    damaged = os.path.abspath(damaged)
    out_dir = os.path.dirname(damaged)
    pointer = os.path.join(out_dir, LATEST)
    folders = sorted((n for n in os.listdir(out_dir) if re.fullmatch(r"ckpt-\d+", n)), key=lambda n: -int(n[5:]))
    for name in folders:
        path = os.path.join(out_dir, name)
        if path != damaged and os.path.isfile(os.path.join(path, TRAINING)):
            also = f" and remove {damaged}" if damaged == os.path.join(out_dir, CHECKPOINT) else ""
            return f"{path} looks complete: to use it, write {name} into {pointer}{also}"
    full = os.path.join(out_dir, CHECKPOINT)
    if os.path.isfile(full) and full != damaged:
        return f"{full} looks complete: to use it, remove {pointer}"
    return f"no other checkpoint is in {out_dir}: restore a good copy, or start afresh with --overwrite=True"


def read(path, elsewhere="point --out_dir at the directory that holds ckpt.pt"):
    """The dict train.py saved at path, on the CPU, or exit with one sentence saying what is wrong.
    path: ckpt.pt, an out_dir (its newest checkpoint), or a sharded folder, whose dict holds the folder
    under "sharded" in place of the model and optimizer state. elsewhere: how the caller's user names another
    checkpoint directory. Tensors and plain values only (weights_only), and a sharded folder's index with
    nothing but its own classes (read_index): a file that asks to import anything is refused, never run;
    a damaged one is one sentence naming it."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, TRAINING)):
        path = find(path) or os.path.join(path, CHECKPOINT)
    sharded = os.path.isdir(path)
    file = os.path.join(path, TRAINING) if sharded else path
    if not os.path.isfile(file):
        if sharded:  # `latest` names it, so it was complete once
            fail(f"{path} is damaged: its {TRAINING} is missing; {instead(path)}", local=True)
        fail(f"no checkpoint at {path}; train one first (python train.py), or {elsewhere}", local=True)
    try:
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=not sharded)
        except RuntimeError as e:  # mmap's complaint about a file that is no zip hides what is wrong with it
            if "mmap" not in str(e):
                raise
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
        if sharded:
            check_shards(path, read_index(path))
    except Exception as e:
        unreadable(path, e, "it may be truncated or corrupt")
    needed = set(NEEDED) - ({"model", "optimizer"} if sharded else set())
    if not isinstance(checkpoint, dict) or not needed <= checkpoint.keys():
        fail(f"{path} is a PyTorch file but not a checkpoint written by train.py", local=True)
    checkpoint["model_args"] = settings.upgrade(checkpoint["model_args"], model_args=True)
    if sharded:
        checkpoint["sharded"] = path
    return checkpoint


def unreadable(path, e, damage):
    """Stop with one sentence for a checkpoint whose reading raised e: refused, if it asked to import a name (our
    index reader, or torch's weights_only), else damaged, saying which other checkpoint could be used instead."""
    weights_only = re.search(r"GLOBAL (\S+)", str(e)) if "Weights only load failed" in str(e) else None
    asked = e.name if isinstance(e, _Refused) else weights_only and weights_only.group(1)
    if asked:
        fail(f"{path} was refused: it asks to import {asked} when loaded, which could run code (a checkpoint of "
             f"train.py holds tensors and plain values only); do not use it", local=True)
    cause = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(e))  # torch's weights_only says why after advice
    first = cause.group(1) if cause else (str(e).strip().splitlines() or [""])[0]
    first = f": {first[:120]}" + ("..." if len(first) > 120 else "") if first else ""
    fail(f"{path} is damaged ({type(e).__name__}{first}): {damage}; {instead(path)}", local=True)


# -----------------------------------------------------------------------------
# a sharded checkpoint's index: torch.distributed.checkpoint writes it with pickle, which can run any code
# when it is read; we read it with an unpickler that can build the index's own classes and nothing else,
# and torch.distributed.checkpoint is handed what we read (never the file)


class _Refused(pickle.UnpicklingError):
    """An index that names a class it may not: an attack, never a damaged file."""

    def __init__(self, name):
        super().__init__(name)
        self.name = name


class _Index(pickle.Unpickler):
    """Reads .metadata allowing exactly the (module, name) pairs in ALLOWED, looked up one attribute deep. No
    dotted name, no whole module: pickle itself resolves module "torch.distributed.checkpoint.metadata",
    name "os.system" to os.system through that module's own `import os`."""
    ALLOWED = {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),  # which file, offset, length hold a piece
        ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib._local", "PosixPath"),  # checkpoint_id
    } | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}  # float32, ...

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        __import__(module)
        return getattr(sys.modules[module], name)


def read_index(folder):
    """A sharded checkpoint folder's index (torch.distributed.checkpoint's Metadata: which file holds each
    piece of each tensor), read with _Index. Raises _Refused for a class it may not name, another exception
    for a damaged file."""
    from torch.distributed.checkpoint.metadata import Metadata
    with open(os.path.join(folder, ".metadata"), "rb") as f:
        index = _Index(f).load()
    if not isinstance(index, Metadata) or not isinstance(index.storage_data, dict):
        raise ValueError(".metadata holds no checkpoint index")
    return index


def check_shards(folder, index):
    """Every shard file the index names is in folder and long enough for the pieces it should hold."""
    ends = {}
    for info in index.storage_data.values():
        file = info.relative_path
        if os.path.basename(file) != file or file.startswith("."):
            raise ValueError(f".metadata names a shard outside the folder, {file[:60]!r}")
        ends[file] = max(ends.get(file, 0), info.offset + info.length)
    for file, end in sorted(ends.items()):
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {file} is missing")
        if os.path.getsize(path) < end:
            raise EOFError(f"shard {file} is truncated ({os.path.getsize(path)} of at least {end} bytes)")


def load_sharded(state, folder):
    """Fill state (a dict of state dicts, sharded or whole) from a sharded checkpoint folder that read()
    accepted. Its index is read here (read_index) and handed to torch.distributed.checkpoint, which would read
    it with pickle; the values that are not tensors (the optimizer's hyperparameters), which it loads with
    pickle too, are each loaded here with weights_only first."""
    import torch.distributed.checkpoint as dcp
    try:
        index = read_index(folder)
    except Exception as e:
        unreadable(folder, e, "it may be truncated or corrupt")

    class Reader(dcp.FileSystemReader):  # torch's reader of the shards, given the index read above
        def read_metadata(self):  # (no **kwargs: so torch never falls back to a rank's own index file either)
            return index

    class TensorsOnly(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            torch.load(value, weights_only=True)  # refuses what would import anything
            value.seek(0)
            super().load_bytes(read_item, value)

    try:
        with warnings.catch_warnings():  # one process reading a checkpoint of several is what we mean
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, storage_reader=Reader(folder), planner=TensorsOnly())
    except (Exception, dcp.CheckpointException) as e:  # the latter, a BaseException, wraps each process's error
        unreadable(folder, next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e,
                   "a shard may be corrupt")


def load_model(out_dir, device="cpu", elsewhere="point --out_dir at the directory that holds ckpt.pt"):
    """(model, checkpoint): the trained model of out_dir (its newest checkpoint, either kind) in eval mode on
    device, and its checkpoint dict (settings, dataset meta, ...). The model computes the plain way (eager, the
    full loss path), whatever the run that trained it did: that is no part of its model_args."""
    checkpoint = read(out_dir, elsewhere)
    config = GPTConfig(**checkpoint["model_args"])
    if "sharded" in checkpoint:  # the shards, put together in this process
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device="cpu")
        load_sharded({"model": model.state_dict()}, checkpoint["sharded"])
    else:
        model = GPT(config)
        model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), checkpoint


# -----------------------------------------------------------------------------
# a training run's state: model, optimizer and every process's random stream


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


def full_state_options():
    """Full (unsharded) state dicts keyed by parameter name, on the CPU: a checkpoint saved by N processes,
    DDP or FSDP, loads in M processes or in one. (Imported here, not at the top: the import takes most of
    a second, which a command that stops at a bad setting need not wait for.)"""
    from torch.distributed.checkpoint import state_dict
    return state_dict, state_dict.StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_training(out_dir, model, optimizer, procs, device, **extra):
    """Write the training state into out_dir, atomically, and return the checkpoint's path. Every process
    calls it. One process writes ckpt.pt. Under torchrun each process writes only its own shard of the
    model and optimizer into ckpt-<iter_num>/; when all have, process 0 writes the rest there (settings,
    every process's random state), points `latest` at the folder and only then removes older checkpoints:
    a kill at any moment leaves the last complete one in place."""
    rngs = distributed.gather_objects(procs, rng_state(device))
    if not procs.distributed:
        sd, options = full_state_options()
        path = os.path.join(out_dir, CHECKPOINT)
        save(path, {"model": sd.get_model_state_dict(model, options=options),
                    "optimizer": sd.get_optimizer_state_dict(model, optimizer, options=options), "rng": rngs, **extra})
        remove(out_dir, keep=path)
        return path
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    folder = os.path.join(out_dir, f"ckpt-{extra['iter_num']}")
    if procs.master and os.path.isdir(folder):  # what a killed save left: never the latest (find)
        shutil.rmtree(folder)
    distributed.barrier(procs)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    if procs.master:
        save(os.path.join(folder, TRAINING), {"rng": rngs, **extra})
        with open(os.path.join(out_dir, LATEST + ".tmp"), "w") as f:
            f.write(os.path.basename(folder) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(out_dir, LATEST + ".tmp"), os.path.join(out_dir, LATEST))
        remove(out_dir, keep=folder)
    distributed.barrier(procs)
    return folder


def remove(out_dir, keep=None):
    """Remove the checkpoints in out_dir, of both kinds, all but keep (a path)."""
    for name in [CHECKPOINT, LATEST] + [n for n in os.listdir(out_dir) if re.fullmatch(r"ckpt-\d+", n)]:
        path = os.path.join(out_dir, name)
        if not os.path.exists(path) or (keep and os.path.abspath(path) == os.path.abspath(keep)):
            continue
        if name == LATEST and keep and os.path.isdir(keep):  # it names the folder kept
            continue
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def restore_training(checkpoint, model, optimizer, procs, device):
    """Load a checkpoint's model and optimizer state into this process's (possibly sharded) model and
    optimizer, whatever the number of processes that saved it, and continue its random stream (dropout)
    where it stopped."""
    if "sharded" in checkpoint:  # each process reads the parts of the shards that make up its own
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        load_sharded(state, checkpoint["sharded"])
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        sd, options = full_state_options()
        sd.set_model_state_dict(model, checkpoint["model"], options=options)
        sd.set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=options)
    set_rng_state(checkpoint["rng"][procs.rank % len(checkpoint["rng"])], device)


def set_rng_state(rng, device):
    """Continue the random stream that rng_state saved."""
    torch.set_rng_state(rng["cpu"])
    if device.startswith("cuda") and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def check_shared(out_dir, procs):
    """Under torchrun on several machines, stop with one sentence unless every process sees the out_dir
    process 0 made: checkpoints are written there by all of them and resumed from there by all of them."""
    if not procs.distributed:
        return
    marker = os.path.join(out_dir, ".processes")
    token = f"{socket.gethostname()} {os.getpid()} {time.time()}"
    if procs.master:
        with open(marker, "w") as f:
            f.write(token)
    token = distributed.gather_objects(procs, token)[0]
    try:
        with open(marker) as f:
            seen = f.read() == token
    except OSError:
        seen = False
    if not all(distributed.gather_objects(procs, seen)):
        fail(f"some processes do not see the out_dir {out_dir} that process 0 made on {socket.gethostname()}: every "
             f"process writes its checkpoint shard there, so put out_dir on a file system all machines share")
