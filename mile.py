"""
The MiLe loss (Su et al., "MiLe Loss: a New Loss for Mitigating the Bias of Learning
Difficulties in Generative Language Models", NAACL 2024 Findings, arXiv 2310.19531),
its Focal-loss baseline, and plain cross-entropy, written to be read against the formulas.

For one predicted position i with logits z_i over the vocabulary and target y_i:

    p_i     = softmax(z_i)
    CE_i    = -log p_i[y_i]
    q_i     = clamp(p_i, 1e-8, 1), from detached logits      (no gradient through q)
    H_i     = -sum_v q_iv log q_iv                            (entropy of the prediction, nats)
    w_i     = (sigma + H_i) ** gamma                          (sigma = 1, gamma = 1 in the paper)
    alpha   = 1 / mean_i(w_i)                                 (per micro-batch)
    L       = mean_i(alpha * w_i * CE_i)

Positions where the model is unsure (high entropy) weigh more; alpha keeps L on the scale of
cross-entropy. Because w and alpha carry no gradient, dL/dz_i = alpha * w_i * (p_i - onehot(y_i)) / N.

Focal loss (the paper's baseline) uses w_i = (1 - exp(-CE_i)) ** gamma with the same alpha.
Why entropy rather than the target's probability: with several valid next tokens ("I like
playing ___": football, chess, ...) the target's probability is low however good the model is,
so Focal keeps pushing it up; the entropy is high there too, but it measures how spread the
whole prediction is, not how much it missed this one target.

Conventions of this project (see ../shared/MILE_SPEC.md and the README):
- softmax, entropy and CE are computed in float32 whatever the dtype of the logits;
- positions whose target is ignore_index are left out of both means (alpha and L);
- under torch.distributed each rank computes its alpha, then alpha is all-reduced (sum) and
  divided by the world size: every rank uses the mean of the per-rank reciprocals, as the
  authors' code does.
"""

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("ce", "focal", "mile")
DEFAULT_CHUNK_SIZE = 512  # rows of logits per chunk in chunked_loss: chosen with bench.py, see the README

# -----------------------------------------------------------------------------
# the readable losses: the reference every faster path is tested against


def token_entropy(logits):
    """H_i = -sum_v q_iv log q_iv with q_i = clamp(softmax(z_i), 1e-8, 1), detached, float32."""
    q = F.softmax(logits.detach().float(), dim=-1).clamp_(min=1e-8, max=1.0)  # q_i (in place: one copy less)
    return torch.special.entr(q).sum(dim=-1)  # H_i; entr(q) = -q log q


def mile_weights(entropy, gamma=1.0, sigma=1.0):
    """w_i = (sigma + H_i) ** gamma."""
    return (sigma + entropy) ** gamma


def focal_weights(ce, gamma=1.0):
    """w_i = (1 - pt_i) ** gamma with pt_i = exp(-CE_i), detached."""
    pt = torch.exp(-ce.detach())  # pt_i, the probability of the target
    return (1.0 - pt) ** gamma


def normalizer(weights):
    """alpha = 1 / mean_i(w_i); under torch.distributed, the mean over ranks of each rank's alpha."""
    return mean_over_ranks(1.0 / weights.mean())


def mean_over_ranks(alpha):
    """Under torch.distributed: the sum of the per-rank values divided by the world size. This is a
    collective: once a process group exists, every rank must compute the loss together."""
    if dist.is_available() and dist.is_initialized():
        alpha = alpha.clone()
        dist.all_reduce(alpha, op=dist.ReduceOp.SUM)
        alpha = alpha / dist.get_world_size()
    return alpha


def _flatten(logits, targets):
    """(B, T, V) or (N, V) logits -> float32 (N, V) logits and (N,) targets."""
    return logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)


