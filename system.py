"""
Module: the machine a run executes on, imported by every command.

Where a run executes: one sentence for the user when something is wrong, the device and its
precision, the GPU peak behind MFU, the memory a machine has, and stopping on Ctrl-C or SIGTERM.
"""

import os
import signal
import socket
import sys
import threading
from contextlib import nullcontext

import torch


def fail(message, local=False):
    """Stop with one sentence for the user, no traceback. Settings are checked alike in every process
    under torchrun, so process 0 alone speaks; a check of a machine's own files or GPUs (local=True) is
    told by that machine's first process, naming itself when it is not process 0."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if rank == 0 or (local and local_rank == 0):
        where = f"process {rank} on {socket.gethostname()}: " if rank else ""
        print(f"error: {where}{message}", file=sys.stderr)
    sys.exit(1)


# -----------------------------------------------------------------------------
# the device and its precision


def resolve_device(name):
    """The device a run uses: name as given (cpu, cuda, cuda:N, mps), or for "auto" cuda, then mps, then cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        fail(f"device must be auto, cpu, mps, cuda or cuda:N, not {name!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"device {name} asked for, but this PyTorch sees no CUDA GPU; use --device=cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        fail(f"device {name} asked for, but this machine has no such CUDA GPU: it has {count}, cuda:0 to "
             f"cuda:{count - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        fail("device mps asked for, but this PyTorch sees no Apple GPU; use --device=cpu")
    return name


def resolve_dtype(name, device):
    """The dtype of the matmuls: name as given, or for "auto" bfloat16 on a CUDA GPU that has it, else float32."""
    cuda = device.startswith("cuda")
    if name == "auto":
        return "bfloat16" if cuda and torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    if name == "float16" and device == "cpu":
        fail("float16 on the CPU is emulated: a step of the default model takes about 20x as long as in float32 "
             "(1.55 s against 77 ms, one core of an AMD EPYC); use --dtype=float32, or bfloat16 on a CPU that has "
             "bfloat16 instructions (AMX, AVX512-BF16)")
    return name


def autocast(device, dtype):
    """The context forward passes run in: autocast's bf16 / fp16 matmuls with float32 weights (the loss math
    stays float32, mile.py), or nothing at all in float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


# -----------------------------------------------------------------------------
# model FLOPs utilisation: achieved FLOP/s over the device's peak, which we look up rather than
# assume (nanoGPT hard-codes the A100's 312 TFLOP/s and prints over 100% on an H100)

# dense bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets; matched against the
# CUDA device name, first match wins, so the more specific names come first
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16; V100 has no bf16
    ("T4", 65e12),  # fp16
]


def peak_flops(device_name):
    """Peak FLOP/s of a CUDA device from its name, or None when it is not in the table."""
    return next((flops for key, flops in PEAK_FLOPS if key in device_name), None)


def device_memory(device):
    """Bytes a run may use on device: the GPU's total memory, or the host memory free for new processes."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration):  # not Linux
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# -----------------------------------------------------------------------------
# stopping: Ctrl-C (SIGINT) and SIGTERM, which clusters send before they take a machine back


class StopSignals:
    """The first Ctrl-C or SIGTERM asks the run to stop after the step under way (train.py saves that step
    first); the second stops at once. Before training starts there is nothing to save, so the first stops
    at once. A watcher thread reads the signals (signal.set_wakeup_fd), so a signal is acted on even while
    the main thread is inside one long operation, where Python's own handlers would wait for it to end."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = threading.Event()
        self.number = None  # the signal that asked for the stop
        self.training = False  # set by train.py when the first step begins
        self.speak = int(os.environ.get("RANK", 0)) == 0  # the first process under torchrun says what happens
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        for s in self.SIGNALS:
            signal.signal(s, lambda *_: None)  # Python's handler does nothing: the watcher acts
        threading.Thread(target=self._watch, args=(read,), daemon=True).start()

    def _watch(self, read):
        while True:
            number = os.read(read, 1)[0]
            if number not in self.SIGNALS:
                continue
            name = "interrupted" if number == signal.SIGINT else "terminated (SIGTERM)"
            if not self.training:
                self._exit(f"\n{name} before training began: nothing to save\n", number)
            if self.requested.is_set():
                self._exit(f"\n{name} again: stopping at once; the last checkpoint is kept as it was\n", number)
            self.number = number
            self.requested.set()
            if self.speak:
                again = "Ctrl-C" if number == signal.SIGINT else "SIGTERM"
                os.write(2, f"\n{name}: saving a checkpoint after this step ({again} again to stop at "
                            f"once)\n".encode())

    def _exit(self, message, number):
        if self.speak:
            os.write(2, message.encode())
        os._exit(128 + number)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
