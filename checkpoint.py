"""
The files of a run in out_dir: one run at a time (a lock), checkpoints written atomically and read as
tensors only, and a trained model back from out_dir for sample.py, evaluate.py and export.py.
docs/checkpoints.md says what each promise means.

Two kinds of checkpoint: one process writes ckpt.pt, one file; under torchrun every process writes its
own shard into a folder ckpt-<iteration>/ (torch.distributed.checkpoint), and the file `latest` names
the newest complete folder. Either kind resumes on any number of processes and loads in sample.py.
"""

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
        except OSError:
            holder.seek(0)
            fail(f"{out_dir} is in use by another run ({holder.read().strip() or 'just starting'}); wait for it to "
                 f"end or stop it, or train into another --out_dir")
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
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)


def find(out_dir):
    """The newest checkpoint in out_dir: the path of ckpt.pt or of a sharded folder, or None. (A run killed
    between writing one kind and removing the other leaves both: the newer one counts.)"""
    full = os.path.join(out_dir, CHECKPOINT)
    pointer = os.path.join(out_dir, LATEST)
    sharded = None
    if os.path.isfile(pointer):
        with open(pointer) as f:
            sharded = os.path.join(out_dir, f.read().strip())
    if sharded and os.path.isfile(full):
        return sharded if os.path.getmtime(pointer) >= os.path.getmtime(full) else full
    return sharded or (full if os.path.isfile(full) else None)


def read(path, elsewhere="point --out_dir at the directory that holds ckpt.pt"):
    """The dict train.py saved at path, on the CPU, or exit with one sentence saying what is wrong.
    path: ckpt.pt, an out_dir (its newest checkpoint), or a sharded folder, whose dict holds the folder
    under "sharded" in place of the model and optimizer state. elsewhere: how the caller's user names another
    checkpoint directory. Tensors and plain values only (weights_only): a file that asks to import anything
    is refused, never run."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, TRAINING)):
        path = find(path) or os.path.join(path, CHECKPOINT)
    sharded = os.path.isdir(path)
    file = os.path.join(path, TRAINING) if sharded else path
    if not os.path.isfile(file):
        fail(f"no checkpoint at {path}; train one first (python train.py), or {elsewhere}", local=True)
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=not sharded)
        if sharded:  # its index, a pickle: read with nothing but the index's own classes allowed
            with open(os.path.join(path, ".metadata"), "rb") as f:
                _Metadata(f).load()
    except Exception as e:
        refused = re.search(r"GLOBAL (\S+)", str(e)) if "Weights only load failed" in str(e) else None
        if refused or isinstance(e, pickle.UnpicklingError):
            fail(f"{path} was refused: it asks to import {refused.group(1) if refused else e} when loaded, which "
                 f"could run code (a checkpoint of train.py holds tensors and plain values only); do not use it",
                 local=True)
        fail(f"{path} is not a readable checkpoint (it may be truncated or corrupt: {type(e).__name__}); restore a "
             f"good copy, or train afresh over it with python train.py --out_dir={os.path.dirname(path) or '.'} "
             f"--overwrite=True", local=True)
    needed = set(NEEDED) - ({"model", "optimizer"} if sharded else set())
    if not isinstance(checkpoint, dict) or not needed <= checkpoint.keys():
        fail(f"{path} is a PyTorch file but not a checkpoint written by train.py", local=True)
    checkpoint["model_args"] = upgrade(checkpoint["model_args"])
    if sharded:
        checkpoint["sharded"] = path
    return checkpoint


class _Metadata(pickle.Unpickler):
    """Reads a sharded checkpoint's .metadata (a pickle) and refuses every class but those it is made of."""
    MODULES = ("torch.distributed.checkpoint.metadata",)
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
             ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in self.MODULES or (module, name) in self.NAMES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def load_sharded(state, folder):
    """Fill state (a dict of state dicts, sharded or whole) from a sharded checkpoint folder that read()
    accepted. torch.distributed.checkpoint loads the values that are not tensors (the optimizer's
    hyperparameters) with pickle: each is loaded here with weights_only first."""
    import torch.distributed.checkpoint as dcp

    class TensorsOnly(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            torch.load(value, weights_only=True)  # refuses what would import anything
            value.seek(0)
            super().load_bytes(read_item, value)

    try:
        with warnings.catch_warnings():  # one process reading a checkpoint of several is what we mean
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=folder, planner=TensorsOnly())
    except (Exception, dcp.CheckpointException) as e:  # the latter, a BaseException, wraps each process's error
        if isinstance(e, dcp.CheckpointException):
            e = next(iter(e.failures.values()))[0]
        if "Weights only load failed" in str(e):
            fail(f"{folder} was refused: a value in it asks to import code when loaded; do not use it", local=True)
        fail(f"{folder} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]}): a shard may be "
             f"missing or damaged; restore the folder from a copy, or start afresh with --overwrite=True", local=True)


def upgrade(model_args):
    """GPTConfig arguments saved by an earlier version, in today's names."""
    args = dict(model_args)
    if "chunked_loss" in args:  # True / False / "auto" before the loss path was decided at start-up
        args["loss_path"] = "chunked" if str(args.pop("chunked_loss")).lower() == "true" else "full"
    args.pop("compile_loss", None)  # now GPTConfig.compiled, which a loaded model is not
    return args


def load_model(out_dir, device="cpu", elsewhere="point --out_dir at the directory that holds ckpt.pt"):
    """(model, checkpoint): the trained model of out_dir (its newest checkpoint, either kind) in eval mode on
    device, and its checkpoint dict (settings, dataset meta, ...). The model runs eagerly, whatever the run
    that trained it did."""
    checkpoint = read(out_dir, elsewhere)
    config = GPTConfig(**{**checkpoint["model_args"], "compiled": False})
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
    rng = checkpoint["rng"][procs.rank % len(checkpoint["rng"])]
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
