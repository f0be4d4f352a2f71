"""
Module: torchrun's processes, imported by train.py, plan.py and checkpoint.py.

Several processes: torchrun starts one per device and sets RANK, LOCAL_RANK and WORLD_SIZE; a plain
`python train.py` is the same code as the only process. This module starts and ends the process
group, lets the processes wait for each other and agree, and spreads the model over them (FSDP2 or DDP).
"""

import os
import sys
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist

from model import GPT
from system import fail


class Processes(NamedTuple):
    rank: int  # this process among all of them
    local_rank: int  # this process among those of its machine
    world_size: int
    local_world_size: int
    cpu_group: object = None  # a gloo group for agreeing on stop requests without waiting on a GPU

    @property
    def distributed(self):
        return self.world_size > 1 or "RANK" in os.environ

    @property
    def master(self):
        """The one process that prints, logs and writes files other than checkpoint shards."""
        return self.rank == 0


def start(device):
    """Read torchrun's environment and, under torchrun, start the process group (NCCL on CUDA, gloo on
    the CPU). Returns the Processes and the device this process uses (under torchrun, GPU LOCAL_RANK)."""
    env = {k: int(os.environ.get(k, d)) for k, d in
           (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_WORLD_SIZE", 1))}
    if "RANK" not in os.environ:
        return Processes(0, 0, 1, 1), device
    cuda = device.startswith("cuda")
    if cuda and env["LOCAL_WORLD_SIZE"] > torch.cuda.device_count():
        count = torch.cuda.device_count()
        fail(f"{env['LOCAL_WORLD_SIZE']} processes on this machine, but it has {count} GPUs and each process takes "
             f"one; start torchrun with --nproc_per_node={count}, or train on the CPU with --device=cpu", local=True)
    if cuda:
        device = f"cuda:{env['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun's store, which outlives restarts:
        # after a restart (--max-restarts) the processes would find there the addresses of the attempt before
        # and fail to connect (PyTorch 2.13), so each attempt keeps its keys under a prefix of its own
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=env["RANK"],
                                world_size=env["WORLD_SIZE"])
    else:
        dist.init_process_group(backend)
    cpu_group = dist.new_group(backend="gloo") if cuda else None
    return Processes(env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], cpu_group), device


def group(procs):
    """The group of all processes under torchrun (what the loss's alpha is averaged over), None for one."""
    return dist.group.WORLD if procs.distributed else None


def barrier(procs):
    """Under torchrun, wait for every process; if one stopped at a check instead (it said why), stop too.
    Any other failure to reach the others is said, with the usual cause on several machines."""
    if procs.distributed:
        try:
            dist.barrier(group=procs.cpu_group)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if "closed by peer" not in first and "reset by peer" not in first:  # not a process that said why
                fail(f"process {procs.rank} cannot reach the other processes ({first}); on several machines, name "
                     f"the network interface they share with GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (ip addr "
                     f"lists them)", local=True)
            sys.exit(1)


def finish(procs):
    """Leave together: tearing down gloo while a peer is still saving can abort it."""
    if procs.distributed:
        dist.barrier()
        dist.destroy_process_group()


def mean(procs, x):
    """A per-process scalar tensor's mean over all processes, as a float (waits for the device)."""
    if procs.distributed:
        x = x.clone()
        dist.all_reduce(x)
        x /= procs.world_size
    return x.item()


def total(procs, x):
    """A CPU tensor summed over all processes (through the gloo group: NCCL takes GPU tensors only)."""
    if procs.distributed:
        x = x.clone()
        dist.all_reduce(x, group=procs.cpu_group)
    return x


def whole(x):
    """A tensor as a whole: under FSDP a value computed from shards (a DTensor, such as the gradients' norm) is
    gathered or summed over the processes; any other tensor is itself."""
    from torch.distributed.tensor import DTensor
    return x.full_tensor() if isinstance(x, DTensor) else x


def any_process(procs, flag):
    """Whether flag is True in any process: every process must stop after the same step. One process
    just reads its flag; several agree through a tiny all-reduce on the CPU."""
    if not procs.distributed:
        return flag
    flag = torch.tensor(int(flag))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=procs.cpu_group)
    return bool(flag)


def gather_objects(procs, obj):
    """[obj of process 0, obj of process 1, ...] in every process."""
    if not procs.distributed:
        return [obj]
    objs = [None] * procs.world_size
    dist.all_gather_object(objs, obj)
    return objs


def build(config, procs, parallel, device, seed, dtype, within=nullcontext()):
    """A new model of config (model.GPTConfig) on device, initialised from seed: built on the meta device
    (shapes, no memory), sharded under FSDP, then given memory, each process for its own shard alone, and
    initialised there (GPT.init_weights). No process ever holds the whole model unless it trains it whole.
    within: where the memory comes from (plan.py: a FakeTensorMode, which gives shapes and no memory)."""
    with torch.device("meta"):
        model = GPT(config)
    shard(model, procs, parallel, dtype)
    with within:
        model.to_empty(device=device)
        torch.manual_seed(seed)  # the same whole matrices drawn in every process
        model.init_weights()
    return model


def casts_weights(procs, parallel, dtype):
    """Whether FSDP casts the weights to bfloat16 as it gathers them (MixedPrecisionPolicy), in place of
    autocast, whose bfloat16 copy of each block's weights autograd would keep until backward."""
    return procs.distributed and parallel == "fsdp" and dtype == "bfloat16"


def shard(model, procs, parallel, dtype="float32"):
    """FSDP2 (parallel="fsdp" under torchrun): split each block's parameters, gradients and optimizer state
    across the processes, in place; a block's parameters are gathered only while it computes, and the
    root takes the embeddings and the head. In bfloat16 they are gathered as bfloat16 and the gradients
    reduced in float32. Before the optimizer is made: it must see the shards."""
    if not (procs.distributed and parallel == "fsdp"):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if casts_weights(procs, parallel, dtype) else MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=mixed)
    fully_shard(model, mp_policy=mixed)
    register_fsdp_forward_method(model, "token_stats")  # evaluation calls it: gather the parameters for it too


def compile(model, procs, parallel):
    """torch.compile for training. One process and DDP: the whole model, one graph. FSDP: each block's
    forward on its own (its activation checkpointing inside the graph), and the root's head with the full
    loss path's loss, as torchtitan does: FSDP's gathers and frees run between the graphs, as hooks around
    each block, where the whole model's graph would break at every one of them. After GPT.configure_run, whose
    loss path and activation checkpointing the graphs take in. Returns the module to call."""
    if not (procs.distributed and parallel == "fsdp"):
        return torch.compile(model)
    for block in model.transformer.h:
        block.forward = torch.compile(block.forward)  # the module keeps its name and FSDP's hooks stay outside
    if model.loss_path == "full":  # the chunked loss compiles its per-chunk math itself
        model.head_loss = torch.compile(model.head_loss)
    return model


def wrap(model, procs, parallel, device):
    """DDP (parallel="ddp" under torchrun): a whole copy of the model in each process, the gradients
    averaged in backward. Returns the module to call; its parameters stay model's."""
    if not (procs.distributed and parallel == "ddp"):
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[procs.local_rank] if device.startswith("cuda") else None,
               gradient_as_bucket_view=True)  # the gradients live in DDP's buckets: no second copy of them
