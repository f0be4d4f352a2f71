"""
The files of a run in out_dir: one run at a time (a lock), checkpoints written atomically and read as
tensors only, and a trained model back from out_dir for sample.py, evaluate.py and export.py.
docs/checkpoints.md says what each promise means.
"""

import os
import re
import shlex
import socket
import sys
import time

import torch

import distributed
from model import GPT, GPTConfig
from system import fail

try:
    import fcntl  # the out_dir lock
except ImportError:  # Windows: no lock
    fcntl = None

CHECKPOINT = "ckpt.pt"
NEEDED = ("model", "optimizer", "model_args", "config", "meta", "iter_num", "rng")


def command_line():
    """The command that started this process, as a list: python's, or under torchrun torchrun's (the parent)."""
    parent = f"/proc/{os.getppid()}/cmdline"
    if "TORCHELASTIC_RUN_ID" in os.environ and os.path.exists(parent):
        with open(parent) as f:
            return f.read().split("\0")[:-1]
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


def read(path, elsewhere="point --out_dir at the directory that holds ckpt.pt"):
    """The dict train.py saved at path, on the CPU, or exit with one sentence saying what is wrong.
    elsewhere: how the caller's user names another checkpoint directory. Tensors and plain values only
    (weights_only): a file that asks to import anything is refused, never run."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train one first (python train.py), or {elsewhere}", local=True)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        refused = re.search(r"GLOBAL (\S+)", str(e)) if "Weights only load failed" in str(e) else None
        if refused:
            fail(f"{path} was refused: it asks to import {refused.group(1)} when loaded, which could run code (a "
                 f"checkpoint of train.py holds tensors and plain values only); do not use this file", local=True)
        fail(f"{path} is not a readable checkpoint (it may be truncated or corrupt: {type(e).__name__}); restore a "
             f"good copy, or train afresh over it with python train.py --out_dir={os.path.dirname(path) or '.'} "
             f"--overwrite=True", local=True)
    if not isinstance(checkpoint, dict) or not set(NEEDED) <= checkpoint.keys():
        fail(f"{path} is a PyTorch file but not a checkpoint written by train.py", local=True)
    checkpoint["model_args"] = upgrade(checkpoint["model_args"])
    return checkpoint


def upgrade(model_args):
    """GPTConfig arguments saved by an earlier version, in today's names."""
    args = dict(model_args)
    if "chunked_loss" in args:  # True / False / "auto" before the loss path was decided at start-up
        args["loss_path"] = "chunked" if str(args.pop("chunked_loss")).lower() == "true" else "full"
    args.pop("compile_loss", None)  # now GPTConfig.compiled, which a loaded model is not
    return args


def load_model(out_dir, device="cpu", elsewhere="point --out_dir at the directory that holds ckpt.pt"):
    """(model, checkpoint): the trained model of out_dir in eval mode on device, and its checkpoint dict
    (settings, dataset meta, ...). The model runs eagerly, whatever the run that trained it did."""
    checkpoint = read(os.path.join(out_dir, CHECKPOINT), elsewhere)
    model = GPT(GPTConfig(**{**checkpoint["model_args"], "compiled": False}))
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


def save_training(path, model, optimizer, procs, device, **extra):
    """Write the training state to path (atomically). Every process calls it: each one's random state is
    gathered, and under FSDP every process helps gather the full state; process 0 writes."""
    rngs = distributed.gather_objects(procs, rng_state(device))
    sharded = any(hasattr(p, "device_mesh") for p in model.parameters())
    if not (procs.master or sharded):
        return
    sd, options = full_state_options()
    state = {"model": sd.get_model_state_dict(model, options=options),
             "optimizer": sd.get_optimizer_state_dict(model, optimizer, options=options), "rng": rngs, **extra}
    if procs.master:
        save(path, state)


def restore_training(checkpoint, model, optimizer, procs, device):
    """Load a checkpoint's model and optimizer state into this process's (possibly sharded) model and
    optimizer, and continue its random stream (dropout) where it stopped."""
    sd, options = full_state_options()
    sd.set_model_state_dict(model, checkpoint["model"], options=options)
    sd.set_optimizer_state_dict(model, optimizer, checkpoint["optimizer"], options=options)
    rng = checkpoint["rng"][procs.rank % len(checkpoint["rng"])]
    torch.set_rng_state(rng["cpu"])
    if device.startswith("cuda") and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
