"""
Command: python buckets.py [DIR ...] [--eval_iters=N]; also a module train.py and compare.py import.

Frequency-bucket evaluation: how well a model predicts frequent, medium and rare tokens.

The paper's motivating diagnostic: per-token loss grows sharply from frequent to rare tokens, and
MiLe aims to shrink that gap. Tokens are bucketed by their frequency in the training split:
"high" = the most frequent tokens that together make up 80% of all training tokens, "medium" = the
next 15%, "low" = the last 5% (and tokens never seen in training). Each validation position counts
in the bucket of its target token.

train.py logs these figures at every evaluation; this command computes them for any checkpoints,
on the same fixed validation batches train.py uses (or more of them), and prints a table:

    python buckets.py                                   # out/ckpt.pt
    python buckets.py out out-ce out-focal --eval_iters=200
"""

import argparse
import math
import os

import numpy as np
import torch

import checkpoint
from data.common import check_dataset, dataset_dir, get_windows, train_token_counts
from system import autocast, fail, resolve_device, resolve_dtype

BUCKETS = ("high", "medium", "low")
CUTOFFS = (0.80, 0.95)  # cumulative shares of the training tokens where high and medium end


def frequency_buckets(counts, cutoffs=CUTOFFS):
    """Bucket of every token id (0 high, 1 medium, 2 low) from its count in the training split.

    Sort the vocabulary from most to least frequent (ties by id) and walk down it: a token is in
    the bucket where its share of the training tokens starts, i.e. "high" while the more frequent
    tokens make up less than 80%, then "medium" below 95%, then "low". So high is the smallest set
    of most frequent tokens reaching 80% of the mass. Tokens never seen in training are low."""
    counts = np.asarray(counts, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    before = (np.cumsum(counts[order]) - counts[order]) / counts.sum()  # share of the more frequent tokens
    bucket = np.empty(len(counts), dtype=np.int64)
    bucket[order] = np.searchsorted(np.array(cutoffs), before, side="right")
    bucket[counts == 0] = len(cutoffs)
    return bucket


@torch.no_grad()
def bucket_sums(model, batches, bucket_of):
    """What the statistics are made of, summed over all the positions of `batches` ((X, Y) pairs): per
    frequency bucket the positions and their cross-entropies, then the entropies of all positions, as a
    float64 tensor on the CPU. Sums add up over batches and over processes.
    bucket_of: (vocab_size,) bucket of every token id (frequency_buckets), a tensor on the device."""
    k = len(BUCKETS)
    sums = torch.zeros(2 * k + 1, dtype=torch.float64)
    for X, Y in batches:
        ce, entropy = model.token_stats(X, Y)
        bucket = bucket_of[Y].flatten()
        sums[:k] += torch.bincount(bucket, minlength=k).cpu()
        sums[k:2 * k] += torch.bincount(bucket, weights=ce.flatten().double(), minlength=k).cpu()
        sums[2 * k] += entropy.double().sum().item()
    return sums


def bucket_stats(sums):
    """From bucket_sums: plain cross-entropy and perplexity over all the positions and in each frequency
    bucket, each bucket's share of the positions, and the mean entropy of the predictions.
    Overall CE = sum over buckets of share * bucket CE."""
    k = len(BUCKETS)
    n, ce_sum, total = sums[:k], sums[k:2 * k], sums[:k].sum().item()
    stats = {"ce": ce_sum.sum().item() / total, "entropy": sums[2 * k].item() / total}
    for i, name in enumerate(BUCKETS):
        stats[f"ce_{name}"] = ce_sum[i].item() / n[i].item() if n[i] else float("nan")
        stats[f"share_{name}"] = n[i].item() / total
    for key in [k for k in stats if k.startswith("ce")]:
        stats["ppl" + key[2:]] = math.exp(min(stats[key], 700.0))  # exp overflows past ~709
    return stats


def evaluate_buckets(model, batches, bucket_of):
    """bucket_stats of batches, in one process."""
    return bucket_stats(bucket_sums(model, batches, bucket_of))


def format_table(rows):
    """rows: (name, stats) pairs -> a Markdown table of CE (perplexity) overall and per bucket."""
    lines = ["| checkpoint | val CE (ppl) | high | medium | low | mean entropy |", "|---|---|---|---|---|---|"]
    for name, s in rows:
        cells = [f"{s['ce' + k]:.3f} ({s['ppl' + k]:.2f})" for k in ("", "_high", "_medium", "_low")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['entropy']:.3f} |")
    share = rows[0][1]
    lines.append(f"\nshare of the validation positions: high {share['share_high']:.1%}, medium {share['share_medium']:.1%}, "
                 f"low {share['share_low']:.1%} (the buckets hold 80/15/5% of the training tokens)")
    return "\n".join(lines)


def evaluate_checkpoint(out_dir, eval_iters=None, device="cpu", seed=None):
    """The bucket statistics of out_dir's checkpoint on the fixed validation batches of its train.py run
    (eval_iters of them; drawn with another seed to put runs of different seeds on the same batches)."""
    model, ckpt = checkpoint.load_model(out_dir, device, "name the directory that holds ckpt.pt (python buckets.py DIR)")
    config = ckpt["config"]
    data_dir = dataset_dir(config["dataset"])
    if not os.path.exists(os.path.join(data_dir, "meta.pkl")):
        fail(f"the checkpoint in {out_dir} was trained on {config['dataset']!r}, which is not prepared here (no "
             f"{data_dir}/meta.pkl); prepare it as train.py does, then run again")
    try:
        check_dataset(data_dir, config["block_size"])  # the token files, checked as train.py checks them
    except ValueError as e:
        fail(str(e))
    bucket_of = torch.from_numpy(frequency_buckets(train_token_counts(data_dir, ckpt["meta"]))).to(device)
    batches = []
    for k in range(eval_iters or config["eval_iters"]):
        w = torch.from_numpy(get_windows(data_dir, "val", config["seed"] if seed is None else seed, None, k,
                                         config["batch_size"], config["block_size"])).to(device)
        batches.append((w[:, :-1], w[:, 1:]))
    with autocast(device, resolve_dtype("auto", device)):
        return evaluate_buckets(model, batches, bucket_of)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], allow_abbrev=False)
    parser.add_argument("out_dirs", nargs="*", default=["out"], help="run directories (ckpt.pt, or the sharded ckpt-N folders of torchrun; default: out)")
    parser.add_argument("--eval_iters", type=int, default=0,
                        help="validation batches; 0 uses the run's own eval_iters, so the figures match its log")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    args = parser.parse_args()
    if args.eval_iters < 0:
        parser.error("--eval_iters must not be negative")
    device = resolve_device(args.device)
    rows = [(out_dir, evaluate_checkpoint(out_dir, args.eval_iters, device)) for out_dir in args.out_dirs]
    print(format_table(rows))
