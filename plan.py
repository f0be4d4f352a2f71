"""
Command: python plan.py [config/NAME.py] [--gpu_memory_gb=G] [--key=value ...]; also a module train.py imports.

Whether a training run fits in a GPU's memory, found out before any memory is spent: one process's
model is built with train.py's own code (meta device, FSDP sharding under a fake process group of the
run's size) as fake tensors (shapes, no storage), one training micro-step runs on them, and what the
process holds is counted: parameters, gradients, optimizer state, the activations autograd saves for
backward, the logits of the loss path, and under FSDP the weights and gradients gathered for a
moment. Any train.py setting may follow, as train.py reads them.

    python plan.py config/paper_7b.py --nnodes=2 --nproc_per_node=8 --gpu_memory_gb=80
    python plan.py config/gpt2_124m.py --gpu_memory_gb=24 --batch_size=4

It prints a table per GPU and a last line that says `fits` or `does not fit` with the peak in GiB and
what would fit instead; exit status 0 when it fits, 1 when not. train.py asks the same question at
start-up when a run is large enough for the answer to matter. No dataset is needed: the vocabulary
comes from the dataset's meta.pkl when it is prepared, else from --vocab_size.
"""

import dataclasses
import math
import os
import sys
from contextlib import nullcontext

import torch

import distributed
import settings
from data.common import dataset_dir, read_meta
from mile import choose_loss_path
from model import GPTConfig
from system import device_memory, fail

GiB = 2 ** 30
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, each the size of its parameter
LOGIT_BYTES = 4  # float32
MAX_REPLANS = 6  # smaller batches tried before a suggestion is given up: a plan stays seconds


def processes(world_size, parallel):
    """The processes a plan is made for: under FSDP, this one as process 0 of a fake process group of
    world_size (collectives that send nothing), so that sharding is train.py's own; else one process (DDP
    keeps a whole copy in every process, so one process tells its memory)."""
    if world_size == 1 or parallel != "fsdp":
        return distributed.Processes(0, 0, 1, 1)
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    return distributed.Processes(0, 0, world_size, min(world_size, 8))


