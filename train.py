"""
Train a GPT with cross-entropy, Focal or MiLe loss, nanoGPT-style: one script, read top to bottom.

On a laptop CPU, no arguments: prepares Shakespeare-char if it is missing, then trains a small
MiLe model for about two minutes:
    python train.py
Choose the objective, or any other setting below, with --key=value, after an optional config file:
    python train.py --loss=ce
    python train.py config/train_shakespeare_char.py --loss=focal --gamma=1
Continue a run from its last checkpoint (Ctrl-C saves one and prints this command):
    python train.py --out_dir=out --init_from=resume
On several devices, one process each, through torchrun (DDP; --parallel=fsdp shards the model):
    torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare.py --gradient_accumulation_steps=8
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
(gradient_accumulation_steps counts micro-batches over all processes: a multiple of their number)
"""

import difflib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from ast import literal_eval
from contextlib import nullcontext

# Ctrl-C before the training loop: there is nothing to save yet, so stop at once, without a traceback
signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"\ninterrupted before training began: nothing to save\n"),
                                         os._exit(130)))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data.common import dataset_dir, get_windows, read_meta, split_files, train_token_counts
from evaluate import BUCKETS, evaluate_buckets, frequency_buckets
from mile import LOSSES
from model import GPT, GPTConfig, load_checkpoint, peak_flops

try:
    import fcntl  # the out_dir lock
except ImportError:  # Windows: no lock
    fcntl = None

# -----------------------------------------------------------------------------
# default config: the laptop-CPU run on Shakespeare-char (figures in the README)
# I/O
out_dir = "out"
eval_interval = 250  # evaluate and save a checkpoint every this many iterations, and at the end
log_interval = 50
eval_iters = 25  # batches per split in an evaluation
eval_only = False  # evaluate once and exit
init_from = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt), or Hugging Face weights: gpt2[-medium|-large|-xl], or a directory
overwrite = False  # let a scratch run replace the checkpoint (and log) of an earlier run in out_dir
# data
dataset = "shakespeare_char"  # a folder in data/, or a path, holding meta.pkl and {train,val}.bin or {train,val}_*.bin shards
gradient_accumulation_steps = 1  # micro-batches per optimizer step
batch_size = 12  # sequences per micro-batch
block_size = 64  # context length
# model
arch = "gpt2"  # "gpt2", or "llama": the paper's block (RMSNorm, SwiGLU, rotary, untied, no biases)
n_layer = 4
n_head = 4
n_embd = 128
n_ffn = 0  # MLP hidden width; 0 means 4 * n_embd
dropout = 0.0
bias = False
# objective
loss = "mile"  # "ce", "focal" or "mile"
gamma = 1.0  # exponent of the Focal / MiLe weight; 1.0 in every run of the paper
sigma = 1.0  # MiLe: w = (sigma + H) ** gamma
# the path of the training loss (mile.choose_loss_path, docs/chunked.md): "auto" makes the (B, T, V) logits
# whole on a GPU when they fit (compiled with the model: the fastest) and walks them in chunks otherwise
# and on a CPU (faster there); True: always chunks (mile.chunked_loss, the least memory); False: never
chunked_loss = "auto"
loss_chunk_size = 0  # rows of logits per chunk; 0: per device, 512 on a CPU, 2048 on a GPU at GPT-2's vocabulary
compile_loss = False  # torch.compile the per-chunk loss math: much faster on a GPU, slow to start on a CPU
# AdamW
learning_rate = 3e-3  # 3x nanoGPT's CPU recipe: a tiny model takes a large step
max_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0  # clip gradients at this norm; 0 disables
# learning rate schedule: linear warm-up, then cosine decay to min_lr
decay_lr = True
warmup_iters = 100
lr_decay_iters = 2000  # usually max_iters
min_lr = 1e-4
# system
device = "auto"  # "auto" picks cuda, then mps, then cpu; or e.g. "cuda:1"
dtype = "auto"  # "auto" is bfloat16 on a CUDA GPU that has it, else float32; or float32|bfloat16|float16
compile = False  # torch.compile the model: faster steps after a slow first one
seed = 1337
parallel = "ddp"  # under torchrun: "ddp" (a model copy per process) or "fsdp" (FSDP2: parameters, gradients, optimizer state sharded)
peak_flops_per_s = 0.0  # the denominator of MFU; 0 looks the GPU up in model.PEAK_FLOPS
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]


