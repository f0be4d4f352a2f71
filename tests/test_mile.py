"""The readable losses of mile.py against the formulas, by hand and by an independent transcription."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import sum_tolerance  # noqa: E402
from mile import build_loss, clamped_entropy, cross_entropy_loss, entropy, focal_loss, mile_loss, token_entropy  # noqa: E402


def authors_mile(logits, targets, gamma, sigma=1.0):
    """MiLe as the authors' code writes it (docs/mile.md), with no ignored positions."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    p = torch.clamp(torch.softmax(logits.detach(), dim=-1), min=1e-8, max=1.0)
    entropy = torch.sum(-p * torch.log(p), dim=-1)
    weight = torch.pow(sigma + entropy, gamma)
    alpha = 1.0 / torch.mean(weight)
    return torch.mean(alpha * weight * ce)


def authors_focal(logits, targets, gamma):
    ce = F.cross_entropy(logits, targets, reduction="none")
    pt = torch.exp(-ce).detach()
    weight = torch.pow(1 - pt, gamma)
    alpha = 1.0 / torch.mean(weight)
    return torch.mean(alpha * weight * ce)


def value_and_grad(fn, logits, targets):
    z = logits.clone().requires_grad_(True)
    loss = fn(z, targets)
    loss.backward()
    return loss.detach(), z.grad


@pytest.mark.parametrize("V", [2, 17, 1000, 32000])
@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_matches_authors_code(V, scale, gamma):
    g = torch.Generator().manual_seed(V * 100 + int(scale * 10) + int(gamma * 7))
    N = 64 if V < 32000 else 16
    logits = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, V, (N,), generator=g)
    for ours, theirs in [
        (lambda z, y: mile_loss(z, y, gamma=gamma), lambda z, y: authors_mile(z.float(), y, gamma)),
        (lambda z, y: focal_loss(z, y, gamma=gamma), lambda z, y: authors_focal(z.float(), y, gamma)),
    ]:
        v1, g1 = value_and_grad(ours, logits, targets)
        v2, g2 = value_and_grad(theirs, logits, targets)
        assert v1.dtype == torch.float32
        # float32 both: each CE_i and H_i sums V terms, the loss N of them
        tol = sum_tolerance(V + N)
        torch.testing.assert_close(v1, v2, rtol=tol, atol=0)
        torch.testing.assert_close(g1, g2, rtol=2 * tol, atol=2 * tol * g2.abs().max().item())


def test_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(4, 8, 50, generator=g) * 3, torch.randint(0, 50, (4, 8), generator=g)
    tol = sum_tolerance(50 + 32)  # the same float32 arithmetic, summed in another order at most
    for fn in (lambda z, y: mile_loss(z, y, gamma=0.0), lambda z, y: focal_loss(z, y, gamma=0.0)):
        v1, g1 = value_and_grad(fn, logits, targets)
        v2, g2 = value_and_grad(lambda z, y: F.cross_entropy(z.view(-1, 50), y.view(-1)), logits, targets)
        torch.testing.assert_close(v1, v2, rtol=tol, atol=0)
        torch.testing.assert_close(g1, g2, rtol=tol, atol=tol * g2.abs().max().item())


def test_hand_computed_example():
    # two positions, three classes; every number below is worked out with math, not torch, in float64:
    # float32 errs from it by a few roundings of sums of 3 terms
    rel = sum_tolerance(3 * 2 + 4)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    p0 = [math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2), 1 / (math.exp(2) + 2)]
    p1 = [1 / 3] * 3
    ce = [-math.log(p0[0]), math.log(3)]
    H = [-sum(p * math.log(p) for p in p0), math.log(3)]
    # MiLe, gamma 1: w = 1 + H, alpha = 1 / mean(w), L = mean(alpha w CE) = sum(w CE) / sum(w)
    w = [1 + h for h in H]
    expected_mile = (w[0] * ce[0] + w[1] * ce[1]) / (w[0] + w[1])
    assert mile_loss(logits, targets).item() == pytest.approx(expected_mile, rel=rel)
    # MiLe, gamma 2, sigma 0.5
    w2 = [(0.5 + h) ** 2 for h in H]
    expected_mile2 = (w2[0] * ce[0] + w2[1] * ce[1]) / (w2[0] + w2[1])
    assert mile_loss(logits, targets, gamma=2.0, sigma=0.5).item() == pytest.approx(expected_mile2, rel=rel)
    # Focal, gamma 1: w = 1 - pt
    wf = [1 - p0[0], 1 - p1[2]]
    expected_focal = (wf[0] * ce[0] + wf[1] * ce[1]) / (wf[0] + wf[1])
    assert focal_loss(logits, targets).item() == pytest.approx(expected_focal, rel=rel)
    assert cross_entropy_loss(logits, targets).item() == pytest.approx(sum(ce) / 2, rel=rel)
    # the entropy clamp: a probability below 1e-8 counts as 1e-8
    tiny = torch.tensor([[0.0, -40.0]])  # p = (1, 4.2e-18)
    assert token_entropy(tiny).item() == pytest.approx(-1e-8 * math.log(1e-8), rel=rel)


