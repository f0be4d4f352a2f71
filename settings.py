"""
Module: the settings of a run, imported by train.py, bench.py, plan.py and compare.py.

Every setting of a training run, with its default and type, in one place. train.py reads them from
an optional config file (Python that assigns some of them) and then --key=value flags; bench.py,
plan.py and compare.py read them the same way, so a command means the same run in each.
"""

import dataclasses
import difflib
import os
import sys
from ast import literal_eval
from dataclasses import dataclass

from mile import LOSSES
from system import fail


@dataclass
class Settings:
    # I/O
    out_dir: str = "out"
    eval_interval: int = 250  # evaluate every this many iterations, and at the end
    checkpoint_interval: int = 0  # save a checkpoint every this many iterations; 0: at every evaluation
    log_interval: int = 50
    eval_iters: int = 25  # evaluation batches per split and per process
    eval_only: bool = False  # evaluate once and exit
    init_from: str = "scratch"  # "scratch", "resume" (from out_dir), "auto" (resume if out_dir holds a checkpoint, else scratch), or Hugging Face weights: gpt2[-medium|-large|-xl] or a directory
    overwrite: bool = False  # let a scratch run replace the checkpoint (and log) of an earlier run in out_dir
    wandb_log: bool = False  # send log.jsonl's records to Weights & Biases too (requirements-wandb.txt)
    wandb_project: str = "nanomile"
    wandb_run_name: str = ""  # empty: W&B picks a name
    # data
    dataset: str = "shakespeare_char"  # a folder in data/, or a path, holding meta.pkl and {train,val}.bin or {train,val}_*.bin shards
    batch_size: int = 12  # sequences per micro-batch, in each process
    block_size: int = 64  # context length
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all processes
    # model
    arch: str = "gpt2"  # "gpt2", or "llama": the paper's block (RMSNorm, SwiGLU, rotary, untied, no biases)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_ffn: int = 0  # MLP hidden width; 0 means 4 * n_embd
    dropout: float = 0.0
    bias: bool = False
    # the loss (mile.py)
    loss: str = "mile"  # "ce", "focal" or "mile"
    gamma: float = 1.0  # exponent of the Focal / MiLe weight; 1.0 in every run of the paper
    sigma: float = 1.0  # MiLe: w = (sigma + H) ** gamma
    loss_path: str = "auto"  # "full": the (B, T, V) logits, then the loss; "chunked": never all the logits at once; "auto" picks (docs/chunked.md)
    loss_chunk_size: int = 0  # rows of logits per chunk on the chunked path; 0 picks one for the device
    # AdamW
    learning_rate: float = 3e-3  # 3x nanoGPT's CPU recipe: a tiny model takes a large step
    max_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # clip gradients at this norm; 0 disables
    # learning-rate schedule: linear warm-up, then cosine decay to min_lr
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 2000  # usually max_iters
    min_lr: float = 1e-4
    # system
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu; or e.g. "cuda:1"
    dtype: str = "auto"  # "auto" is bfloat16 on a CUDA GPU that has it, else float32; or float32|bfloat16|float16
    compile: bool = False  # torch.compile the model (and the chunked loss's per-chunk math): faster steps after a slow first one
    seed: int = 1337
    parallel: str = "ddp"  # under torchrun: "ddp" (a model copy per process) or "fsdp" (FSDP2: everything sharded)
    activation_checkpointing: str = "none"  # "full": keep only each block's input for backward and recompute the rest
    peak_flops_per_s: float = 0.0  # the denominator of MFU; 0 looks the GPU up in system.PEAK_FLOPS


KEYS = [f.name for f in dataclasses.fields(Settings)]
# settings of the machine and the command, never taken over from a resumed checkpoint
MACHINE_KEYS = ("out_dir", "init_from", "overwrite", "device", "dtype", "peak_flops_per_s")
# how a run computes: a resumed run keeps them too, unless given again (a 7B run that trained sharded, with its
# activations recomputed, would not fit resumed as DDP), and says so
RUN_KEYS = ("parallel", "activation_checkpointing", "compile")
# names of earlier versions: a flag or config key that uses one is told the new name
RENAMED = {"chunked_loss": ("loss_path", "auto, full or chunked"),
           "compile_loss": ("compile", "it compiles the model and the chunked loss's per-chunk math together")}