def cross_entropy_loss(logits, targets, ignore_index=-1):
    """Plain mean cross-entropy over the kept positions, in float32."""
    logits, targets = _flatten(logits, targets)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def mile_loss(logits, targets, gamma=1.0, sigma=1.0, ignore_index=-1):
    """MiLe: mean_i(alpha * w_i * CE_i) with w_i = (sigma + H_i) ** gamma, alpha = 1 / mean(w)."""
    logits, targets = _flatten(logits, targets)
    keep = targets != ignore_index  # the positions that count
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_index)[keep]  # CE_i
    w = mile_weights(token_entropy(logits), gamma, sigma)[keep]  # w_i, no gradient
    alpha = normalizer(w)  # alpha, no gradient
    return (alpha * w * ce).mean()  # L


def focal_loss(logits, targets, gamma=1.0, ignore_index=-1):
    """Focal: mean_i(alpha * w_i * CE_i) with w_i = (1 - exp(-CE_i)) ** gamma, alpha = 1 / mean(w)."""
    logits, targets = _flatten(logits, targets)
    keep = targets != ignore_index  # the positions that count
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_index)[keep]  # CE_i
    w = focal_weights(ce, gamma)  # w_i, no gradient
    alpha = normalizer(w)  # alpha, no gradient
    return (alpha * w * ce).mean()  # L


def build_loss(name, gamma=1.0, sigma=1.0, ignore_index=-1):
    """The training objective by name: a function (logits, targets) -> scalar loss."""
    if name == "ce":
        return lambda logits, targets: cross_entropy_loss(logits, targets, ignore_index)
    if name == "focal":
        return lambda logits, targets: focal_loss(logits, targets, gamma, ignore_index)
    if name == "mile":
        return lambda logits, targets: mile_loss(logits, targets, gamma, sigma, ignore_index)
    raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")


# -----------------------------------------------------------------------------
# the fast path: output layer plus loss in chunks, never materialising the (N, V) logits
#
# At GPT-2's vocabulary a micro-batch of 12 x 1024 tokens has 618M logits, 2.5 GB in float32, and the
# readable losses above keep several such tensors alive (logits, softmax, log-softmax, their gradient).
# Here the tokens are walked in chunks. Per chunk: the logits, the float32 softmax, the detached
# weights, the CE, and at once the gradient with respect to the chunk's logits, which goes straight
# into the gradients of the hidden states and of the output weight; then the chunk is dropped. This
# is exact because w and alpha carry no gradient: dL/dz_i = alpha * w_i * (p_i - onehot(y_i)) / n,
# so the sums can run with w_i alone and alpha / n, one scalar known after the last chunk (and after
# its all-reduce), scales everything at the end. Backward only multiplies by grad_output.

