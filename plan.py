"""
Whether a training run fits in a device's memory, found out before any memory is spent: one process's
model is built with fake tensors (shapes, no storage), one training micro-step runs on them, and what
it holds is counted: parameters, gradients, optimizer state, the activations autograd saves for
backward, and the logits of the loss path. Any train.py setting may follow, as train.py reads them.

    python plan.py config/gpt2_124m.py --gpu_memory_gb=80
    python plan.py config/gpt2_124m.py --gpu_memory_gb=24 --batch_size=4

It prints a table per GPU and a last line that says `fits` or `does not fit` with the peak in GiB and
what would fit instead; exit status 0 when it fits, 1 when not. train.py asks the same question at
start-up when a run is large enough for the answer to matter. No dataset is needed: the vocabulary
comes from the dataset's meta.pkl when it is prepared, else from --vocab_size.
"""

import math
import os
import sys
from contextlib import nullcontext

import torch

import settings
from data.common import dataset_dir, read_meta
from mile import FULL_BYTES_PER_LOGIT, choose_loss_path
from model import GPT, GPTConfig
from system import device_memory, fail

GiB = 2 ** 30
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, each the size of its parameter


def saved_for_backward(fn, skip):
    """(result of fn(), bytes of the distinct tensors autograd saved for backward while it ran, leaving out
    the storages in skip: the parameters, counted on their own). Works on fake tensors, which have sizes
    and no data."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            saved[storage._cdata] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(saved.values())


def measure(cfg, vocab_size, device_type="cuda", dtype="bfloat16", memory=None):
    """Bytes one process holds in a training micro-step of these settings, by what holds them, as a dict:
    parameters, gradients, optimizer, activations, logits and peak. The fake tensors live on the CPU;
    attention there saves what a GPU's flash attention saves (q, k, v, the output and the log-sum-exp)."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # imports the compiler: only when a plan is made
    n_rows = cfg.batch_size * cfg.block_size
    path, chunk = choose_loss_path(n_rows, vocab_size, device_type, cfg.loss_path, cfg.loss_chunk_size,
                                   budget_bytes=None if memory is None else memory // 4)
    args = {**settings.model_args(cfg, vocab_size), "loss_path": path, "loss_chunk_size": chunk}
    autocast = nullcontext() if dtype == "float32" else torch.autocast("cpu", dtype=getattr(torch, dtype))
    with FakeTensorMode():
        model = GPT(GPTConfig(**args))
        params = {p.untyped_storage()._cdata for p in model.parameters()}
        idx = torch.randint(0, vocab_size, (cfg.batch_size, cfg.block_size))
        with autocast:
            x, activations = saved_for_backward(lambda: model.hidden(idx), params)
            _, loss_saved = saved_for_backward(lambda: model.head_loss(x, idx), params)
    n_params = sum(p.numel() for p in model.parameters())
    weights = 4 * n_params  # float32
    # the loss path holds at once what it saves for backward and, while it computes, logits of its own:
    # the whole (N, V) on the full path, one chunk on the chunked path
    logits = loss_saved + (n_rows if path == "full" else chunk) * vocab_size * FULL_BYTES_PER_LOGIT // 4
    rows = {"parameters": weights, "gradients": weights, "optimizer": ADAMW_STATES * weights,
            "activations": activations, "logits": logits}
    rows["peak"] = sum(rows.values())
    return rows, path, chunk


def memory_warning(cfg, vocab_size, device, dtype, n_params, memory=None):
    """The line train.py prints before the first step when a run will need more memory than the device has
    (memory: the device's, by default), else None. The plan is made only when a quick lower bound reaches an
    eighth of the memory, so that small runs start without its second of work."""
    memory = memory or device_memory(device)
    rows_per_step = cfg.batch_size * cfg.block_size
    quick = 16 * n_params + 4 * rows_per_step * (8 * cfg.n_layer * cfg.n_embd + vocab_size)
    if quick < memory / 8:
        return None
    rows, _, _ = measure(cfg, vocab_size, device.split(":")[0], dtype, memory)
    if rows["peak"] <= memory:
        return None
    return (f"warning: this run will need about {rows['peak'] / GiB:.1f} GiB at its peak, more than the "
            f"{memory / GiB:.1f} GiB {'this GPU has' if device.startswith('cuda') else 'free on this machine'} "
            f"(python plan.py with the same settings shows why); {suggest(cfg, rows, memory)}")


def vocabulary(cfg, given=0):
    """The vocabulary size: given, or from the dataset's meta.pkl, or one sentence saying to give it."""
    if given:
        return given
    meta = os.path.join(dataset_dir(cfg.dataset), "meta.pkl")
    if not os.path.exists(meta):
        fail(f"dataset {cfg.dataset!r} is not prepared, so its vocabulary is unknown: give --vocab_size "
             f"(50257 for GPT-2's BPE)")
    try:
        return read_meta(meta)["vocab_size"]
    except ValueError as e:
        fail(str(e))


def table(rows, memory):
    """The plan as a Markdown table, GiB per process."""
    lines = ["| per process | GiB |", "|---|---|"]
    lines += [f"| {name} | {value / GiB:.2f} |" for name, value in rows.items()]
    lines.append(f"| memory of the device | {memory / GiB:.2f} |")
    return "\n".join(lines)


def main(argv):
    own = {"--gpu_memory_gb": 0.0, "--vocab_size": 0}  # plan.py's own flags; the rest are train.py's settings
    rest = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key in own:
            try:
                own[key] = type(own[key])(value)
            except ValueError:
                fail(f"{key} must be a number, not {value!r}")
            if own[key] < 0:
                fail(f"{key} must not be negative, not {value}")
        else:
            rest.append(arg)
    cfg, _ = settings.parse(rest, __doc__)
    settings.check(cfg)
    memory = int(own["--gpu_memory_gb"] * GiB) or None
    if memory is None:
        fail("give the memory of one GPU, as --gpu_memory_gb=80")
    dtype = "float32" if cfg.dtype == "float32" else "bfloat16"
    rows, path, chunk = measure(cfg, vocabulary(cfg, own["--vocab_size"]), "cuda", dtype, memory)
    print(f"{cfg.batch_size} x {cfg.block_size} tokens a micro-batch, {dtype}, loss path {path}"
          + (f" ({chunk} rows a chunk)" if path == "chunked" else ""))
    print(table(rows, memory))
    fits = rows["peak"] <= memory
    advice = "" if fits else "; " + suggest(cfg, rows, memory)
    print(f"{'fits' if fits else 'does not fit'}: {rows['peak'] / GiB:.1f} GiB at the peak of "
          f"{memory / GiB:.0f} GiB{advice}")
    return 0 if fits else 1


def suggest(cfg, rows, memory):
    """What would fit: a micro-batch small enough for the activations and logits left room for."""
    fixed = rows["parameters"] + rows["gradients"] + rows["optimizer"]
    per_sequence = (rows["activations"] + rows["logits"]) / cfg.batch_size
    batch = math.floor((memory - fixed) / per_sequence) if memory > fixed else 0
    if batch >= 1:
        return f"--batch_size={batch} would fit"
    return "the parameters, gradients and optimizer state alone do not fit: shard them over GPUs (--parallel=fsdp)"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