def measure(cfg, vocab_size, device_type="cuda", dtype="bfloat16", memory=None, world_size=1):
    """Bytes one of world_size processes holds in a training micro-step of these settings, by what holds
    them, as a dict: parameters, gradients, optimizer, activations, logits, gathered and peak. The model is
    train.py's (distributed.build, sharded under FSDP) on fake tensors, which live on the CPU; attention
    there saves what a GPU's flash attention saves (q, k, v, the output and the log-sum-exp)."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # imports the compiler: only when a plan is made
    n_rows = cfg.batch_size * cfg.block_size
    path, chunk = choose_loss_path(n_rows, vocab_size, device_type, cfg.loss_path, cfg.loss_chunk_size,
                                   budget_bytes=None if memory is None else memory // 4, compiled=cfg.compile)
    args = settings.model_args(cfg, vocab_size)
    procs = processes(world_size, cfg.parallel)
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # the meta model becomes fake tensors in it
    model = distributed.build(GPTConfig(**args), procs, cfg.parallel, "cpu", cfg.seed, dtype, within=fake)
    model.configure_run(path, chunk, activation_checkpointing=cfg.activation_checkpointing == "full")  # as train.py
    casts = distributed.casts_weights(procs, cfg.parallel, dtype)  # FSDP gathers bf16 weights: no autocast
    autocast = nullcontext() if dtype == "float32" or casts else torch.autocast("cpu", dtype=getattr(torch, dtype))
    own = [p.to_local() if hasattr(p, "device_mesh") else p for p in model.parameters()]  # this process's shards
    weights = 4 * sum(t.numel() for t in own)  # float32
    saved, phase = {"activations": {}, "logits": {}}, ["activations"]  # the blocks', then the loss path's

    def pack(t):
        saved[phase[0]][t.untyped_storage()._cdata] = t.untyped_storage()
        return t
    with fake:
        idx = torch.randint(0, vocab_size, (cfg.batch_size, cfg.block_size))
        after_blocks = model.transformer.ln_f.register_forward_hook(lambda *_: phase.__setitem__(0, "logits"))
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx)
            after_blocks.remove()
            if cfg.activation_checkpointing == "full":  # backward recomputes one block at a time: it holds one's
                phase[0] = "recomputed"
                saved["recomputed"] = {}
                model.transformer.h[0](torch.randn(cfg.batch_size, cfg.block_size, cfg.n_embd, requires_grad=True))
    # what autograd still holds once the forward is done, less the parameters (counted on their own, and
    # the root's gathered ones as `gathered`): FSDP has freed each block's gathered weights by then (a
    # storage of 0 bytes), while autocast's copies are kept
    held = {t.untyped_storage()._cdata for t in own} | {p.untyped_storage()._cdata for p in model.parameters()}
    kept = {kind: sum(s.nbytes() for key, s in found.items() if key not in held) for kind, found in saved.items()}
    # the loss path holds at once what it saves for backward and, while it computes, float32 logits of its
    # own: the whole (N, V) on the full path, one chunk on the chunked path. (Counted as the eager loss saves;
    # compiled, the full path holds less: mile.FULL_BYTES_PER_LOGIT)
    logits = kept["logits"] + (n_rows if path == "full" else chunk) * vocab_size * LOGIT_BYTES
    rows = {"parameters": weights, "gradients": weights, "optimizer": ADAMW_STATES * weights,
            "activations": kept["activations"] + kept.get("recomputed", 0), "logits": logits, "gathered": gathered(model, procs, cfg, casts)}
    rows["peak"] = sum(rows.values())
    return rows, path, chunk


def gathered(model, procs, cfg, casts):
    """Under FSDP, the whole weights and gradients a process holds for a moment: the root's weights (the
    embeddings and the head, gathered for the whole step), two blocks' weights (the one computing and the
    next, gathered ahead) and one block's gradients before they are reduce-scattered, cast to float32."""
    if not (procs.distributed and cfg.parallel == "fsdp"):
        return 0
    size = 2 if casts else 4  # bytes of a gathered weight
    root = sum(p.numel() for p in {id(p): p for p in (*model.transformer.wte.parameters(), *model.lm_head.parameters(),
                                                      *model.transformer.ln_f.parameters())}.values())
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    return root * size + 2 * block * size + block * (size + 4)


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
            f"(python plan.py with the same settings shows why); {suggest(cfg, vocab_size, dtype, memory, 1, rows)}")


GPT2_DATASETS = {"fineweb", "shakespeare"}  # data/<name>/prepare.py tokenizes them with GPT-2's BPE


def vocabulary(cfg, given=0):
    """The vocabulary size: given, or from the dataset's meta.pkl, or for a dataset that data/ prepares with
    GPT-2's BPE and has not yet, that tokenizer's 50257; else one sentence saying to give it."""
    if given:
        return given
    meta = os.path.join(dataset_dir(cfg.dataset), "meta.pkl")
    if not os.path.exists(meta) and cfg.dataset in GPT2_DATASETS:
        return 50257
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
    own = {"--gpu_memory_gb": 0.0, "--vocab_size": 0, "--nnodes": 1, "--nproc_per_node": 1}  # plan.py's own flags
    rest = []  # train.py's settings
    for arg in argv:
        key, eq, value = arg.partition("=")
        if key in own:
            kind = type(own[key])
            try:
                own[key] = kind(value)
            except ValueError:
                fail(f"{key} must be {'a whole number' if kind is int else 'a number'}, not {value!r}")
            if own[key] < (1 if kind is int and key != "--vocab_size" else 0):
                fail(f"{key} must be {'at least 1' if key.startswith('--n') else 'positive'}, not {value}")
        else:
            rest.append(arg)
    cfg, _ = settings.parse(rest, __doc__)
    settings.check(cfg)
    memory = int(own["--gpu_memory_gb"] * GiB) or None
    if memory is None:
        fail("give the memory of one GPU, as --gpu_memory_gb=80")
    world = own["--nnodes"] * own["--nproc_per_node"]
    if cfg.gradient_accumulation_steps % world:
        fail(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of the number of "
             f"GPUs ({world}), as train.py requires: each takes an equal share of the micro-batches of a step")
    dtype = "float32" if cfg.dtype == "float32" else "bfloat16"
    vocab_size = vocabulary(cfg, own["--vocab_size"])
    rows, path, chunk = measure(cfg, vocab_size, "cuda", dtype, memory, world)
    print(f"{world} GPU{'s, ' + cfg.parallel if world > 1 else ''}; {cfg.batch_size} x {cfg.block_size} tokens a "
          f"micro-batch, {dtype}, activation checkpointing {cfg.activation_checkpointing}, loss path {path}"
          + (f" ({chunk} rows a chunk)" if path == "chunked" else ""))
    print(table(rows, memory))
    fits = rows["peak"] <= memory
    advice = "" if fits else "; " + suggest(cfg, vocab_size, dtype, memory, world, rows)
    print(f"{'fits' if fits else 'does not fit'}: {rows['peak'] / GiB:.1f} GiB at the peak of "
          f"{memory / GiB:.3g} GiB{advice}")
    return 0 if fits else 1