CHOICES = {"loss": LOSSES, "arch": ("gpt2", "llama"), "loss_path": ("auto", "full", "chunked"),
           "parallel": ("ddp", "fsdp"),
           "activation_checkpointing": ("none", "full"), "dtype": ("auto", "float32", "bfloat16", "float16")}
AT_LEAST_ONE = ("eval_interval", "log_interval", "eval_iters", "batch_size", "block_size",
                "gradient_accumulation_steps", "n_layer", "n_head", "n_embd")


def set_value(cfg, key, value, source):
    """cfg.key = value, or one sentence for the user when the key does not exist or the value is not of
    the default's type (an int is a fine float; "true"/"false" are bools)."""
    if key in RENAMED:
        new, note = RENAMED[key]
        fail(f"--{key} is now --{new} ({note})" if source.startswith("--") else
             f"{key} in {source} is now {new} ({note})")
    if key not in KEYS:
        close = difflib.get_close_matches(key, KEYS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        fail(f"unknown setting {key!r} in {source}{hint}; the valid keys are: {', '.join(KEYS)}")
    kind = type(getattr(Settings, key))
    if kind is bool:
        value = {"true": True, "false": False}.get(str(value).lower(), value)
    elif kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        fail(f"{key} in {source} must be of type {kind.__name__} (like {getattr(Settings, key)!r}), not {value!r}")
    setattr(cfg, key, value)


def parse(argv, usage=""):
    """The settings of a command line: the defaults, then each config file and --key=value flag in order.
    Returns (settings, the keys set explicitly). -h or --help prints usage and the settings."""
    cfg, explicit = Settings(), set()
    batch_size, gradient_accumulation_steps, configured = cfg.batch_size, cfg.gradient_accumulation_steps, None
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage + "\nSettings (--key=value), with their defaults: " +
                  ", ".join(f"{k}={getattr(Settings, k)!r}" for k in KEYS))
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                fail(f"{arg} has no value; write --{key}=VALUE")
            if type(getattr(Settings, key, None)) is str:
                value = text  # a string setting takes the text as it is
            else:
                try:
                    value = literal_eval(text)
                except (ValueError, SyntaxError):
                    value = text  # not a Python literal: the type check below names it
            set_value(cfg, key, value, arg)
            explicit.add(key)
        elif os.path.isfile(arg):
            assigned = {}
            try:
                exec(open(arg).read(), {}, assigned)
            except Exception as e:
                fail(f"config file {arg} does not run: {type(e).__name__}: {e}")
            for key, value in assigned.items():
                if not key.startswith("_") and not callable(value) and not isinstance(value, type(sys)):
                    set_value(cfg, key, value, arg)
                    explicit.add(key)
        else:
            fail(f"{arg!r} is neither a --key=value setting nor a config file")
        if arg.startswith("--batch_size=") and configured is None:
            configured = (batch_size, gradient_accumulation_steps)
        batch_size, gradient_accumulation_steps = cfg.batch_size, cfg.gradient_accumulation_steps
    flags = {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}
    if configured and "gradient_accumulation_steps" in explicit - flags:  # a config file set the accumulation
        keep_global_batch(cfg, *configured, "the config")
    return cfg, explicit


def keep_global_batch(cfg, batch_size, gradient_accumulation_steps, source):
    """A new batch_size keeps the sequences per optimizer step that source set (batch_size x
    gradient_accumulation_steps): the accumulation follows, or one sentence says it cannot."""
    sequences = batch_size * gradient_accumulation_steps
    if sequences % cfg.batch_size:
        fail(f"batch_size={cfg.batch_size} cannot keep the {sequences} sequences an optimizer step of {source} "
             f"({sequences} is not a multiple of {cfg.batch_size}); choose a divisor of {sequences}, or set "
             f"gradient_accumulation_steps too")
    cfg.gradient_accumulation_steps = sequences // cfg.batch_size


