"""
Command: python bench.py [--train] [--key=value ...]

What the output layer plus loss costs, and what a training step costs, on the paths users run.

Head + loss (the default): forward+backward time and extra peak memory of hidden (N, d) @ weight.T
followed by the loss, against torch.compile'd PyTorch cross-entropy over the same logits:

    CE compiled          the (N, V) logits, F.cross_entropy, torch.compile'd: the baseline ("x CE")
    MiLe compiled        the (N, V) logits, mile.mile_loss, torch.compile'd: the GPU's default path
    MiLe eager           the (N, V) logits, mile.mile_loss as written (the readable reference)
    chunked MiLe         mile.chunked_loss, per-chunk math compiled, at the device's chunk size and
                         at each of --chunk_sizes
    chunked CE           the same function with loss="ce"
    chunked MiLe eager   per-chunk math in eager PyTorch (the CPU's default run uses it)
    Liger FLCE           Liger-Kernel's fused linear cross-entropy (CUDA; when installed)
    Cut CE               Apple's Cut Cross-Entropy, linear_cross_entropy (CUDA; when installed)

Extra memory is the peak during forward+backward above what was there before (the inputs), less
the gradients' own storage: on CUDA from torch.cuda.max_memory_allocated, with every case in one
process; on CPU from the high-water mark of resident memory (reset through /proc/self/clear_refs,
Linux), each case in a fresh process. Time is the median of --repeats runs, after a warm-up run
where something compiles or caches (compiled cases, CUDA). Inputs are bf16 on CUDA, float32 on CPU.
The floor is 6 N d V FLOPs (the three matmuls) at the device's peak (system.PEAK_FLOPS, or --peak).

    python bench.py                                          # CPU: d=768, V=50304, N in 2048, 8192, 16384
    python bench.py --N=8192 --chunk_sizes=256,512,1024,2048 --cases="chunked MiLe"   # choose the chunk size
    python bench.py --device=cuda --N=16384 --chunk_sizes=512,4096
    python bench.py --train                                  # ms/step of train.py's 124M for CE and MiLe
    python bench.py --train --tiny                           # the same on a tiny model (seconds, any device)
    python bench.py --gpu_all --out=bench-gpu.md             # the whole GPU table: both head shapes, then --train
    python bench.py --logits                                 # the loss alone over given logits: CE, Focal, MiLe compiled

--train runs train.py (config/gpt2_124m.py, 16 x 1024 tokens a micro-batch, 4 of them a step, 30
steps, compiled) once per loss (ce, mile) and path (--loss_path=full, chunked), each in its own
process, and reads its log.jsonl: the median tokens/s and MFU of the logged intervals after the first
(which holds the compilation). It also counts the graph breaks and recompilations torch.compile
reports (TORCH_LOGS), and says which path --loss_path=auto takes there. Arguments after -- go to
train.py.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from settings import refuse_renamed

ROOT = os.path.dirname(os.path.abspath(__file__))
CASES = ["CE compiled", "MiLe compiled", "MiLe eager", "chunked MiLe", "chunked CE", "chunked MiLe eager",
         "Liger FLCE", "Cut CE"]
GPU_SHAPES = [(16384, 768, 50304), (8192, 4096, 32000)]  # GPT-2 124M's head, the paper's 6.7B head
TRAIN_124M = ["config/gpt2_124m.py", "--dataset=shakespeare", "--batch_size=16", "--gradient_accumulation_steps=4",
              "--max_iters=30", "--log_interval=5", "--eval_iters=2", "--eval_interval=1000"]
TRAIN_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=6",
              "--log_interval=1", "--eval_iters=1", "--eval_interval=1000", "--warmup_iters=2"]


# -----------------------------------------------------------------------------
# head + loss


OPTIONAL = {"Liger FLCE": ("liger_kernel", "liger-kernel"), "Cut CE": ("cut_cross_entropy", "cut-cross-entropy")}


def optional_note(case, device):
    """Why an optional case cannot run here, or None."""
    import importlib.util
    if case not in OPTIONAL:
        return None
    module, package = OPTIONAL[case]
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install {package})"
    return None if device == "cuda" else "needs CUDA"


def optional_fn(case):
    """The fused linear cross-entropy of an optional package."""
    if case == "Liger FLCE":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda hidden, weight, targets: liger(weight, hidden, targets)
    from cut_cross_entropy import linear_cross_entropy
    return lambda hidden, weight, targets: linear_cross_entropy(hidden, weight, targets)


def head_loss_fn(case, chunk_size):
    """fn(hidden, weight, targets) -> loss for one case."""
    import torch
    import torch.nn.functional as F

    import mile
    if case == "CE compiled":
        return torch.compile(lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y))
    if case == "MiLe compiled":
        return torch.compile(lambda h, w, y: mile.mile_loss(h @ w.t(), y))
    if case == "MiLe eager":
        return lambda h, w, y: mile.mile_loss(h @ w.t(), y)
    if case.startswith("chunked"):
        loss, compiled = ("mile" if "MiLe" in case else "ce"), "eager" not in case
        return lambda h, w, y: mile.chunked_loss(h, w, y, loss=loss, chunk_size=chunk_size, compiled=compiled)
    return optional_fn(case)


def measure(case, chunk_size, N, d, V, device, repeats, dtype=None):
    """Time (ms) and extra memory (MiB) of forward+backward of one case, in this process."""
    import torch
    compiles = "compiled" in case or case.startswith("chunked") and "eager" not in case
    if compiles:
        torch._dynamo.reset()  # every case compiles afresh: no recompile limit carries over from the last one
    dtype = getattr(torch, dtype) if dtype else torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    hidden = torch.randn(N, d, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, d, device=device) * d ** -0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device=device)
    fn = head_loss_fn(case, chunk_size)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        fn(hidden, weight, targets).backward()
        sync()

    if device == "cuda" or compiles or case in OPTIONAL:
        step()  # warm-up: compiles, and lets the caching allocator settle (CPU eager needs none)
    hidden.grad = weight.grad = None
    grad_bytes = (hidden.numel() + weight.numel()) * dtype.itemsize
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark of resident memory
        base = rss_kib("VmRSS") * 1024
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        if i == 0:
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss_kib("VmHWM") * 1024
        hidden.grad = weight.grad = None
    return {"time_ms": statistics.median(times) * 1000, "extra_mb": (peak - base - grad_bytes) / 2 ** 20}


def rss_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def worker(specs, N, d, V, device, repeats, dtype=None):
    """Measure each "case@chunk" spec in this process; print one JSON line each."""
    import torch
    for spec in specs:
        case, chunk = spec.rsplit("@", 1)
        try:
            r = measure(case, int(chunk), N, d, V, device, repeats, dtype)
        except torch.cuda.OutOfMemoryError:
            r = {"note": "out of memory"}
        except Exception as e:  # one case failing leaves the others measured
            r = {"note": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({"spec": spec, **r}), flush=True)


def run_specs(specs, N, d, V, device, repeats, dtype=None):
    """{spec: result}: on CUDA all specs in one process, on CPU one process each (for the RSS peak)."""
    notes = {s: optional_note(s.rsplit("@", 1)[0], device) for s in specs}
    results = {s: {"note": note} for s, note in notes.items() if note}
    todo = [s for s in specs if s not in results]
    groups = ([todo] if todo else []) if device == "cuda" else [[s] for s in todo]
    for group in groups:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "|".join(group), "--N", str(N), "--d", str(d),
               "--V", str(V), "--device", device, "--repeats", str(repeats)] + (["--dtype", dtype] if dtype else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[r.pop("spec")] = r
        for spec in group:
            if spec not in results:  # the process died: killed for memory, or a crash
                oom = proc.returncode == -9 or "out of memory" in proc.stderr
                last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                results[spec] = {"note": "out of memory" if oom else last[:80]}
    return results


def head_table(shapes, cases, chunk_sizes, device, repeats, peak, emit, dtype=None):
    """One Markdown table of every case at every shape."""
    import mile
    emit("| N | d | V | case | chunk | time (ms) | x CE | extra memory (MiB) | / CE | bytes a logit | floor (ms) "
         "| x floor |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for N, d, V in shapes:
        auto = mile.default_chunk_size(V, device)
        specs = []
        for case in cases:
            sizes = [auto] + [c for c in chunk_sizes if c != auto] if case == "chunked MiLe" else [auto]
            specs += [f"{case}@{c}" for c in sizes]
        results = run_specs(specs, N, d, V, device, repeats, dtype)
        base = results.get(f"CE compiled@{auto}", {})
        floor = 6 * N * d * V / peak * 1000 if peak else None
        for spec in specs:
            case, chunk = spec.rsplit("@", 1)
            r = results[spec]
            chunk = chunk if case.startswith("chunked") else ""
            if "note" in r:
                emit(f"| {N} | {d} | {V} | {case} | {chunk} | {r['note']} | | | | | | |")
                continue
            x_ce = f"{r['time_ms'] / base['time_ms']:.2f}" if "time_ms" in base else ""
            mem_ce = f"{r['extra_mb'] / base['extra_mb']:.2f}" if base.get("extra_mb", 0) > 0 else ""
            floor_cells = f"{floor:.1f} | {r['time_ms'] / floor:.2f}" if floor else "n/a | n/a"
            per_logit = r["extra_mb"] * 2 ** 20 / (N * V)  # what choose_loss_path's budget rule counts
            emit(f"| {N} | {d} | {V} | {case} | {chunk} | {r['time_ms']:.1f} | {x_ce} | {r['extra_mb']:.0f} | {mem_ce} "
                 f"| {per_logit:.1f} | {floor_cells} |")


# -----------------------------------------------------------------------------
# train.py steps


def train_run(args, out_dir):
    """Run train.py with args into out_dir; (ms/step, tokens/s, MFU, graph breaks, recompiles) or an error."""
    env = {**os.environ, "TORCH_LOGS": "graph_breaks,recompiles", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out_dir}", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"error": (lines or [f"exit code {proc.returncode}"])[-1][:100]}
    with open(os.path.join(out_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        logged = [r for r in map(json.loads, f) if "tokens_per_s" in r]
    kept = logged[1:] or logged  # the first interval holds the compilation
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in kept)
    mfus = [r["mfu"] for r in kept if r.get("mfu")]
    tokens_per_step = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    return {"ms": tokens_per_step / tokens_per_s * 1000, "tokens_per_s": tokens_per_s,
            "mfu": statistics.median(mfus) if mfus else None, "intervals": len(kept),
            "breaks": proc.stderr.count("Graph break"), "recompiles": proc.stderr.count("Recompiling function")}


def auto_path(args):
    """The path --loss_path=auto takes for train.py with these arguments, on this machine: the settings as
    train.py reads them (settings.py), the vocabulary from the dataset's meta.pkl."""
    import mile
    import settings
    from data.common import dataset_dir, read_meta
    from system import resolve_device
    cfg, _ = settings.parse(args)
    device = resolve_device(cfg.device)
    vocab = read_meta(os.path.join(dataset_dir(cfg.dataset), "meta.pkl"))["vocab_size"]
    n_rows = cfg.batch_size * cfg.block_size
    path, chunk = mile.choose_loss_path(n_rows, vocab, device, "auto", cfg.loss_chunk_size)
    return f"{path}" + (f", chunk {chunk}" if path == "chunked" else "") + f" (N = {n_rows}, V = {vocab}, {device})"


