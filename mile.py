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

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("ce", "focal", "mile")

# -----------------------------------------------------------------------------
# the readable losses: the reference every faster path is tested against


def token_entropy(logits):
    """H_i = -sum_v q_iv log q_iv with q_i = clamp(softmax(z_i), 1e-8, 1), detached, float32."""
    q = F.softmax(logits.detach().float(), dim=-1).clamp(min=1e-8, max=1.0)  # q_i
    return -(q * q.log()).sum(dim=-1)  # H_i


def mile_weights(entropy, gamma=1.0, sigma=1.0):
    """w_i = (sigma + H_i) ** gamma."""
    return (sigma + entropy) ** gamma


def focal_weights(ce, gamma=1.0):
    """w_i = (1 - pt_i) ** gamma with pt_i = exp(-CE_i), detached."""
    pt = torch.exp(-ce.detach())  # pt_i, the probability of the target
    return (1.0 - pt) ** gamma


def normalizer(weights):
    """alpha = 1 / mean_i(w_i); under torch.distributed, the mean over ranks of each rank's alpha."""
    alpha = 1.0 / weights.mean()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(alpha, op=dist.ReduceOp.SUM)  # sum of the per-rank reciprocals ...
        alpha = alpha / dist.get_world_size()  # ... divided by the world size
    return alpha


def _flatten(logits, targets, ignore_index):
    """(B, T, V) or (N, V) logits -> float32 (n, V) logits and (n,) targets of the kept positions."""
    logits = logits.reshape(-1, logits.size(-1)).float()
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    return logits[keep], targets[keep]


def cross_entropy_loss(logits, targets, ignore_index=-1):
    """Plain mean cross-entropy over the kept positions, in float32."""
    logits, targets = _flatten(logits, targets, ignore_index)
    return F.cross_entropy(logits, targets)


def mile_loss(logits, targets, gamma=1.0, sigma=1.0, ignore_index=-1):
    """MiLe: mean_i(alpha * w_i * CE_i) with w_i = (sigma + H_i) ** gamma, alpha = 1 / mean(w)."""
    logits, targets = _flatten(logits, targets, ignore_index)
    ce = F.cross_entropy(logits, targets, reduction="none")  # CE_i
    w = mile_weights(token_entropy(logits), gamma, sigma)  # w_i, no gradient
    alpha = normalizer(w)  # alpha, no gradient
    return (alpha * w * ce).mean()  # L


def focal_loss(logits, targets, gamma=1.0, ignore_index=-1):
    """Focal: mean_i(alpha * w_i * CE_i) with w_i = (1 - exp(-CE_i)) ** gamma, alpha = 1 / mean(w)."""
    logits, targets = _flatten(logits, targets, ignore_index)
    ce = F.cross_entropy(logits, targets, reduction="none")  # CE_i
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