# how a run computed its model, which model arguments held beside the model's shape until 2026-12-07 (upgrade)
RUN_MODEL_ARGS = ("loss_path", "loss_chunk_size", "compiled", "activation_checkpointing")


def upgrade(saved, model_args=False):
    """Settings, or with model_args the model arguments, saved by earlier versions, in today's names: the one
    place old names are read. Before 2026-12-03 (commit 5eea2f3): chunked_loss (True, False or "auto") became
    loss_path, and compile_loss is gone (a run's compile setting covers it). Before 2026-12-07: model arguments
    held how the run computed the model (RUN_MODEL_ARGS: its loss path and chunk size, whether it was compiled,
    activation checkpointing) beside what the model is; they are dropped here, as a resumed run takes them
    from its settings and a loaded model computes the plain way (model.GPT.configure_run)."""
    saved = dict(saved)
    if "chunked_loss" in saved:
        saved["loss_path"] = {"true": "chunked", "false": "full"}.get(str(saved.pop("chunked_loss")).lower(), "auto")
    saved.pop("compile_loss", None)
    if model_args:
        saved = {key: value for key, value in saved.items() if key not in RUN_MODEL_ARGS}
    return saved


def resumed(cfg, saved, explicit):
    """The settings of a resumed run: those it was saved with (saved, a dict), except the ones given
    explicitly now and those of the machine and the command. Old names are read as the new ones."""
    saved = upgrade(saved)
    for key, value in saved.items():
        if key in KEYS and key not in explicit and key not in MACHINE_KEYS:
            setattr(cfg, key, value)
    if "batch_size" in explicit and "gradient_accumulation_steps" not in explicit and "batch_size" in saved:
        keep_global_batch(cfg, saved["batch_size"], saved["gradient_accumulation_steps"], "the resumed run")
    return cfg


def resumed_line(cfg, saved, explicit):
    """What the start-up line of a resumed run adds: how it computes (kept from the checkpoint, or given now),
    and the sequences an optimizer step when they differ from the checkpoint's."""
    said = "as it ran: " + ", ".join(f"{key}={getattr(cfg, key)}" for key in RUN_KEYS if key not in explicit)
    given = [f"{key}={getattr(cfg, key)}" for key in RUN_KEYS if key in explicit]
    said += f"; given now: {', '.join(given)}" if given else ""
    sequences = cfg.batch_size * cfg.gradient_accumulation_steps
    before = saved.get("batch_size", cfg.batch_size) * saved.get("gradient_accumulation_steps", 1)
    if sequences != before:
        said += f"; {sequences} sequences an optimizer step where the checkpoint's run took {before}"
    return said