def train_table(base_args, emit, losses=("ce", "mile")):
    """ms/step of train.py for each loss, full logits and chunked, side by side."""
    emit("| loss | --loss_path | ms/step | x CE full | tokens/s | MFU | intervals | graph breaks "
         "| recompiles |")
    emit("|---|---|---|---|---|---|---|---|---|")
    ce_full = None
    with tempfile.TemporaryDirectory() as tmp:
        for loss in losses:
            for path in ("full", "chunked"):
                args = [*base_args, f"--loss={loss}", f"--loss_path={path}"]
                r = train_run(args, os.path.join(tmp, f"{loss}-{path}"))
                if "error" in r:
                    emit(f"| {loss} | {path} | {r['error']} | | | | | | |")
                    continue
                if loss == "ce" and path == "full":
                    ce_full = r["ms"]
                ratio = f"{r['ms'] / ce_full:.2f}" if ce_full else ""
                mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] else "n/a"
                emit(f"| {loss} | {path} | {r['ms']:.1f} | {ratio} | {r['tokens_per_s']:,.0f} | {mfu} "
                     f"| {r['intervals']} | {r['breaks']} | {r['recompiles']} |")
    emit(f"\n--loss_path=auto (the default) takes: {auto_path(base_args)}")


# -----------------------------------------------------------------------------
# the loss alone, over given logits