def fail(message, local=False):
    """Stop with one sentence for the user, no traceback. Settings are checked alike in every process,
    so the first one alone speaks; a check of a machine's own files or GPUs (local=True) is told by
    that machine's first process (LOCAL_RANK 0), naming itself when it is not the first of all."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if rank == 0 or (local and local_rank == 0):
        where = f"process {rank} on {socket.gethostname()}: " if rank else ""
        print(f"error: {where}{message}", file=sys.stderr)
    sys.exit(1)


def barrier():
    """Under torchrun, wait for every process; if one stopped at a check instead (it said why), stop too."""
    try:
        dist.barrier(group=cpu_group)
    except Exception:  # gloo: "Connection closed by peer"
        sys.exit(1)


def set_config(key, value, source):
    """Set one config key, checking the key exists and the value has the default's type."""
    if key not in config_keys:
        close = difflib.get_close_matches(key, config_keys, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        fail(f"unknown setting {key!r} in {source}{hint}; the valid keys are: {', '.join(config_keys)}")
    default = globals()[key]
    if isinstance(default, bool):
        value = {"true": True, "false": False}.get(str(value).lower(), value)
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        fail(f"{key} in {source} must be of type {type(default).__name__} (like {default!r}), not {value!r}")
    globals()[key] = value


# an optional config file (python that assigns keys), then --key=value overrides, in order
explicit = set()  # the keys set here win over the ones a resumed checkpoint brings
for arg in sys.argv[1:]:
    if arg in ("-h", "--help"):
        print(__doc__ + "\nSettings (--key=value): " + ", ".join(f"{k}={globals()[k]!r}" for k in config_keys))
        sys.exit(0)
    if arg.startswith("--"):
        key, eq, text = arg[2:].partition("=")
        if not eq:
            fail(f"{arg} has no value; write --{key}=VALUE")
        try:
            value = literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word is a string
        if isinstance(globals().get(key), str):
            value = text
        set_config(key, value, arg)
        explicit.add(key)
    elif os.path.isfile(arg):
        settings = {}
        try:
            exec(open(arg).read(), {}, settings)
        except Exception as e:
            fail(f"config file {arg} does not run: {type(e).__name__}: {e}")
        for key, value in settings.items():
            if not key.startswith("_") and not callable(value) and not isinstance(value, type(sys)):
                set_config(key, value, arg)
                explicit.add(key)
    else:
        fail(f"{arg!r} is neither a --key=value setting nor a config file")

# a resumed run continues with its own settings, except those given above and those of this machine and command
MACHINE_KEYS = ("out_dir", "init_from", "overwrite", "device", "dtype", "compile", "compile_loss", "parallel",
                "peak_flops_per_s")
ckpt_path = os.path.join(out_dir, "ckpt.pt")
checkpoint = None
if init_from == "resume":
    try:
        checkpoint = load_checkpoint(ckpt_path, "point --out_dir at the directory that holds ckpt.pt")
    except SystemExit as e:  # every process reads it: its sentence, said once per machine
        fail(str(e.code).removeprefix("error: "), local=True)
    for key, value in checkpoint["config"].items():
        if key in config_keys and key not in explicit and key not in MACHINE_KEYS:
            globals()[key] = value
if loss not in LOSSES:
    fail(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
if arch not in ("gpt2", "llama"):
    fail(f"arch must be 'gpt2' or 'llama', not {arch!r}")
if gamma < 0:
    fail(f"gamma must not be negative, not {gamma}: it is the exponent of the loss weight (0 weighs every token "
         f"alike, the paper uses 1)")
if parallel not in ("ddp", "fsdp"):
    fail(f"parallel must be 'ddp' or 'fsdp', not {parallel!r}")
for key in ("eval_interval", "log_interval", "eval_iters", "batch_size", "block_size", "gradient_accumulation_steps",
            "n_layer", "n_head", "n_embd"):
    if globals()[key] < 1:
        fail(f"{key} must be at least 1, not {globals()[key]}")
if str(chunked_loss).lower() not in ("auto", "true", "false"):
    fail(f"chunked_loss must be auto, True or False, not {chunked_loss!r}")
if loss_chunk_size < 0:
    fail(f"loss_chunk_size must be at least 0 (0: per device), not {loss_chunk_size}")
if n_embd % n_head:
    fail(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
config = {k: globals()[k] for k in config_keys}

# -----------------------------------------------------------------------------
# system: processes, device, precision, seeds
# torchrun starts one process per device and sets RANK, LOCAL_RANK and WORLD_SIZE; a plain
# `python train.py` runs the same code as the only process
distributed = "RANK" in os.environ
rank, local_rank, world_size = (int(os.environ.get(k, "0")) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
world_size = max(world_size, 1)
master = rank == 0  # the one process that prints, logs and writes files
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
device_type = device.split(":")[0]
if device_type == "cuda" and not (torch.cuda.is_available() and torch.device(device).index in (None, *range(torch.cuda.device_count()))):
    fail(f"device {device} asked for, but this PyTorch sees no such CUDA GPU; use --device=cpu or --device=cuda")
if device_type == "mps" and not torch.backends.mps.is_available():
    fail("device mps asked for, but this PyTorch sees no Apple GPU; use --device=cpu")
if device_type not in ("cuda", "mps", "cpu"):
    fail(f"device must be auto, cpu, mps, cuda or cuda:N, not {device!r}")
if gradient_accumulation_steps % world_size:
    fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be a multiple of the number of "
         f"processes ({world_size}): each takes an equal share of the micro-batches of a step")
micro_steps = gradient_accumulation_steps // world_size  # this process's share of each optimizer step
local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # processes on this machine
if distributed and device_type == "cuda" and local_world_size > torch.cuda.device_count():
    fail(f"{local_world_size} processes on this machine, but it has {torch.cuda.device_count()} GPUs and each process "
         f"takes one; start torchrun with --nproc_per_node={torch.cuda.device_count()}, or train on the CPU with "
         f"--device=cpu", local=True)
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
if dtype not in ("float32", "bfloat16", "float16"):
    fail(f"dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
if dtype == "float16" and device_type == "cpu":
    fail("float16 on the CPU is emulated: a step of the default model takes about 20x as long as in float32 "
         "(1.55 s against 77 ms, one core of an AMD EPYC); use --dtype=float32, or bfloat16 on a CPU that has "
         "bfloat16 instructions (AMX, AVX512-BF16)")
cpu_group = None  # the default group, or beside NCCL a gloo one: it agrees on Ctrl-C without waiting on a GPU
if distributed:
    if device_type == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    cpu_group = dist.new_group(backend="gloo") if device_type == "cuda" else None
ptdtype = getattr(torch, dtype)
# autocast runs the matmuls in bf16/fp16 and keeps the weights and the loss math (mile.py) in float32
ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # fp16 needs loss scaling
torch.manual_seed(seed)  # the same initial weights in every process
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------
# data: uint16 token ids in data/<dataset>/: train.bin and val.bin, or shards train_*.bin and
# val_*.bin (data/fineweb/prepare.py), read through memmaps
data_dir = dataset_dir(dataset)
meta_path = os.path.join(data_dir, "meta.pkl")
AUTO_PREPARE = ("shakespeare_char", "shakespeare")  # small enough to prepare on the fly
if local_rank == 0:  # one process per machine prepares and checks the data: nodes need not share files
    if not os.path.exists(meta_path):
        prepare = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset, "prepare.py")
        if not os.path.exists(prepare):
            fail(f"no dataset {dataset!r}: {data_dir} has no meta.pkl; give a folder in data/ or a path that holds "
                 f"meta.pkl and the .bin files", local=True)
        if dataset not in AUTO_PREPARE:
            fail(f"dataset {dataset!r} is not prepared ({data_dir} has no meta.pkl): run python "
                 f"{os.path.relpath(prepare)} first (see its docstring)", local=True)
        print(f"dataset {dataset} is not prepared yet: running data/{dataset}/prepare.py")
        if subprocess.run([sys.executable, prepare]).returncode != 0 or not os.path.exists(meta_path):
            fail(f"data/{dataset}/prepare.py failed; see its message above, fix that, and run again", local=True)
    try:
        read_meta(meta_path)  # plain data only: a meta.pkl cannot run code
    except ValueError as e:
        fail(str(e), local=True)
    longest = {}  # tokens in the longest file of each split: a window never crosses files
    for split in ("train", "val"):
        for path in split_files(data_dir, split):
            if os.path.getsize(path) % 2:
                fail(f"{path} has {os.path.getsize(path)} bytes, not a whole number of 2-byte token ids, so it is "
                     f"truncated or no token file; prepare the dataset again", local=True)
        longest[split] = max((os.path.getsize(path) // 2 for path in split_files(data_dir, split)), default=0)
        if longest[split] < 2:
            fail(f"{data_dir} has no {split} split (no file of 2 or more tokens); prepare the dataset again",
                 local=True)
    split = min(longest, key=longest.get)
    if block_size >= longest[split]:
        fail(f"block_size {block_size} is too long for {data_dir}: a window of block_size + 1 tokens must fit in a "
             f"file of each split, and the longest {split} file holds {longest[split]}; use --block_size="
             f"{longest[split] - 1} or less", local=True)
if distributed:
    barrier()  # the others wait for that; if it failed, they stop too
meta = read_meta(meta_path)
# the frequency bucket of every token id (high / medium / low, from the training split's counts)
bucket_of = torch.from_numpy(frequency_buckets(train_token_counts(data_dir, meta))).to(device)


def get_batch(split, step, micro_step):
    """Inputs and targets, (batch_size, block_size) each: windows drawn as a pure function of (seed,
    split, step, micro_step) (data/common.py), so a resumed run sees exactly the batches an uninterrupted
    one would have seen, whatever the number of processes: process r takes micro-steps r * micro_steps ...
    of each step. step=None draws the fixed evaluation batches."""
    w = torch.from_numpy(get_windows(data_dir, split, seed, step, micro_step, batch_size, block_size))
    x, y = w[:, :-1], w[:, 1:]
    if device_type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------
# out_dir: made only now that the settings and the data have passed their checks, and held by one run
# at a time through an advisory lock on out_dir/.lock, which the OS drops when the process ends, however
# it ends
def command_line():
    """The command that started this run, as a list: python's, or under torchrun torchrun's (the parent)."""
    parent = f"/proc/{os.getppid()}/cmdline"
    if "TORCHELASTIC_RUN_ID" in os.environ and os.path.exists(parent):
        with open(parent) as f:
            return f.read().split("\0")[:-1]
    return sys.orig_argv


if master:
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, ".lock"), "a+")  # open, so locked, until the process ends
    if fcntl:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            fail(f"{out_dir} is in use by another run ({lock.read().strip() or 'just starting'}); wait for it to end "
                 f"or stop it, or train into another --out_dir")
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
               f"{shlex.join(command_line())}\n")
    lock.flush()
    if init_from != "resume" and os.path.exists(ckpt_path) and not overwrite:
        fail(f"{out_dir} already holds a checkpoint of an earlier run; continue it with --init_from=resume, train into "
             f"another --out_dir, or start afresh over it with --overwrite=True")
if distributed:
    barrier()  # the others wait; if the first process stopped here, they stop too

# -----------------------------------------------------------------------------
# model and optimizer
model_args = dict(arch=arch, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_ffn=n_ffn, block_size=block_size,
                  bias=bias, vocab_size=meta["vocab_size"], dropout=dropout, loss=loss, gamma=gamma, sigma=sigma,
                  chunked_loss=chunked_loss, loss_chunk_size=loss_chunk_size, compile_loss=compile_loss)
iter_num, best_val_loss = 0, float("inf")
if checkpoint is not None:
    shape_keys = ("arch", "n_layer", "n_head", "n_embd", "n_ffn", "block_size", "bias", "vocab_size")
    for key in shape_keys:
        if model_args[key] != checkpoint["model_args"][key]:
            fail(f"{key}={model_args[key]} differs from the checkpoint's {checkpoint['model_args'][key]}; "
                 f"a resumed run keeps the shape it was saved with")
    iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
    model_args = {**checkpoint["model_args"], **model_args}  # and what train.py has no setting for (rope_theta, ...)
    if master:
        print(f"resuming from {ckpt_path} at iteration {iter_num}")
if init_from in ("scratch", "resume"):
    model = GPT(GPTConfig(**model_args))
else:  # pretrained weights through transformers (requirements-hf.txt): the shape is theirs, the rest ours
    from export import vocabulary
    shape_keys = ("arch", "n_layer", "n_head", "n_embd", "n_ffn", "bias")
    given = {k: v for k, v in model_args.items() if k not in shape_keys or k in explicit}  # shape: only if asked for
    model = GPT.from_pretrained(init_from, vocabulary(meta), **given)
    model_args = {k: getattr(model.config, k) for k in GPTConfig.__dataclass_fields__}
    config.update({k: model_args[k] for k in shape_keys})  # the checkpoint's config tells the true shape
    if master:
        print(f"starting from the weights of {init_from}")
model = model.to(device)
raw_model = model  # the module whose state we save and load: plain, or sharded in place by FSDP
torch.manual_seed(seed + rank)  # but dropout differs between processes (the data is drawn apart)
if distributed and parallel == "fsdp":
    # FSDP2: each block's parameters, gradients and optimizer state are split across the processes
    # and gathered only while that block computes; the root takes the embeddings and the head
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    register_fsdp_forward_method(model, "token_stats")  # evaluation calls it: gather parameters for it too
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
# (imported here, not at the top: it takes most of a second, which a command stopped by a bad setting
# above should not wait for)
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
# full (unsharded) state dicts keyed by parameter name: a checkpoint saved by N processes, DDP or
# FSDP, loads in M processes or in one (sample.py)
full_state = StateDictOptions(full_state_dict=True, cpu_offload=True)
if checkpoint is not None:
    set_model_state_dict(raw_model, checkpoint["model"], options=full_state)
    set_optimizer_state_dict(raw_model, optimizer, checkpoint["optimizer"], options=full_state)
    rng = checkpoint["rng"][rank % len(checkpoint["rng"])]  # dropout draws continue where they stopped
    torch.set_rng_state(rng["cpu"])
    if device_type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    checkpoint = None  # free the memory
if compile:
    if master:
        print("compiling the model (the first iterations are slow)")
    model = torch.compile(model)
if distributed and parallel == "ddp":
    model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
if master:
    print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, objective {loss}"
          + (f" (gamma {gamma}" + (f", sigma {sigma})" if loss == "mile" else ")") if loss != "ce" else "")
          + f", on {world_size} x {device_type} ({parallel if distributed else 'one process'}) in {dtype}")

# MFU: achieved FLOP/s over the device's peak, when we know the peak
tokens_per_iter = gradient_accumulation_steps * batch_size * block_size  # over all processes
peak = peak_flops_per_s or (peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None)
peak = peak * world_size if peak else None


@torch.no_grad()
def estimate_loss():
    """On eval_iters fixed batches of each split: the training objective, and plain cross-entropy
    (what makes CE, Focal and MiLe runs comparable) overall and per frequency bucket, with the mean
    entropy of the predictions (evaluate.py)."""
    out = {}
    model.eval()
    for split in ("train", "val"):
        batches = [get_batch(split, None, k) for k in range(eval_iters)]  # the same batches every time
        with ctx:
            stats = evaluate_buckets(raw_model, batches, bucket_of)
            objective = stats["ce"] if loss == "ce" else sum(model(X, Y)[1].item() for X, Y in batches) / eval_iters
        out[split] = (objective, stats)
    model.train()
    return out


def get_lr(it):
    """Linear warm-up for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def save_checkpoint():
    """Write ckpt.pt atomically: a temporary file, flushed to disk, then renamed over the old one,
    so a kill at any moment leaves the last good checkpoint intact."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device_type == "cuda" else None}
    rngs = [None] * world_size
    if distributed:
        dist.all_gather_object(rngs, rng)  # every process's dropout stream
    else:
        rngs = [rng]
    if not (master or parallel == "fsdp"):
        return  # with DDP the first process holds everything; with FSDP every process helps gather it
    state = {
        "model": get_model_state_dict(raw_model, options=full_state),
        "optimizer": get_optimizer_state_dict(raw_model, optimizer, options=full_state),
        "model_args": model_args, "meta": meta, "config": config, "iter_num": iter_num,
        "best_val_loss": best_val_loss, "rng": rngs,
    }
    if master:
        tmp = ckpt_path + ".tmp"
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, ckpt_path)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            fd = os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)


