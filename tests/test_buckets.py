"""Frequency-bucket evaluation (buckets.py): bucket assignment, bucket losses against the overall
loss, the figures train.py logs, and the standalone command."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

import warm
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from conftest import sum_tolerance  # noqa: E402
from buckets import evaluate_buckets, frequency_buckets  # noqa: E402
from mile import token_entropy  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def test_buckets_split_the_training_mass_80_15_5():
    # 100 training tokens: ids 0,1 make 80 of them, ids 2,3 the next 15, the rest 5 (id 6 never seen)
    counts = np.array([50, 30, 10, 5, 3, 2, 0])
    assert frequency_buckets(counts).tolist() == [0, 0, 1, 1, 2, 2, 2]
    perm = np.random.default_rng(0).permutation(len(counts))  # the ids do not matter, the counts do
    assert frequency_buckets(counts[perm]).tolist() == frequency_buckets(counts)[perm].tolist()
    # a token is in the bucket where its share starts: 79 before it -> high, although it ends at 89
    assert frequency_buckets(np.array([79, 10, 6, 5])).tolist() == [0, 0, 1, 2]
    # ties are broken by id; one token with 95% of the mass leaves "medium" empty
    assert frequency_buckets(np.array([5, 80, 5, 5, 5])).tolist() == [1, 0, 1, 1, 2]
    assert frequency_buckets(np.array([1, 95, 1, 1, 1, 1])).tolist() == [2, 0, 2, 2, 2, 2]


def test_buckets_hold_80_15_5_percent_of_a_zipf_corpus():
    counts = (1e6 / np.arange(1, 5001) ** 1.1).astype(np.int64)
    bucket = frequency_buckets(counts)
    mass = [counts[bucket == b].sum() / counts.sum() for b in range(3)]
    assert 0.80 <= mass[0] < 0.80 + counts[0] / counts.sum()
    assert mass[0] + mass[1] >= 0.95 and mass[2] <= 0.05 + 1e-3
    assert (np.diff(bucket[np.argsort(-counts, kind="stable")]) >= 0).all()  # more frequent, never a higher bucket


@pytest.mark.parametrize("chunk", [7, 512])
def test_bucket_losses_average_back_to_the_overall_loss(chunk):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32)).eval()
    model.configure_run(loss_chunk_size=chunk)  # evaluation's rows of logits at a time
    batches = [(torch.randint(50, (3, 16)), torch.randint(50, (3, 16))) for _ in range(4)]
    bucket_of = torch.from_numpy(frequency_buckets(np.arange(50) ** 2))
    stats = evaluate_buckets(model, batches, bucket_of)
    shares = [stats[f"share_{b}"] for b in ("high", "medium", "low")]
    f64 = sum_tolerance(3, torch.float64)  # the statistics are float64 sums of three buckets
    assert sum(shares) == pytest.approx(1.0, rel=f64) and min(shares) > 0
    assert sum(s * stats[f"ce_{b}"] for s, b in zip(shares, ("high", "medium", "low"))) == pytest.approx(stats["ce"], rel=4 * f64)
    # against the full logits
    with torch.no_grad():
        logits = torch.cat([model.lm_head(model.hidden(X)) for X, _ in batches]).flatten(0, 1)
    Y = torch.cat([Y for _, Y in batches]).flatten()
    ce = F.cross_entropy(logits, Y, reduction="none")
    # the same float32 terms (V = 50 a row, 32 features a logit) in chunks, averaged over 192 positions
    tol = sum_tolerance(2 * 50 + 32 + 192)
    assert stats["ce"] == pytest.approx(ce.mean().item(), rel=tol)
    assert stats["ppl"] == pytest.approx(math.exp(stats["ce"]), rel=f64)
    assert stats["entropy"] == pytest.approx(token_entropy(logits).mean().item(), rel=tol)
    for k, b in enumerate(("high", "medium", "low")):
        assert stats[f"ce_{b}"] == pytest.approx(ce[bucket_of[Y] == k].mean().item(), rel=tol)


def test_train_logs_the_buckets_and_evaluate_reproduces_them(tmp_path):
    out = tmp_path / "out"
    run = lambda *a: warm.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True, timeout=600)
    proc = run("train.py", f"--out_dir={out}", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
               "--batch_size=4", "--max_iters=20", "--eval_interval=10", "--eval_iters=3", "--log_interval=5")
    assert proc.returncode == 0, proc.stderr
    assert "val ce by frequency: high " in proc.stdout
    evals = [r for r in map(json.loads, open(out / "log.jsonl")) if "val_ce" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20]
    last = evals[-1]
    f64 = sum_tolerance(3, torch.float64)
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_ce"]), rel=f64)
    assert sum(last[f"val_share_{b}"] * last[f"val_ce_{b}"] for b in ("high", "medium", "low")) == pytest.approx(last["val_ce"], rel=4 * f64)
    assert last["val_ce_high"] < last["val_ce_medium"] < last["val_ce_low"]  # rare characters are harder
    assert 0 < last["val_entropy"] < math.log(84)
    # the standalone command on the checkpoint: the same batches, the same figures; more batches differ
    proc = run("buckets.py", str(out), str(out), "--eval_iters=6")
    assert proc.returncode == 0, proc.stderr
    proc = run("buckets.py", str(out))
    assert proc.returncode == 0, proc.stderr
    row = f"| {out} | {last['val_ce']:.3f} ({last['val_ppl']:.2f}) | {last['val_ce_high']:.3f} ({last['val_ppl_high']:.2f}) | "
    assert row in proc.stdout, proc.stdout
    proc = run("buckets.py", str(tmp_path / "nothing"))
    assert proc.returncode == 1 and "error: no checkpoint at" in proc.stderr and "Traceback" not in proc.stderr
