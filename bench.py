"""
Forward+backward time and extra peak memory of the output layer plus loss (hidden (N, d) @ weight.T,
then the loss), for the ways this repo can compute it and the plain-CE baselines:

    F.cross_entropy     materialised logits, PyTorch's cross-entropy
    readable MiLe       materialised logits, mile.mile_loss (the reference)
    chunked MiLe eager  mile.chunked_loss, per-chunk math in eager PyTorch
    chunked MiLe comp.  mile.chunked_loss, per-chunk math through torch.compile
    chunked CE comp.    the same function with loss="ce"
    Liger FLCE          Liger-Kernel's fused linear cross-entropy (CUDA, when installed)

Each case runs in a fresh process. Extra memory is the peak during forward+backward above what was
there before (the inputs), less the gradients' own storage (hidden.grad, weight.grad): on CPU from the
kernel's high-water mark of resident memory (reset through /proc/self/clear_refs, Linux), on CUDA from
torch.cuda.max_memory_allocated. Time is the median of --repeats runs, after a warm-up run where
something compiles or caches (compiled cases, CUDA). Inputs are float32 on CPU and bf16 on CUDA.

    python bench.py                                   # CPU, d=768, V=50257, N in 2048, 8192, 16384
    python bench.py --device=cuda --llama             # GPU, plus the paper's shapes (V=32000, d=1024/2048/4096)
    python bench.py --N=8192 --chunk_sizes=256,512,1024,2048,4096   # choose the chunk size
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

CASES = ["F.cross_entropy", "readable MiLe", "chunked MiLe eager", "chunked MiLe comp.", "chunked CE comp.", "Liger FLCE"]


def worker(case, N, d, V, chunk_size, device, repeats):
    """Run one case in this process and print its figures as JSON."""
    import torch
    import torch.nn.functional as F

    from mile import DEFAULT_CHUNK_SIZE, chunked_loss, mile_loss
    chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    hidden = torch.randn(N, d, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, d, device=device) * d ** -0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device=device)
    if case == "F.cross_entropy":
        fn = lambda: F.cross_entropy((hidden @ weight.t()).float(), targets)  # noqa: E731
    elif case == "readable MiLe":
        fn = lambda: mile_loss(hidden @ weight.t(), targets)  # noqa: E731
    elif case.startswith("chunked"):
        loss = "mile" if "MiLe" in case else "ce"
        fn = lambda: chunked_loss(hidden, weight, targets, loss=loss, chunk_size=chunk_size, compiled="comp" in case)  # noqa: E731
    elif case == "Liger FLCE":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        fn = lambda: liger(weight, hidden, targets)  # noqa: E731

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step():
        fn().backward()
        sync()

    if device == "cuda" or "comp" in case or "Liger" in case:
        step()  # warm-up: compiles, and lets the caching allocator settle (CPU eager needs none)
    hidden.grad = weight.grad = None
    grad_bytes = (hidden.numel() + weight.numel()) * dtype.itemsize
    if device == "cuda":
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
    print(json.dumps({"time_ms": statistics.median(times) * 1000, "extra_mb": (peak - base - grad_bytes) / 2 ** 20}))


def rss_kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def run_case(case, N, d, V, chunk_size, device, repeats):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, "--N", str(N), "--d", str(d), "--V", str(V),
           "--chunk_size", str(chunk_size), "--device", device, "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": "out of memory" if "out of memory" in proc.stderr or proc.returncode == -9 else last[:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--N", default="2048,8192,16384", help="token counts, comma-separated")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--V", type=int, default=50257)
    parser.add_argument("--llama", action="store_true", help="also V=32000 with d in 1024, 2048, 4096 at N=8192")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default: 2 on CPU, 20 on CUDA)")
    parser.add_argument("--chunk_size", type=int, default=0, help="0: mile.DEFAULT_CHUNK_SIZE")
    parser.add_argument("--chunk_sizes", default="", help="sweep the chunk size of the compiled chunked MiLe instead")
    parser.add_argument("--cases", default=",".join(CASES), help="which cases, comma-separated")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats or (20 if args.device == "cuda" else 2)
    if args.worker:
        return worker(args.worker, int(args.N), args.d, args.V, args.chunk_size, args.device, repeats)

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device=cuda, but this PyTorch sees no CUDA GPU; run on a GPU machine or use --device=cpu")
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"# {time.strftime('%Y-%m-%d')}, {machine}, torch {torch.__version__}, median of {repeats} runs")
    shapes = [(int(n), args.d, args.V) for n in args.N.split(",")]
    if args.llama:
        shapes += [(8192, d, 32000) for d in (1024, 2048, 4096)]

    if args.chunk_sizes:  # choosing the chunk size: time and memory of the compiled chunked MiLe
        print("| N | d | V | chunk size | time (ms) | extra memory (MB) |\n|---|---|---|---|---|---|")
        for N, d, V in shapes:
            for c in args.chunk_sizes.split(","):
                r = run_case("chunked MiLe comp.", N, d, V, int(c), args.device, repeats)
                cells = [r["error"], ""] if "error" in r else [f"{r['time_ms']:.0f}", f"{r['extra_mb']:.0f}"]
                print(f"| {N} | {d} | {V} | {c} | " + " | ".join(cells) + " |", flush=True)
        return

    cases = [c for c in args.cases.split(",") if args.device == "cuda" or c != "Liger FLCE"]
    print("| N | d | V | case | time (ms) | x readable | extra memory (MB) | / readable |")
    print("|---|---|---|---|---|---|---|---|")
    for N, d, V in shapes:
        results = {case: run_case(case, N, d, V, args.chunk_size, args.device, repeats) for case in cases}
        ref = results.get("readable MiLe", {})
        for case, r in results.items():
            if "error" in r:
                print(f"| {N} | {d} | {V} | {case} | {r['error']} | | | |", flush=True)
                continue
            t_ratio = f"{r['time_ms'] / ref['time_ms']:.2f}" if "time_ms" in ref else ""
            m_ratio = f"1/{ref['extra_mb'] / r['extra_mb']:.1f}" if "extra_mb" in ref and r["extra_mb"] > 0 else ""
            print(f"| {N} | {d} | {V} | {case} | {r['time_ms']:.0f} | {t_ratio} | {r['extra_mb']:.0f} | {m_ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