def mean_over_processes(x):
    """A per-process scalar tensor's mean over all processes, as a float (waits for the device)."""
    if distributed:
        x = x.clone()
        dist.all_reduce(x)
        x /= world_size
    return x.item()


def log(record):
    """One JSON object per line in out_dir/log.jsonl."""
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


# Ctrl-C: the first asks to save after the step under way and stop, the second stops at once. The flag
# is read between steps, so a checkpoint always holds a completed step.
stop = False


def on_ctrl_c(signum, frame):
    global stop
    if stop:
        os.write(2, b"\ninterrupted again: stopping at once; the last checkpoint is kept as it was\n")
        os._exit(130)
    stop = True
    if master:
        os.write(2, b"\ninterrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)\n")


def interrupted():
    """Whether Ctrl-C reached this process or, under torchrun, any process: all must stop after the same
    step. One process just reads its flag; several agree through a tiny all-reduce on the CPU each step."""
    if not distributed:
        return stop
    flag = torch.tensor(int(stop))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=cpu_group)
    return bool(flag)


# -----------------------------------------------------------------------------
# training loop: every process trains and evaluates (on the same evaluation batches); the first
# process alone prints, logs and writes the checkpoint
if master:
    if init_from != "resume":  # a new run: a new log, and no checkpoint of an earlier one (--overwrite)
        for name in ("ckpt.pt", "log.jsonl"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
first_iter = last_saved = iter_num  # a resumed run does not save again the state it started from
progress = tqdm(total=max_iters, initial=iter_num, unit="it", dynamic_ncols=True, disable=None if master else True)
t_start = t_last = time.time()
iters_since_log, val_ce, stopping = 0, float("nan"), False
signal.signal(signal.SIGINT, on_ctrl_c)
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group["lr"] = lr

    # evaluate, then save: the checkpoint is the latest good state (never a NaN one)
    if iter_num % eval_interval == 0 or iter_num == max_iters or eval_only:
        t_eval = time.time()
        losses = estimate_loss()
        (train_obj, train_stats), (val_obj, val) = losses["train"], losses["val"]
        val_ce = val["ce"]
        if not all(math.isfinite(v) for v in (train_obj, val_obj, val_ce)):
            fail(f"the loss became {val_obj} at iteration {iter_num}; the last good checkpoint {ckpt_path} is "
                 f"kept: lower learning_rate (now {learning_rate}) or raise warmup_iters and resume or restart")
        if master:
            objective = "" if loss == "ce" else f"train {loss} {train_obj:.4f}, "
            progress.write(f"iter {iter_num}: {objective}train ce {train_stats['ce']:.4f}, "
                           f"val ce {val_ce:.4f} (ppl {val['ppl']:.2f}); val ce by frequency: "
                           + ", ".join(f"{b} {val['ce_' + b]:.3f}" for b in BUCKETS) + f"; entropy {val['entropy']:.3f}")
            log({"iter": iter_num, "train_loss": train_obj, "train_ce": train_stats["ce"], "val_loss": val_ce,
                 "val_objective": val_obj, "lr": lr, **{f"val_{k}": v for k, v in val.items()}})
        best_val_loss = min(best_val_loss, val_ce)
        if eval_only:
            break
        if iter_num > first_iter:
            save_checkpoint()
            last_saved = iter_num
        t_last += time.time() - t_eval  # evaluation and saving do not count against tokens/s
    if iter_num >= max_iters:
        break
    if interrupted():
        stopping = True
        break

    # one optimizer step over gradient_accumulation_steps micro-batches, micro_steps in each process
    train_loss = torch.zeros((), device=device)
    for micro_step in range(micro_steps):
        last = micro_step == micro_steps - 1  # the gradients are averaged across processes only then
        X, Y = get_batch("train", iter_num, rank * micro_steps + micro_step)
        if distributed and parallel == "fsdp":
            model.set_requires_gradient_sync(last)
        with model.no_sync() if distributed and parallel == "ddp" and not last else nullcontext():
            with ctx:
                _, batch_loss = model(X, Y)
                batch_loss = batch_loss / micro_steps  # the step sees the mean over micro-batches
            scaler.scale(batch_loss).backward()
        train_loss += batch_loss.detach()
    if grad_clip > 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    iters_since_log += 1
    progress.update(1)

    if iter_num % log_interval == 0:
        lossf = mean_over_processes(train_loss)  # over all the step's micro-batches; waits for the GPU: only here
        if not math.isfinite(lossf):
            fail(f"the training loss became {lossf} at iteration {iter_num}; the last good checkpoint "
                 f"{ckpt_path} is kept: lower learning_rate (now {learning_rate}) or raise warmup_iters")
        dt = (time.time() - t_last) / iters_since_log
        tokens_per_s = tokens_per_iter / dt
        mfu = raw_model.flops_per_token() * tokens_per_s / peak if peak else None
        if master:
            progress.write(f"iter {iter_num}: {loss} {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f} ms/it, "
                           f"{tokens_per_s:,.0f} tok/s, MFU " + (f"{mfu * 100:.1f}%" if mfu else "n/a"))
            log({"iter": iter_num, "train_loss": lossf, "lr": lr, "tokens_per_s": tokens_per_s, "mfu": mfu})
        t_last, iters_since_log = time.time(), 0
progress.close()
if stopping:  # Ctrl-C: save the last completed step (unless it is saved, or its loss went bad), say how to go on
    if iter_num > last_saved:
        lossf = mean_over_processes(train_loss)
        if not math.isfinite(lossf):
            fail(f"interrupted with the training loss at {lossf} (iteration {iter_num}), so nothing saved; the "
                 f"last good checkpoint {ckpt_path} is kept: lower learning_rate (now {learning_rate}) or raise "
                 f"warmup_iters")
        save_checkpoint()
    resume = [arg for arg in command_line() if not arg.startswith(("--init_from=", "--overwrite="))]
    if master and (iter_num > first_iter or init_from == "resume"):
        print(f"interrupted at iteration {iter_num}: checkpoint in {ckpt_path}; resume with: "
              f"{shlex.join(resume + ['--init_from=resume'])}")
    elif master:
        print("interrupted before the first step: nothing to save")
elif master and not eval_only:
    saved = f"checkpoint in {ckpt_path}" if iter_num > first_iter else "no step taken, so no checkpoint written"
    print(f"done: {iter_num} iterations, val ce {val_ce:.4f}, {time.time() - t_start:.0f} s; {saved}")
if distributed:
    dist.barrier()  # leave together: tearing down gloo while a peer is still saving can abort it
    dist.destroy_process_group()
if stopping:
    sys.exit(130)
