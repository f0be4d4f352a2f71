"""
Command: python train.py [config/NAME.py] [--key=value ...], or the same under torchrun.

Train a GPT with cross-entropy, Focal or MiLe loss, nanoGPT-style: one script, read top to bottom.

On a laptop CPU, no arguments: prepares Shakespeare-char if it is missing, then trains a small
MiLe model for about two minutes:
    python train.py
Choose the loss, or any other setting of settings.py, with --key=value, after an optional config file:
    python train.py --loss=ce
    python train.py config/train_shakespeare_char.py --loss=focal --gamma=1
Continue a run from its last checkpoint (Ctrl-C or SIGTERM saves one and prints this command):
    python train.py --out_dir=out --init_from=resume
or, the same command whether or not there is one to continue (torchrun --max-restarts, requeued jobs):
    python train.py --out_dir=out --init_from=auto
On several devices, one process each, through torchrun (DDP; --parallel=fsdp shards the model):
    torchrun --standalone --nproc_per_node=8 train.py config/train_shakespeare.py --gradient_accumulation_steps=8
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...
(gradient_accumulation_steps counts micro-batches over all processes: a multiple of their number)
"""

import dataclasses
import itertools
import json
import math
import os
import shlex
import signal
import sys
import time
from contextlib import nullcontext

# Ctrl-C while torch loads, before anything is worth saving: stop at once, without a traceback
signal.signal(signal.SIGINT, lambda *_: (os.write(2, b"\ninterrupted before training began: nothing to save\n"),
                                         os._exit(130)))

import torch
from tqdm import tqdm

import checkpoint
import distributed
import runlog
import settings
from data.common import check_dataset, dataset_dir, get_windows, prepare_if_missing, read_meta, train_token_counts
from buckets import BUCKETS, bucket_stats, bucket_sums, frequency_buckets
from mile import FULL_BYTES_PER_LOGIT, choose_loss_path
from model import GPTConfig
from plan import memory_warning
from system import StopSignals, autocast, fail, peak_flops, resolve_device, resolve_dtype

# -----------------------------------------------------------------------------
# settings: the defaults of settings.py, then a config file, then --key=value flags (-h lists them); a
# resumed run continues with the settings it was saved with, except those given here
cfg, explicit = settings.parse(sys.argv[1:], __doc__)
if cfg.init_from == "auto":  # resume if out_dir holds a checkpoint, else start from scratch
    cfg.init_from = "resume" if os.path.isdir(cfg.out_dir) and checkpoint.find(cfg.out_dir) else "scratch"
resumed = checkpoint.read(cfg.out_dir) if cfg.init_from == "resume" else None  # its newest checkpoint
if resumed:
    cfg = settings.resumed(cfg, resumed["config"], explicit)
settings.check(cfg)
runlog.need_wandb(cfg)  # --wandb_log=True without wandb: one sentence, before any work

# -----------------------------------------------------------------------------
# system: processes, device, precision, seeds
stop = StopSignals()  # Ctrl-C and SIGTERM: stop at once until training begins, then after the step under way
procs, device = distributed.start(resolve_device(cfg.device))
device_type = device.split(":")[0]  # cuda, mps or cpu
dtype = resolve_dtype(cfg.dtype, device)
settings.split_over_processes(cfg, procs.world_size)
micro_steps = cfg.gradient_accumulation_steps // procs.world_size  # this process's share of each optimizer step
# bf16 / fp16 matmuls on a GPU, the loss math in float32 (mile.py); FSDP casts the weights itself in bf16
ctx = nullcontext() if distributed.casts_weights(procs, cfg.parallel, dtype) else autocast(device, dtype)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # fp16 needs loss scaling
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

# -----------------------------------------------------------------------------
# data: uint16 token ids in data/<dataset>/, train.bin and val.bin or shards train_*.bin and val_*.bin
data_dir = dataset_dir(cfg.dataset)
if procs.local_rank == 0:  # one process per machine prepares and checks the data: nodes need not share files
    try:
        prepare_if_missing(cfg.dataset)
        check_dataset(data_dir, cfg.block_size)
    except ValueError as e:
        fail(str(e), local=True)
distributed.barrier(procs)  # the others wait for that; if it failed, they stop too
meta = read_meta(os.path.join(data_dir, "meta.pkl"))
bucket_of = torch.from_numpy(frequency_buckets(train_token_counts(data_dir, meta))).to(device)  # high/medium/low


def get_batch(split, step, micro_step):
    """Inputs and targets, (batch_size, block_size) each: windows drawn as a pure function of (seed,
    split, step, micro_step) (data/common.py), so a resumed run sees exactly the batches an uninterrupted
    one would have seen, whatever the number of processes. step=None draws the fixed evaluation batches."""
    w = torch.from_numpy(get_windows(data_dir, split, cfg.seed, step, micro_step, cfg.batch_size, cfg.block_size))
    if device_type == "cuda":  # pinned memory lets the copy overlap with compute
        w = w.pin_memory().to(device, non_blocking=True)
    w = w.to(device)
    return w[:, :-1], w[:, 1:]


