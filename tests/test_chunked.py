"""mile.chunked_loss against the readable losses: value, and gradients for the hidden states and the
output weight, for ce, focal and mile, eager and compiled, float32 and bf16."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mile  # noqa: E402
from mile import build_loss, chunked_loss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_near(actual, expected, tol):
    """|actual - expected| <= tol * max|expected|, elementwise: relative to the tensor's scale."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f"error {err:.3g} is more than {tol} of the scale {scale:.3g}"


def make_inputs(N, d, V, dtype, seed, ignore=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g).to(dtype)
    weight = (torch.randn(V, d, generator=g) * 2 / d ** 0.5).to(dtype)  # logits of scale about 2
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore:
        targets[torch.randperm(N, generator=g)[: N // 5]] = -1
    return hidden, weight, targets


def readable(hidden, weight, targets, loss, gamma):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    value = build_loss(loss, gamma=gamma)(h @ w.t(), targets)
    value.backward()
    return value.detach(), h.grad, w.grad


def chunked(hidden, weight, targets, loss, gamma, **kw):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    value = chunked_loss(h, w, targets, loss=loss, gamma=gamma, **kw)
    value.backward()
    return value.detach(), h.grad, w.grad


def check(hidden, weight, targets, loss, gamma, **kw):
    tol = TOLERANCE[hidden.dtype]
    expected = readable(hidden, weight, targets, loss, gamma)
    actual = chunked(hidden, weight, targets, loss, gamma, **kw)
    assert actual[0].dtype == torch.float32
    assert actual[0].item() == pytest.approx(expected[0].item(), rel=tol)
    assert_near(actual[1], expected[1], tol)  # dL/dhidden
    assert_near(actual[2], expected[2], tol)  # dL/dweight


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, chunk_size", [(1000, 128), (256, 64), (300, 1024), (7, 1)])
def test_eager_matches_readable(loss, gamma, dtype, N, chunk_size):
    # many chunks with a short last one; an exact multiple; a single chunk; one row per chunk
    hidden, weight, targets = make_inputs(N, 48, 333, dtype, seed=N + int(gamma * 10))
    check(hidden, weight, targets, loss, gamma, chunk_size=chunk_size, compiled=False)


@pytest.fixture
def fresh_compile():
    torch._dynamo.reset()  # each test compiles anew: no cache limit hides a fallback to eager
    yield
    assert mile._compiled_terms is not False, "torch.compile failed and the chunked loss fell back to eager"


@pytest.mark.parametrize("loss", ["ce", "focal", "mile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matches_readable(fresh_compile, loss, dtype):
    hidden, weight, targets = make_inputs(1000, 48, 333, dtype, seed=11)
    check(hidden, weight, targets, loss, 1.0, chunk_size=128, compiled=True)


def test_compiled_gamma_two_at_a_large_vocabulary(fresh_compile):
    hidden, weight, targets = make_inputs(600, 64, 32000, torch.float32, seed=12)
    check(hidden, weight, targets, "mile", 2.0, chunk_size=256, compiled=True)


def test_no_ignored_positions_and_large_logits():
    hidden, weight, targets = make_inputs(500, 32, 1000, torch.float32, seed=13, ignore=False)
    check(hidden, weight * 5, targets, "mile", 1.0, chunk_size=100, compiled=False)  # logits of scale 10


def test_autocast_runs_the_matmuls_in_bf16():
    hidden, weight, targets = make_inputs(400, 32, 500, torch.float32, seed=14)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = mile.mile_loss(h1 @ w1.t(), targets)  # the logits are bf16 here
        actual = chunked_loss(hidden.clone().requires_grad_(True), weight, targets, chunk_size=64, compiled=False)
    assert actual.item() == pytest.approx(expected.item(), rel=2e-2)
    assert actual.item() != pytest.approx(mile.mile_loss(hidden @ weight.t(), targets).item(), rel=1e-6)


def test_ce_for_free_and_no_grad():
    hidden, weight, targets = make_inputs(300, 32, 200, torch.float32, seed=15)
    value, ce = chunked_loss(hidden, weight, targets, chunk_size=64, compiled=False, return_ce=True)
    logits = hidden @ weight.t()
    assert value.item() == pytest.approx(mile.mile_loss(logits, targets).item(), rel=1e-5)
    assert ce.item() == pytest.approx(mile.cross_entropy_loss(logits, targets).item(), rel=1e-5)
    assert not value.requires_grad  # nothing needed a gradient: none was computed
    with torch.no_grad():
        h = hidden.clone().requires_grad_(True)
        assert not chunked_loss(h, weight, targets, compiled=False).requires_grad


def test_gradient_scales_with_grad_output():
    hidden, weight, targets = make_inputs(200, 16, 100, torch.float32, seed=16)
    h = hidden.clone().requires_grad_(True)
    (3.0 * chunked_loss(h, weight, targets, chunk_size=50, compiled=False)).backward()
    _, expected, _ = readable(hidden, weight, targets, "mile", 1.0)
    assert_near(h.grad, 3.0 * expected, 1e-5)


def test_train_curve_chunked_matches_readable(tmp_path):
    """A short train.py run gives the same losses with the chunked and the readable head."""
    import subprocess
    logs = []
    for flag in ("True", "False"):
        out = tmp_path / flag
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}", f"--chunked_loss={flag}",
                        "--loss_chunk_size=100", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
                        "--batch_size=8", "--max_iters=20", "--eval_interval=10", "--eval_iters=2", "--log_interval=2"],
                       cwd=ROOT, check=True, capture_output=True, timeout=600)
        logs.append([json.loads(line) for line in open(out / "log.jsonl")])
    assert len(logs[0]) == len(logs[1]) > 10
    for a, b in zip(*logs):
        assert a["iter"] == b["iter"]
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4)


def test_entropy_clamp_is_reproduced():
    # confident rows (every other probability far below 1e-8) next to unsure ones: the 1e-8 clamp of
    # the reference raises the confident rows' entropy by about V * 1.8e-7 nats, and so their weight
    g = torch.Generator().manual_seed(17)
    V, d, N = 32000, 64, 64
    weight = torch.nn.functional.normalize(torch.randn(V, d, generator=g), dim=1)
    hidden = torch.randn(N, d, generator=g) * 0.1
    hidden[: N // 2] = 60 * weight[: N // 2]  # logit 60 for one class, at most about 30 for the rest
    targets = torch.randint(0, V, (N,), generator=g)
    entropy = mile.token_entropy(hidden @ weight.t())
    assert entropy[: N // 2].min() > 0.5 * V * 1e-8 * 18.4  # the clamp is what makes these rows' entropy
    check(hidden, weight, targets, "mile", 1.0, chunk_size=16, compiled=False)