def split_over_processes(cfg, world_size):
    """Stop with one sentence unless the micro-batches of an optimizer step (gradient_accumulation_steps,
    over all processes) split evenly over world_size processes, naming settings that keep the step's
    sequences when there are some."""
    steps, sequences = cfg.gradient_accumulation_steps, cfg.gradient_accumulation_steps * cfg.batch_size
    if steps % world_size == 0:
        return
    splits = [(n, sequences // n) for n in range(world_size, sequences + 1, world_size) if sequences % n == 0]
    advice = ""
    if splits:
        n, b = min(splits, key=lambda s: abs(s[1] - cfg.batch_size))
        advice = f"; --gradient_accumulation_steps={n} --batch_size={b} keeps the {sequences} sequences of a step"
    fail(f"gradient_accumulation_steps ({steps}) must be a multiple of the number of processes ({world_size}): "
         f"each takes an equal share of the micro-batches of a step{advice}")


# the numbers torch and numpy would refuse only later, with a traceback, after out_dir is taken (or not at all:
# a negative sigma trains into NaN)
RANGES = {
    "learning_rate": ("positive", lambda v: v > 0),
    "min_lr": ("at least 0", lambda v: v >= 0),
    "beta1": ("at least 0 and below 1", lambda v: 0 <= v < 1),
    "beta2": ("at least 0 and below 1", lambda v: 0 <= v < 1),
    "weight_decay": ("at least 0", lambda v: v >= 0),
    "grad_clip": ("at least 0 (0 disables clipping)", lambda v: v >= 0),
    "peak_flops_per_s": ("at least 0 (0 looks the GPU up)", lambda v: v >= 0),
    "sigma": ("positive (MiLe weighs a token by (sigma + entropy) ** gamma, and an entropy can be 0)", lambda v: v > 0),
    "seed": ("from 0 to 2**32 - 1 (what the data's random draw takes)", lambda v: 0 <= v < 2**32),
}


def check(cfg):
    """Stop with one sentence if a setting has a value it cannot have."""
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            fail(f"{key} must be one of {', '.join(choices)}, not {getattr(cfg, key)!r}")
    for key in AT_LEAST_ONE:
        if getattr(cfg, key) < 1:
            fail(f"{key} must be at least 1, not {getattr(cfg, key)}")
    for key in ("checkpoint_interval", "loss_chunk_size", "max_iters", "warmup_iters", "n_ffn"):
        if getattr(cfg, key) < 0:
            fail(f"{key} must not be negative, not {getattr(cfg, key)}")
    if cfg.gamma < 0:
        fail(f"gamma must not be negative, not {cfg.gamma}: it is the exponent of the loss weight (0 weighs every "
             f"token alike, the paper uses 1)")
    for key, (rule, ok) in RANGES.items():
        if not ok(getattr(cfg, key)):
            fail(f"{key} must be {rule}, not {getattr(cfg, key)}")
    if cfg.parallel == "fsdp" and cfg.dtype == "float16":
        fail("--parallel=fsdp trains in bfloat16 or float32 here: float16 would need a sharded gradient scaler; "
             "use --dtype=bfloat16")
    if cfg.n_embd % cfg.n_head:
        fail(f"n_embd ({cfg.n_embd}) must be a multiple of n_head ({cfg.n_head})")
    if not 0.0 <= cfg.dropout < 1.0:
        fail(f"dropout must be at least 0 and below 1, not {cfg.dropout}")
    return cfg


# the fields of a model's shape: a resumed run keeps them, an imported one takes them from the weights
SHAPE_KEYS = ("arch", "n_layer", "n_head", "n_embd", "n_ffn", "block_size", "bias", "vocab_size", "padded_vocab_size")


def padded(vocab_size):
    """The rows of a new model's embedding and output tables: a BPE vocabulary (GPT-2's 50257) padded to a
    multiple of 64 (50304), the width GPU matmuls run fastest at; a character vocabulary (tens of tokens)
    as it is, which padding would only make slower on the CPU it trains on. 0: no padding."""
    rows = -(-vocab_size // 64) * 64
    return rows if vocab_size >= 1024 and rows != vocab_size else 0


def model_args(cfg, vocab_size):
    """The GPTConfig arguments (model.py) of these settings, for a new model of a dataset of vocab_size tokens:
    what the model is. How the run computes it is not among them (GPT.configure_run)."""
    return dict(arch=cfg.arch, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_ffn=cfg.n_ffn,
                block_size=cfg.block_size, bias=cfg.bias, vocab_size=vocab_size,
                padded_vocab_size=padded(vocab_size), dropout=cfg.dropout, loss=cfg.loss,
                gamma=cfg.gamma, sigma=cfg.sigma)


def refuse_renamed(argv, renamed):
    """Stop with one sentence when a command line uses a flag of an earlier version ({old: new})."""
    for arg in argv:
        old = arg.split("=", 1)[0]
        if old in renamed:
            fail(f"{old} is now {renamed[old]}")