@pytest.mark.parametrize("name", ["mile", "focal"])
def test_gradient_is_alpha_w_p_minus_onehot_over_n(name):
    g = torch.Generator().manual_seed(1)
    N, V = 32, 40
    logits, targets = torch.randn(N, V, generator=g) * 4, torch.randint(0, V, (N,), generator=g)
    _, grad = value_and_grad(build_loss(name, gamma=1.0), logits, targets)
    p = torch.softmax(logits, dim=-1)
    ce = F.cross_entropy(logits, targets, reduction="none")
    w = 1 + token_entropy(logits) if name == "mile" else 1 - torch.exp(-ce)
    alpha = 1 / w.mean()
    expected = alpha * w[:, None] * (p - F.one_hot(targets, V)) / N
    tol = sum_tolerance(2 * V + N)  # p and H sum V terms each, alpha N
    torch.testing.assert_close(grad, expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_bf16_input_gets_float32_math():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(64, 300, generator=g) * 5).bfloat16()
    targets = torch.randint(0, 300, (64,), generator=g)
    for name in ("ce", "focal", "mile"):
        fn = build_loss(name)
        loss_bf16 = fn(logits, targets)
        assert loss_bf16.dtype == torch.float32
        assert torch.equal(loss_bf16, fn(logits.float(), targets))  # the same numbers as upcasting first
        z = logits.clone().requires_grad_(True)
        fn(z, targets).backward()
        assert z.grad.dtype == torch.bfloat16  # the gradient comes back in the input's dtype


def test_ignore_index_leaves_positions_out_of_both_means():
    g = torch.Generator().manual_seed(3)
    logits, targets = torch.randn(2, 10, 30, generator=g) * 2, torch.randint(0, 30, (2, 10), generator=g)
    ignored = targets.clone()
    ignored[0, :4] = -1
    ignored[1, 7] = -1
    keep = ignored != -1
    tol = sum_tolerance(30 + 20)  # the same terms, summed in another order at most
    for name in ("ce", "focal", "mile"):
        fn = build_loss(name, gamma=1.5)
        v1, g1 = value_and_grad(fn, logits, ignored)
        v2, _ = value_and_grad(fn, logits[keep], targets[keep])
        torch.testing.assert_close(v1, v2, rtol=tol, atol=0)
        assert torch.all(g1[~keep] == 0)  # ignored positions get no gradient
    # another ignore_index value works the same way
    other = torch.where(keep, targets, torch.full_like(targets, -100))
    torch.testing.assert_close(mile_loss(logits, other, ignore_index=-100), mile_loss(logits, ignored), rtol=tol, atol=0)


def test_shapes_btv_and_nv_agree():
    g = torch.Generator().manual_seed(4)
    logits, targets = torch.randn(3, 5, 11, generator=g), torch.randint(0, 11, (3, 5), generator=g)
    for name in ("ce", "focal", "mile"):
        fn = build_loss(name)
        torch.testing.assert_close(fn(logits, targets), fn(logits.view(15, 11), targets.view(15)), rtol=0, atol=0)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="choose one of ce, focal, mile"):
        build_loss("mse")


def authors_entropy(logits):
    """The authors' clamped entropy: -sum_v q log q with q = clamp(softmax(z), 1e-8, 1)."""
    q = torch.clamp(torch.softmax(logits, dim=-1), min=1e-8, max=1.0)
    return torch.sum(-q * torch.log(q), dim=-1)


EPS32 = torch.finfo(torch.float32).eps


def entropy_tolerance(logits):
    """How far a float32 entropy of each row may be from the exact one, from the arithmetic: the sum of V
    terms errs by at most V * eps * sum_v |q log q| (the worst case of any summation order), and the
    log-sum-exp's own sum of V terms shifts every log p by at most V * eps, which moves H by that much
    times |1 - H| <= 1 + H. The terms themselves are rounded once or twice each (a few eps of each)."""
    V = logits.size(-1)
    exact = authors_entropy(logits.double())
    return V * EPS32 * (exact.abs() * 2 + 1) + 4 * EPS32 * exact.abs()