# -----------------------------------------------------------------------------
# out_dir: made only now that the settings and the data have passed their checks, and held by one run
# at a time (docs/checkpoints.md)
if procs.master:
    lock = checkpoint.lock(cfg.out_dir)  # held until this process ends
    if cfg.init_from != "resume" and not cfg.overwrite and checkpoint.find(cfg.out_dir):
        fail(f"{cfg.out_dir} already holds a checkpoint of an earlier run; continue it with --init_from=resume, train "
             f"into another --out_dir, or start afresh over it with --overwrite=True")
distributed.barrier(procs)
checkpoint.check_shared(cfg.out_dir, procs)  # on several machines, all of them must see this out_dir

# -----------------------------------------------------------------------------
# model and optimizer
loss_path, chunk_size = choose_loss_path(cfg.batch_size * cfg.block_size, meta["vocab_size"], device,
                                         cfg.loss_path, cfg.loss_chunk_size, compiled=cfg.compile)  # once, here
model_args = settings.model_args(cfg, meta["vocab_size"])  # what the model is, saved with it
iter_num, wandb_id = 0, None
if resumed:
    model_args["padded_vocab_size"] = resumed["model_args"].get("padded_vocab_size", 0)  # as it was made
    for key in settings.SHAPE_KEYS:
        if model_args[key] != resumed["model_args"][key]:
            fail(f"{key}={model_args[key]} differs from the checkpoint's {resumed['model_args'][key]}; a resumed "
                 f"run keeps the shape it was saved with")
    model_args = {**resumed["model_args"], **model_args}  # and what settings have no key for (rope_theta, ...)
    iter_num, wandb_id = resumed["iter_num"], resumed.get("wandb_run_id")  # and the W&B run it continues
    if procs.master:
        print(f"resuming from {resumed.get('sharded') or checkpoint.find(cfg.out_dir)} at iteration {iter_num}, "
              + settings.resumed_line(cfg, resumed["config"], explicit))
if cfg.init_from in ("scratch", "resume"):  # each process makes only its own shard under FSDP
    raw_model = distributed.build(GPTConfig(**model_args), procs, cfg.parallel, device, cfg.seed, dtype)
else:  # pretrained Hugging Face weights (requirements-hf.txt): the shape is theirs, the rest ours
    import hf
    given = {k: v for k, v in model_args.items() if k not in settings.SHAPE_KEYS or k in explicit}
    raw_model = hf.from_pretrained(cfg.init_from, hf.vocabulary(meta), **given).to(device)
    model_args = dataclasses.asdict(raw_model.config)
    for key in settings.SHAPE_KEYS:  # the settings saved with the run tell the true shape
        if hasattr(cfg, key) and key != "vocab_size":
            setattr(cfg, key, model_args[key])
    distributed.shard(raw_model, procs, cfg.parallel, dtype)
    if procs.master:
        print(f"starting from the weights of {cfg.init_from}")
model = raw_model  # raw_model: the module whose state we save and load, plain or sharded in place by FSDP
# how this run computes it, from the settings (a resumed run's too), never from model_args
raw_model.configure_run(loss_path, chunk_size, cfg.compile, cfg.activation_checkpointing == "full")
raw_model.loss_group = distributed.group(procs)  # MiLe's and Focal's alpha: averaged over all processes
torch.manual_seed(cfg.seed + procs.rank)  # but dropout differs between processes (the data is drawn apart)
optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
if resumed:
    checkpoint.restore_training(resumed, raw_model, optimizer, procs, device)
    resumed = None  # free the memory
if cfg.compile:
    if procs.master:
        print("compiling the model: the first step waits for it" + (" (minutes on a CPU; --compile=False starts at "
                                                                     "once)" if device_type == "cpu" else ""))
    model = distributed.compile(model, procs, cfg.parallel)
model = distributed.wrap(model, procs, cfg.parallel, device)
if procs.master:
    logit_bytes = cfg.batch_size * cfg.block_size * meta["vocab_size"] * FULL_BYTES_PER_LOGIT[cfg.compile]
    weights = "" if cfg.loss == "ce" else f" (gamma {cfg.gamma}" + (f", sigma {cfg.sigma})" if cfg.loss == "mile" else ")")
    print(f"{raw_model.get_num_params() / 1e6:.2f}M parameters, loss {cfg.loss}{weights}, on {procs.world_size} x "
          f"{device_type} ({cfg.parallel if procs.distributed else 'one process'}) in {dtype}, "
          f"{cfg.gradient_accumulation_steps * cfg.batch_size} sequences a step; loss path: "
          + (f"chunked, {chunk_size} rows a chunk" if loss_path == "chunked" else
             f"full, {logit_bytes / 2 ** 30:.1f} GiB of logits at the peak"))