LOGITS_SHAPES = [(2048, 50304, "bfloat16"), (2048, 8192, "float32")]
LOGITS_CASES = ("CE compiled", "Focal compiled", "MiLe compiled")


def loss_fn(case):
    """fn(logits, targets) -> loss, torch.compile'd: PyTorch's cross-entropy, or the readable loss of mile.py."""
    import torch
    import torch.nn.functional as F

    import mile
    if case == "CE compiled":
        return torch.compile(lambda z, y: F.cross_entropy(z.float(), y))
    return torch.compile(mile.build_loss("focal" if case.startswith("Focal") else "mile"))


def loops_over_v(code, V):
    """How many loops over the vocabulary the C++ of inductor's forward kernels runs: each `for` whose bound
    is V (or V split into vector lanes), counted once per loop nest."""
    bounds = {str(V)} | {str(V // lanes) for lanes in (8, 16, 32, 64) if V % lanes == 0}
    return sum(1 for m in re.finditer(r"for\(int64_t (\w+)=static_cast<int64_t>\(0L\); \1<static_cast<int64_t>\((\d+)L\)",
                                      code) if m.group(2) in bounds)


def logits_table(emit, repeats):
    """Forward + backward of each loss over the same logits, the cases taking turns run by run; the medians,
    their ratio to compiled cross-entropy, and the loops over V of each compiled forward."""
    import torch
    from torch._inductor.utils import run_and_get_code
    emit("| N | V | dtype | case | time (ms) | x CE | forward loops over V |")
    emit("|---|---|---|---|---|---|---|")
    for N, V, dtype in LOGITS_SHAPES:
        torch.manual_seed(0)
        logits = torch.randn(N, V, dtype=getattr(torch, dtype)).requires_grad_(True)
        targets = torch.randint(0, V, (N,))
        fns, loops, times = {}, {}, {case: [] for case in LOGITS_CASES}
        for case in LOGITS_CASES:
            torch._dynamo.reset()
            fns[case] = loss_fn(case)
            # compiles the forward: its code. With the compile caches off: a cached graph brings its backward's
            # code along with the forward's, and its loops would be counted too
            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                _, code = run_and_get_code(lambda: fns[case](logits, targets))
            loops[case] = loops_over_v("\n".join(code), V)
            fns[case](logits, targets).backward()  # compiles the backward
        for _ in range(repeats):
            for case in LOGITS_CASES:  # in turns, so that the machine's moods fall on every case alike
                logits.grad = None
                t0 = time.perf_counter()
                fns[case](logits, targets).backward()
                times[case].append(time.perf_counter() - t0)
        ce = statistics.median(times["CE compiled"])
        for case in LOGITS_CASES:
            t = statistics.median(times[case])
            emit(f"| {N} | {V} | {dtype} | {case} | {t * 1000:.1f} | {t / ce:.2f} | {loops[case]} |")


# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[2].strip(), allow_abbrev=False)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--N", default="2048,8192,16384", help="token counts, comma-separated")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--V", type=int, default=50304, help="vocabulary: GPT-2's 50257 padded to a multiple of 64")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs a case (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--chunk_sizes", default="", help="chunked MiLe also at these chunk sizes, comma-separated")
    parser.add_argument("--cases", default=",".join(CASES), help="which cases, comma-separated")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="of the inputs (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--peak", type=float, default=0.0, help="peak FLOP/s for the floor (CUDA: looked up)")
    parser.add_argument("--train", action="store_true", help="ms/step of train.py's 124M step instead (see above)")
    parser.add_argument("--tiny", action="store_true", help="with --train: a tiny model, not the 124M")
    parser.add_argument("--loss", default="ce,mile", help="with --train: the losses, comma-separated")
    parser.add_argument("--logits", action="store_true", help="the loss alone over given logits, compiled: CE, Focal, MiLe")
    parser.add_argument("--gpu_all", action="store_true", help="head + loss at GPT-2 124M's and the 6.7B preset's head shapes, then --train")
    parser.add_argument("--out", default="", help="also append the tables to this Markdown file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    refuse_renamed(sys.argv[1:], {"--gpu-all": "--gpu_all", "--losses": "--loss (comma-separated)"})
    args, train_args = parser.parse_known_args()
    if train_args and (train_args[0] != "--" or not args.train):
        parser.error(f"unrecognized arguments: {' '.join(train_args)} (train.py's go after --, with --train)")
    train_args = train_args[1:]
    if args.gpu_all:
        args.device = "cuda"
    repeats = args.repeats or (10 if args.device == "cuda" else 9 if args.logits else 2)
    if args.worker:
        return worker(args.worker.split("|"), int(args.N), args.d, args.V, args.device, repeats, args.dtype)

    import torch
    if (args.device == "cuda" or args.gpu_all) and not torch.cuda.is_available():
        sys.exit("error: --device=cuda (or --gpu_all), but this PyTorch sees no CUDA GPU; run on a GPU machine or "
                 "use --device=cpu")
    out = open(args.out, "a") if args.out else None

    def emit(line):
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    cuda = torch.cuda.is_available() and (args.device == "cuda" or args.train)
    machine = torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores"
    if args.device == "cuda" and not args.peak:
        from system import peak_flops
        args.peak = peak_flops(torch.cuda.get_device_name())
    peak = args.peak or None
    emit(f"\n# {time.strftime('%Y-%m-%d')}, {machine}, torch {torch.__version__}, median of {repeats} runs, "
         + (f"floor at {peak / 1e12:.0f} TFLOP/s\n" if peak else "no peak FLOP/s for a floor\n"))
    if args.logits:
        emit("The loss alone over given logits (N, V), forward and backward, each compiled:\n")
        logits_table(emit, repeats)
        return
    if args.train:
        base = ([*TRAIN_TINY, "--compile=False"] if args.tiny else TRAIN_124M) + train_args
        emit(f"train.py {' '.join(base)}, per loss and path:\n")
        train_table(base, emit, args.loss.split(","))
        return
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    if args.gpu_all:
        emit("Head + loss, forward and backward, bf16 inputs; x CE and / CE against the first row of each shape:\n")
        cases = [c for c in CASES if c != "chunked MiLe eager"]  # eager per-chunk math: the CPU's path, not a GPU's
        head_table(GPU_SHAPES, cases, chunk_sizes or [512, 1024, 4096], "cuda", repeats, peak, emit)
        emit(f"\ntrain.py {' '.join(TRAIN_124M)}, per loss and path:\n")
        train_table(TRAIN_124M, emit)
        return
    shapes = [(int(n), args.d, args.V) for n in args.N.split(",")]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        sys.exit(f"error: unknown case {unknown[0]!r}; the cases are: {', '.join(CASES)}")
    head_table(shapes, cases, chunk_sizes, args.device, repeats, peak, emit, args.dtype)


if __name__ == "__main__":
    main()