@pytest.mark.parametrize("compiled", [False, True])
def test_entropy_forms_are_the_authors_clamp(compiled):
    # rows from uniform to confident (nearly every probability far below 1e-8, where the clamp decides)
    g = torch.Generator().manual_seed(6)
    V = 5000
    logits = torch.randn(48, V, generator=g) * torch.linspace(0.1, 40, 48)[:, None]
    assert (torch.softmax(logits[-1], -1) < 1e-8).float().mean() > 0.9  # the clamp matters in the last rows
    exact = authors_entropy(logits.double())  # the same float32 inputs, the arithmetic in float64
    tolerance = entropy_tolerance(logits)
    forms = {"readable": token_entropy, "fused": lambda z: clamped_entropy(torch.log_softmax(z, -1)),
             "authors": authors_entropy}
    for name, form in forms.items():
        form = torch.compile(form, dynamic=False) if compiled else form
        H = form(logits)
        assert H.dtype == torch.float32
        error = (H.double() - exact).abs()
        assert (error <= tolerance).all(), f"{name}: {error.max():.3g} over a tolerance of {tolerance.min():.3g}"
    # the rows whose entropy is nearly all clamp (V * 1e-8 * 18.4 = 9.2e-4 nats): without it they miss by more
    # than the tolerance
    confident = exact < 2e-3
    unclamped = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    assert confident.sum() >= 3 and ((unclamped.double() - exact).abs() > tolerance)[confident].all()


def test_readable_entropy_is_the_formula():
    """entropy(log p) is the definition written out: clamp p, then -sum q log q, and nothing flows back."""
    log_p = torch.log_softmax(torch.tensor([[0.0, -40.0, 1.0], [2.0, 2.0, 2.0], [0.0, -18.0, -19.0]]), -1)
    q = log_p.exp().clamp(1e-8, 1.0)
    # log q in float32 takes one rounding of each of 3 terms
    torch.testing.assert_close(entropy(log_p), -(q * q.log()).sum(-1), rtol=sum_tolerance(3 + 3), atol=0)
    z = torch.randn(4, 7, requires_grad=True)
    assert not token_entropy(z).requires_grad


@pytest.mark.parametrize("name", ["ce", "focal", "mile"])
def test_readable_losses_compile_to_one_graph(name):
    # a graph break (x[keep] has a data-dependent shape) would keep float32 (N, V) tensors alive between
    # graphs: 4x the bf16 logits for MiLe. One graph lets torch.compile fuse the loss like cross-entropy.
    g = torch.Generator().manual_seed(7)
    logits, targets = torch.randn(64, 300, generator=g) * 3, torch.randint(0, 300, (64,), generator=g)
    targets[::7] = -1
    torch._dynamo.reset()
    explained = torch._dynamo.explain(build_loss(name, gamma=1.5))(logits, targets)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("name", ["ce", "focal", "mile"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_losses_match_readable(name, dtype):
    """The full path on a GPU: the readable loss over the logits, torch.compile'd (value and gradient),
    with ignored positions and gamma 1 and 2."""
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(2, 40, 500, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 500, (2, 40), generator=g)
    targets[0, :9] = -1
    torch._dynamo.reset()
    for gamma in (1.0,) if name == "ce" else (1.0, 2.0):  # each gamma compiles anew; CE has none (gamma 0 = CE: tested eager)
        fn = build_loss(name, gamma=gamma)
        v1, g1 = value_and_grad(fn, logits, targets)
        v2, g2 = value_and_grad(torch.compile(fn, dynamic=False), logits, targets)
        assert v2.dtype == torch.float32 and g2.dtype == dtype
        # the compiler sums in its own order (the same float32 terms: V a row, N rows); a bf16 gradient is
        # then rounded once, so the two may also land one bf16 step apart
        tol = sum_tolerance(500 + 80)
        torch.testing.assert_close(v2, v1, rtol=tol, atol=0)
        rtol = tol if dtype == torch.float32 else tol + torch.finfo(dtype).eps
        torch.testing.assert_close(g2.float(), g1.float(), rtol=rtol, atol=rtol * g1.float().abs().max().item())
        assert torch.all(g2[0, :9] == 0)
