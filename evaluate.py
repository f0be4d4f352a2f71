"""
Frequency-bucket evaluation: how well a model predicts frequent, medium and rare tokens.

The paper's motivating diagnostic: per-token loss grows sharply from frequent to rare tokens, and
MiLe aims to shrink that gap. Tokens are bucketed by their frequency in the training split:
"high" = the most frequent tokens that together make up 80% of all training tokens, "medium" = the
next 15%, "low" = the last 5% (and tokens never seen in training). Each validation position counts
in the bucket of its target token.

train.py logs these figures at every evaluation; this command computes them for any checkpoints,
on the same fixed validation batches train.py uses (or more of them), and prints a table:

    python evaluate.py                                  # out/ckpt.pt
    python evaluate.py out out-ce out-focal --eval_iters=200
"""

import argparse
import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch

from data.common import dataset_dir, get_windows, train_token_counts
from model import GPT, GPTConfig, load_checkpoint

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
def evaluate_buckets(model, batches, bucket_of):
    """Plain cross-entropy and perplexity over all the positions of `batches` ((X, Y) pairs), and in
    each frequency bucket; the mean entropy of the predictions; each bucket's share of the positions.
    bucket_of: (vocab_size,) bucket of every token id (frequency_buckets), a tensor on the device.
    Overall CE = sum over buckets of share * bucket CE."""
    n = torch.zeros(len(BUCKETS), dtype=torch.float64)
    ce_sum = torch.zeros(len(BUCKETS), dtype=torch.float64)
    entropy_sum = 0.0
    for X, Y in batches:
        ce, entropy = model.token_stats(X, Y)
        bucket = bucket_of[Y].flatten()
        n += torch.bincount(bucket, minlength=len(BUCKETS)).cpu()
        ce_sum += torch.bincount(bucket, weights=ce.flatten().double(), minlength=len(BUCKETS)).cpu()
        entropy_sum += entropy.double().sum().item()
    total = n.sum().item()
    stats = {"ce": ce_sum.sum().item() / total, "entropy": entropy_sum / total}
    for k, name in enumerate(BUCKETS):
        stats[f"ce_{name}"] = ce_sum[k].item() / n[k].item() if n[k] else float("nan")
        stats[f"share_{name}"] = n[k].item() / total
    for key in [k for k in stats if k.startswith("ce")]:
        stats["ppl" + key[2:]] = math.exp(min(stats[key], 700.0))  # exp overflows past ~709
    return stats


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
    """The bucket statistics of out_dir/ckpt.pt on the fixed validation batches of its train.py run
    (eval_iters of them; drawn with another seed to put runs of different seeds on the same batches)."""
    checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), "name the directory that holds ckpt.pt "
                                 "(python evaluate.py DIR)")
    config = checkpoint["config"]
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    model.eval().to(device)
    data_dir = dataset_dir(config["dataset"])
    if not os.path.exists(os.path.join(data_dir, "meta.pkl")):
        sys.exit(f"error: the checkpoint in {out_dir} was trained on {config['dataset']!r}, which is not prepared "
                 f"here (no {data_dir}/meta.pkl); prepare it as train.py does, then run again")
    bucket_of = torch.from_numpy(frequency_buckets(train_token_counts(data_dir, checkpoint["meta"]))).to(device)
    batches = []
    for k in range(eval_iters or config["eval_iters"]):
        w = torch.from_numpy(get_windows(data_dir, "val", config["seed"] if seed is None else seed, None, k, config["batch_size"],
                                         config["block_size"])).to(device)
        batches.append((w[:, :-1], w[:, 1:]))
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported(including_emulation=False)
    with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext():
        return evaluate_buckets(model, batches, bucket_of)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("out_dirs", nargs="*", default=["out"], help="directories holding ckpt.pt (default: out)")
    parser.add_argument("--eval_iters", type=int, default=0,
                        help="validation batches; 0 uses the run's own eval_iters, so the figures match its log")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    args = parser.parse_args()
    if args.eval_iters < 0:
        parser.error("--eval_iters must not be negative")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available() or device == "mps" and not torch.backends.mps.is_available():
        sys.exit(f"error: device {device} asked for, but this PyTorch does not see it; use --device=cpu")
    rows = [(out_dir, evaluate_checkpoint(out_dir, args.eval_iters, device)) for out_dir in args.out_dirs]
    print(format_table(rows))
