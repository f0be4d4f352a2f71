"""
Command: python compare.py [--seeds=1,2,3] [-- train.py settings ...]

CE vs Focal vs MiLe, measured: the same model, data, token budget and seeds for each loss,
then a table of mean and spread over the seeds (validation CE and perplexity, CE per frequency
bucket, mean predicted entropy) and three plots.

    python compare.py                    # CPU: train.py's defaults on Shakespeare-char, 3 seeds (~25 min on 2 cores)
    python compare.py --setting=gpu      # one GPU: config/train_shakespeare.py (GPT-2 BPE), 3 seeds
    python compare.py --seeds=1,2,3,4,5 --out_dir=out-compare5 -- --max_iters=1000   # more seeds, other flags

Each run is `python train.py [setting] --loss=L --gamma=1 --seed=S --out_dir=OUT/L-seedS`. A run that
finished before is not trained again, so an interrupted comparison continues where it stopped.
Every checkpoint is then evaluated on the same eval_iters validation batches (buckets.py,
drawn with seed 0 whatever the run's seed). The
results go to OUT/results.md (the table), OUT/results.json (every run), and OUT/curves.png,
OUT/buckets.png, OUT/weights.png (the plots need matplotlib: pip install -r requirements-test.txt).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

from buckets import BUCKETS, evaluate_checkpoint
from mile import LOSSES
from settings import refuse_renamed

ROOT = os.path.dirname(os.path.abspath(__file__))
SETTINGS = {  # train.py arguments of each setting; the losses and seeds are added to them
    "cpu": [],  # the defaults: 4 layers x 128, context 64, batch 12, 2000 iterations (README)
    "gpu": [os.path.join("config", "train_shakespeare.py")],
}
LABELS = {"ce": "CE", "focal": "Focal (gamma 1)", "mile": "MiLe (gamma 1)"}
COLORS = {"ce": "tab:gray", "focal": "tab:orange", "mile": "tab:blue"}


def train_runs(args, extra):
    """Train every (loss, seed) that has not finished yet; return their directories."""
    runs = {}
    for loss in LOSSES:
        for seed in args.seeds:
            out = os.path.join(args.out_dir, f"{loss}-seed{seed}")
            runs[loss, seed] = out
            if os.path.exists(os.path.join(out, "done.json")):
                print(f"{out}: finished before, not trained again")
                continue
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), *SETTINGS[args.setting], f"--loss={loss}",
                   "--gamma=1.0", f"--seed={seed}", f"--out_dir={out}", "--overwrite=True", *extra]
            print(" ".join(cmd[1:]), flush=True)
            if os.path.exists(os.path.join(out, "log.jsonl")):
                os.remove(os.path.join(out, "log.jsonl"))  # an interrupted run starts over: one curve per run
            t0 = time.time()
            if subprocess.run(cmd, cwd=ROOT).returncode != 0:
                sys.exit(f"error: the run {out} failed (its message is above); fix that and run compare.py again "
                         f"to continue (finished runs are kept)")
            with open(os.path.join(out, "done.json"), "w") as f:
                json.dump({"seconds": time.time() - t0}, f)
    return runs


def summarize(results):
    """Per loss: mean and sample standard deviation over seeds of every figure."""
    summary = {}
    for loss in LOSSES:
        rows = [r for r in results if r["loss"] == loss]
        summary[loss] = {key: (float(np.mean([r[key] for r in rows])),
                                    float(np.std([r[key] for r in rows], ddof=1)) if len(rows) > 1 else float("nan"))
                              for key in rows[0] if isinstance(rows[0][key], float)}
    return summary


def table(summary, n_seeds):
    """Markdown: one row per loss, mean +- std over seeds."""
    keys = ["ce", "ppl", "ce_high", "ce_medium", "ce_low", "entropy"]
    lines = [f"| loss (n = {n_seeds} seeds) | val CE | val ppl | CE high | CE medium | CE low | mean entropy | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for loss, s in summary.items():
        cells = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" if k != "ppl" else f"{s[k][0]:.2f} ± {s[k][1]:.2f}" for k in keys]
        lines.append(f"| {LABELS[loss]} | " + " | ".join(cells) + f" | {s['seconds'][0] / 60:.1f} |")
    return "\n".join(lines)


def plot(args, runs, summary):
    """curves.png (validation CE during training), buckets.png (CE per bucket), weights.png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plots: they need matplotlib (pip install -r requirements-test.txt)")
        return
    from mile import focal_weights, mile_weights

    curves = {}  # loss -> (iterations, validation CE per seed and evaluation)
    for loss in LOSSES:
        per_seed = []
        for seed in args.seeds:
            with open(os.path.join(runs[loss, seed], "log.jsonl")) as f:
                evals = [r for r in map(json.loads, f) if "val_ce" in r]
            per_seed.append([r["val_ce"] for r in evals])
        curves[loss] = (np.array([r["iter"] for r in evals]), np.array(per_seed))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    base = curves["ce"][1].mean(0)
    for loss, (iters, ce) in curves.items():
        keep = iters >= iters[-1] / 8  # leave out the first evaluations, whose scale hides the rest
        a.plot(iters[keep], ce.mean(0)[keep], color=COLORS[loss], label=LABELS[loss])
        a.fill_between(iters[keep], ce.min(0)[keep], ce.max(0)[keep], color=COLORS[loss], alpha=0.2, lw=0)
        b.plot(iters[keep], (ce - base).mean(0)[keep], color=COLORS[loss], label=LABELS[loss])
        b.fill_between(iters[keep], (ce - base).min(0)[keep], (ce - base).max(0)[keep], color=COLORS[loss], alpha=0.2, lw=0)
    a.set(xlabel="iteration", ylabel="validation CE (nats)", title=f"validation CE (mean, range over {len(args.seeds)} seeds)")
    b.set(xlabel="iteration", ylabel="difference (nats)", title="minus CE's mean over seeds")
    b.axhline(0, color="black", lw=0.5)
    a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "curves.png"))

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    keys = ("ce", *(f"ce_{bucket}" for bucket in BUCKETS))
    x = np.arange(len(keys))
    for i, loss in enumerate(LOSSES):
        mean, std = np.array([summary[loss][k] for k in keys]).T
        a.bar(x + (i - 1) * 0.27, mean, 0.27, yerr=std, capsize=3, color=COLORS[loss], label=LABELS[loss])
        if loss != "ce":  # the difference of the seed means, with the two spreads combined
            ce_mean, ce_std = np.array([summary["ce"][k] for k in keys]).T
            b.bar(x + (i - 1.5) * 0.35, mean - ce_mean, 0.35, yerr=np.hypot(std, ce_std), capsize=3,
                  color=COLORS[loss], label=LABELS[loss])
    for ax in (a, b):
        ax.set_xticks(x, ["all tokens", "high freq.", "medium freq.", "low freq."])
    a.set(ylabel="validation CE (nats)", title="CE by training-frequency bucket (80/15/5% of tokens)")
    b.set(ylabel="difference (nats)", title="minus CE (error bars: both seed spreads)")
    b.axhline(0, color="black", lw=0.5)
    a.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "buckets.png"))

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    p, H = torch.linspace(0, 1, 201), torch.linspace(0, 5, 201)
    for gamma in (0.5, 1.0, 2.0):
        a.plot(p, focal_weights(-torch.log(p.clamp(min=1e-12)), gamma), label=f"gamma {gamma}")
        b.plot(H, mile_weights(H, gamma), label=f"gamma {gamma}")
    a.set(xlabel="probability of the target", ylabel="weight", title="Focal: (1 - p) ** gamma")
    b.set(xlabel="entropy of the prediction (nats)", ylabel="weight", title="MiLe: (1 + H) ** gamma")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out_dir, "weights.png"))
    plt.close("all")


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # passed on to train.py
    argv = argv[:argv.index("--")] if "--" in argv else argv
    refuse_renamed(argv, {"--eval_batches": "--eval_iters, as in train.py and buckets.py"})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], allow_abbrev=False,
                                     epilog="Arguments after -- go to every train.py run.")
    parser.add_argument("--setting", default="cpu", choices=SETTINGS, help="cpu (default) or gpu")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default: 1,2,3)")
    parser.add_argument("--out_dir", default="", help="default: out-compare-<setting>")
    parser.add_argument("--eval_iters", type=int, default=200, help="validation batches for the final table")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, like 1,2,3, not {args.seeds!r}")
    if len(args.seeds) < 2 or args.eval_iters < 1:
        parser.error("give at least two seeds (a spread needs them) and --eval_iters of at least 1")
    args.out_dir = args.out_dir or f"out-compare-{args.setting}"
    os.makedirs(args.out_dir, exist_ok=True)

    t0 = time.time()
    runs = train_runs(args, extra)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for (loss, seed), out in runs.items():
        stats = evaluate_checkpoint(out, args.eval_iters, device, seed=0)  # the same batches for every run
        with open(os.path.join(out, "done.json")) as f:
            stats["seconds"] = float(json.load(f)["seconds"])
        results.append({"loss": loss, "seed": seed, **stats})
    summary = summarize(results)
    text = table(summary, len(args.seeds))
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"setting": args.setting, "train_args": SETTINGS[args.setting] + extra, "seeds": args.seeds,
                   "eval_iters": args.eval_iters, "runs": results, "summary": summary}, f, indent=1)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    plot(args, runs, summary)
    print(text)
    print(f"\n{args.out_dir}: results.md, results.json, curves.png, buckets.png, weights.png "
          f"({(time.time() - t0) / 60:.1f} min)")
    mile, ce = summary["mile"], summary["ce"]
    for key in ("ce", "ce_high", "ce_low"):
        spread = math.hypot(mile[key][1], ce[key][1])
        print(f"MiLe - CE, {key}: {mile[key][0] - ce[key][0]:+.4f} (combined std {spread:.4f})")


if __name__ == "__main__":
    main()