def suggest(cfg, vocab_size, dtype, memory, world_size, rows):
    """What would fit, each measured: on several GPUs, sharding over them (FSDP); then a smaller micro-batch
    (train.py keeps the sequences a step), or recomputing the activations in backward."""
    def flags(changes):
        return " ".join(f"--{k}={v}" for k, v in changes.items())

    base = {}
    if world_size > 1 and cfg.parallel != "fsdp":
        base = {"parallel": "fsdp"}
        rows = measure(dataclasses.replace(cfg, **base), vocab_size, "cuda", dtype, memory, world_size)[0]
        if rows["peak"] <= memory:
            return f"{flags(base)} would fit ({rows['peak'] / GiB:.1f} GiB): it shards what DDP copies into every GPU"
    options = []
    batch = largest_batch(dataclasses.replace(cfg, **base), rows, memory, world_size, vocab_size, dtype)
    if batch:
        options.append(flags({**base, "batch_size": batch}))
    if cfg.activation_checkpointing == "none":
        recompute = dataclasses.replace(cfg, **base, activation_checkpointing="full")
        recomputed = measure(recompute, vocab_size, "cuda", dtype, memory, world_size)[0]
        batch = recompute.batch_size if recomputed["peak"] <= memory else \
            largest_batch(recompute, recomputed, memory, world_size, vocab_size, dtype)
        if batch:
            options.append(flags({**base, "activation_checkpointing": "full"}) +
                           (f" --batch_size={batch}" if batch != cfg.batch_size else ""))
    if options:
        return " or ".join(options) + " would fit"
    if world_size > 1 or cfg.parallel == "fsdp":
        return "not even one sequence a micro-batch fits: more GPUs would, as FSDP shards the state over them"
    return "not even one sequence a micro-batch fits: several GPUs would, under torchrun with --parallel=fsdp"


def largest_batch(cfg, rows, memory, world_size, vocab_size, dtype):
    """The largest micro-batch below cfg.batch_size that keeps the sequences a step (a divisor) and fits when
    planned again; 0 when none does. The first candidate comes from the activations and logits taken to grow
    with the batch; each is then measured, as the loss path (full or chunked) may change with the batch."""
    fixed = rows["peak"] - rows["activations"] - rows["logits"]
    per_sequence = (rows["activations"] + rows["logits"]) / cfg.batch_size
    sequences = cfg.batch_size * cfg.gradient_accumulation_steps
    fitting = math.floor((memory - fixed) / per_sequence) if memory > fixed else 0
    candidates = [b for b in range(min(fitting, cfg.batch_size - 1), 0, -1)
                  if sequences % b == 0 and (sequences // b) % world_size == 0]
    for b in candidates[:MAX_REPLANS]:
        trial = dataclasses.replace(cfg, batch_size=b, gradient_accumulation_steps=sequences // b)
        if measure(trial, vocab_size, "cuda", dtype, memory, world_size)[0]["peak"] <= memory:
            return b
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