# memory: said before the first step when the run will need more than the device has (plan.py). One process
# only: under torchrun the plan's own forward would meet the real process group (ask plan.py before the run)
if not procs.distributed:
    warning = memory_warning(cfg, meta["vocab_size"], device, dtype, raw_model.get_num_params(non_embedding=False))
    if warning:
        print(warning, file=sys.stderr)

# MFU: achieved FLOP/s over the devices' peak, when we know the peak
tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size  # over all processes
peak = cfg.peak_flops_per_s or (peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None)


@torch.no_grad()
def evaluate():
    """Plain cross-entropy, what makes CE, Focal and MiLe runs comparable, on the fixed evaluation batches of
    each split, overall and per frequency bucket, with the mean entropy of the predictions (buckets.py).
    Each process takes eval_iters batches of its own; their sums are added up over the processes. None when
    a stop is agreed on between two batches: the evaluation is dropped, so that the checkpoint comes soon."""
    model.eval()
    stats = {}
    for split in ("train", "val"):
        first = procs.rank * cfg.eval_iters
        ks = itertools.takewhile(lambda _: not stop_agreed(), range(first, first + cfg.eval_iters))
        with ctx:
            sums = bucket_sums(raw_model, tqdm((get_batch(split, None, k) for k in ks), total=cfg.eval_iters,
                                               desc=f"evaluating {split}", leave=False,
                                               disable=None if procs.master else True), bucket_of)
        if stopping:
            break
        stats[split] = bucket_stats(distributed.total(procs, sums))
    model.train()
    return None if stopping else stats


def stop_agreed():
    """Whether a stop was asked for (Ctrl-C, SIGTERM) in any process. Every process asks at the same points,
    between two micro-batches or two evaluation batches; once they have agreed, nobody asks again."""
    global stopping
    stopping = stopping or distributed.any_process(procs, stop.requested.is_set())
    return stopping