def chunk_loss_terms(logits, targets, loss, gamma, sigma, ignore_index):
    """One chunk of rows: (sum_i w_i CE_i, sum_i w_i, sum_i CE_i, w_i (p_i - onehot(y_i))) over the
    kept rows, the gradient in the dtype of the logits. Written as reductions and one elementwise
    expression, so that torch.compile makes a few fused kernels that keep p_i in registers."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # log sum_v exp z_iv
    p = torch.exp(z - lse)  # p_i
    keep = targets != ignore_index
    y = torch.where(keep, targets, 0)  # any valid index on ignored rows: they get w_i = 0 below
    ce = lse.squeeze(1) - z.gather(1, y[:, None]).squeeze(1)  # CE_i = log sum exp z_i - z_iy
    if loss == "mile":
        entropy = torch.special.entr(p.clamp(min=1e-8)).sum(dim=-1)  # H_i, as in token_entropy
        w = mile_weights(entropy, gamma, sigma)
    elif loss == "focal":
        w = focal_weights(ce, gamma)
    else:
        w = torch.ones_like(ce)
    w = torch.where(keep, w, 0.0)
    ce = torch.where(keep, ce, 0.0)
    grad = p * w[:, None]  # w_i p_i ...
    grad.scatter_add_(1, y[:, None], -w[:, None])  # ... - w_i onehot(y_i)
    return (w * ce).sum(), w.sum(), ce.sum(), grad.to(logits.dtype)


_compiled_terms = None  # chunk_loss_terms through torch.compile, made on first use


def _terms_fn(compiled):
    """The per-chunk function: compiled where torch.compile works, else (with a warning) eager."""
    global _compiled_terms
    if not compiled or _compiled_terms is False:
        return chunk_loss_terms
    if _compiled_terms is None:
        _compiled_terms = torch.compile(chunk_loss_terms)

    def terms(*args):
        global _compiled_terms
        try:
            return _compiled_terms(*args)
        except Exception as e:  # no compiler on this platform, an unsupported Python, ...
            warnings.warn(f"torch.compile failed ({type(e).__name__}); chunked loss falls back to eager")
            _compiled_terms = False
            return chunk_loss_terms(*args)
    return terms


class ChunkedHeadLoss(torch.autograd.Function):
    """loss(hidden @ weight.T, targets) for ce, focal or mile, one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, loss, gamma, sigma, ignore_index, chunk_size, compiled, need_grad):
        # the matmuls run in the autocast dtype when autocast is on (bf16 on GPUs), else in hidden's;
        # the loss math is float32 in chunk_loss_terms, the weight's gradient is summed in float32
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        with torch.autocast(device_type, enabled=False):
            W = weight.to(dtype)
            terms = _terms_fn(compiled)
            grad_hidden = torch.empty_like(hidden) if need_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
            wce_sum, w_sum, ce_sum = (torch.zeros((), device=hidden.device) for _ in range(3))
            for start in range(0, hidden.size(0), chunk_size):
                h = hidden[start:start + chunk_size].to(dtype)
                wce, w, ce, grad = terms(h @ W.t(), targets[start:start + chunk_size], loss, gamma, sigma, ignore_index)
                wce_sum += wce
                w_sum += w
                ce_sum += ce
                if need_grad:
                    grad_hidden[start:start + chunk_size] = grad @ W  # dL/dh = dL/dz W, up to alpha / n
                    # dL/dW = sum_i dL/dz_i h_i^T, up to alpha / n; in place when the dtypes allow
                    if h.dtype == torch.float32:
                        grad_weight.addmm_(grad.t(), h)
                    else:
                        grad_weight += grad.t() @ h
            n = (targets != ignore_index).sum()
            # alpha = 1 / mean_i(w_i) = n / sum_i w_i, averaged over ranks like normalizer(); 1 for CE
            alpha = torch.ones((), device=hidden.device) if loss == "ce" else mean_over_ranks(n / w_sum)
            scale = alpha / n
            if need_grad:
                ctx.save_for_backward(grad_hidden.mul_(scale.to(grad_hidden.dtype)), grad_weight.mul_(scale))
                ctx.weight_dtype = weight.dtype
        ce_mean = ce_sum / n
        ctx.mark_non_differentiable(ce_mean)
        return wce_sum * scale, ce_mean

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        # scale the stored gradients in place: no second (V, d) buffer; so this backward runs once only
        assert not getattr(ctx, "done", False), "chunked_loss supports one backward pass per forward"
        ctx.done = True
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def chunked_loss(hidden, weight, targets, loss="mile", gamma=1.0, sigma=1.0, ignore_index=-1,
                 chunk_size=DEFAULT_CHUNK_SIZE, compiled=True, return_ce=False):
    """The loss of the logits hidden @ weight.T, as ce, focal or mile (same semantics as the
    readable losses), computed chunk_size rows at a time. hidden (..., d), weight (V, d), targets (...).
    compiled: run the per-chunk math through torch.compile (falls back to eager where it fails).
    return_ce: also return the plain mean cross-entropy of the same logits (no gradient), for free."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    value, ce = ChunkedHeadLoss.apply(hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), loss,
                                      float(gamma), float(sigma), ignore_index, chunk_size, compiled, need_grad)
    return (value, ce) if return_ce else value