def get_lr(it):
    """Linear warm-up for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def stop_unless_finite(value, what):
    """A loss that is NaN or infinite ends the run before it can overwrite the last good checkpoint."""
    if not math.isfinite(value):
        kept = f"the last good checkpoint, {saved_at}, is kept" if saved_at else "no checkpoint was written yet"
        fixes = [f"lower learning_rate (now {cfg.learning_rate:g}, {get_lr(iter_num):.2e} at this step)",
                 f"raise warmup_iters (now {cfg.warmup_iters})"]
        if cfg.grad_clip == 0:
            fixes.append("turn gradient clipping on (grad_clip is 0)")
        fail(f"{what} became {value} at iteration {iter_num}; {kept}: {', '.join(fixes[:-1])} or {fixes[-1]}, "
             f"then {'resume' if saved_at else 'start again'}")


def save():
    return checkpoint.save_training(cfg.out_dir, raw_model, optimizer, procs, device, model_args=model_args, meta=meta,
                                    config=dataclasses.asdict(cfg), iter_num=iter_num, wandb_run_id=log.wandb_id)


# -----------------------------------------------------------------------------
# training loop: every process trains on its own micro-batches; the first process alone prints and logs
if procs.master:
    if cfg.init_from != "resume":  # a new run: no checkpoint of an earlier one (--overwrite)
        checkpoint.remove(cfg.out_dir)
    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
log = runlog.RunLog(cfg, iter_num, wandb_id, procs.master)  # a resumed run's log keeps each iteration once
saved_at = checkpoint.find(cfg.out_dir)
first_iter = last_saved = iter_num  # a resumed run does not save again the state it started from
save_every = cfg.checkpoint_interval or cfg.eval_interval
progress = tqdm(total=cfg.max_iters, initial=iter_num, unit="it", dynamic_ncols=True,
                disable=None if procs.master else True)
t_start = t_last = time.time()
iters_since_log, val_ce, stopping, dropped = 0, float("nan"), False, ""
train_loss = torch.zeros((), device=device)  # of the last completed step
stop.training = True
while True:
    lr = get_lr(iter_num) if cfg.decay_lr else cfg.learning_rate
    for group in optimizer.param_groups:
        group["lr"] = lr

    if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only:
        t_eval = time.time()
        stats = evaluate()
        if stats is None:  # stopped during the evaluation
            dropped = " (the evaluation under way was dropped)"
            break
        val_ce = stats["val"]["ce"]
        stop_unless_finite(val_ce, "the validation loss")
        if procs.master:
            val = stats["val"]
            progress.write(f"iter {iter_num}: train ce {stats['train']['ce']:.4f}, val ce {val_ce:.4f} (ppl "
                           f"{val['ppl']:.2f}); val ce by frequency: " + ", ".join(f"{b} {val['ce_' + b]:.3f}" for b in
                                                                                BUCKETS) + f"; entropy {val['entropy']:.3f}")
            log.write({"iter": iter_num, "lr": lr, "train_ce": stats["train"]["ce"],
                       **{f"val_{k}": v for k, v in val.items()}})
        if cfg.eval_only:
            break
        t_last += time.time() - t_eval  # evaluation does not count against tokens/s
    if iter_num > last_saved and (iter_num % save_every == 0 or iter_num == cfg.max_iters):
        t_save = time.time()
        stop_unless_finite(distributed.mean(procs, train_loss), "the training loss")
        saved_at = save()
        last_saved = iter_num
        t_last += time.time() - t_save
    if iter_num >= cfg.max_iters:
        break
    if stop_agreed():
        break

    # one optimizer step over gradient_accumulation_steps micro-batches, micro_steps of them in this process;
    # a stop agreed on between two of them abandons the step, so the checkpoint holds the step before it
    step_rng, step_loss = checkpoint.rng_state(device), torch.zeros((), device=device)
    for micro_step in range(micro_steps):
        if micro_step and stop_agreed():
            break
        last = micro_step == micro_steps - 1
        X, Y = get_batch("train", iter_num, procs.rank * micro_steps + micro_step)
        # DDP averages the gradients over the processes on the last micro-batch only; FSDP reduce-scatters
        # them at every one, so that no process ever holds a whole gradient
        with model.no_sync() if procs.distributed and cfg.parallel == "ddp" and not last else nullcontext():
            with ctx:
                _, loss = model(X, Y)
                loss = loss / micro_steps  # the step's loss is the mean over its micro-batches
            scaler.scale(loss).backward()
        step_loss += loss.detach()
    if stopping:  # its gradients dropped and the random stream (dropout) rewound: resumed, it runs again
        optimizer.zero_grad(set_to_none=True)
        checkpoint.set_rng_state(step_rng, device)
        dropped = f" (iteration {iter_num + 1}, under way, was dropped)"
        break
    train_loss = step_loss
    scaler.unscale_(optimizer)  # the gradients as they are (fp16's loss scale undone), for their norm
    # the norm over all processes (FSDP's shards together), before clipping; grad_clip 0 clips nothing
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    iters_since_log += 1
    progress.update(1)

    if iter_num % cfg.log_interval == 0:
        lossf = distributed.mean(procs, train_loss)  # waits for the GPU: only here
        stop_unless_finite(lossf, "the training loss")
        grad_normf = distributed.whole(grad_norm).item()  # the last step's
        dt = (time.time() - t_last) / iters_since_log
        tokens_per_s = tokens_per_iter / dt
        mfu = raw_model.flops_per_token() * tokens_per_s / (peak * procs.world_size) if peak else None
        memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device_type == "cuda" else None  # plan.py's peak
        if procs.master:
            progress.write(f"iter {iter_num}: {cfg.loss} {lossf:.4f}, grad norm {grad_normf:.3f}, lr {lr:.2e}, "
                           f"{dt * 1000:.0f} ms/it, "
                           f"{tokens_per_s:,.0f} tok/s, MFU " + (f"{mfu * 100:.1f}%" if mfu else "n/a")
                           + (f", {memory:.1f} GiB at the peak" if memory else ""))
            log.write({"iter": iter_num, "train_loss": lossf, "grad_norm": grad_normf, "lr": lr,
                       "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_memory_gib": memory})
        t_last, iters_since_log = time.time(), 0
progress.close()

# -----------------------------------------------------------------------------
# the end: after Ctrl-C or SIGTERM, save the last completed step and say how to go on
if stopping:
    if iter_num > last_saved:
        stop_unless_finite(distributed.mean(procs, train_loss), "the training loss")
        saved_at = save()
    resume = [arg for arg in checkpoint.command_line() if not arg.startswith(("--init_from=", "--overwrite="))]
    if procs.master and (iter_num > first_iter or cfg.init_from == "resume"):
        print(f"interrupted at iteration {iter_num}{dropped}: checkpoint in {saved_at}; resume with: "
              f"{shlex.join(resume + ['--init_from=resume'])}")
    elif procs.master:
        print("interrupted before the first step: nothing to save")
elif procs.master and not cfg.eval_only:
    saved = f"checkpoint in {saved_at}" if iter_num > first_iter else "no step taken, so no checkpoint written"
    print(f"done: {iter_num} iterations, val ce {val_ce:.4f}, {time.time() - t_start:.0f} s; {saved}")
log.finish()
distributed.finish(procs)
if stopping:
    sys.exit(128 + (stop.number or signal.SIGINT))  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
