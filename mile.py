"""
Module: the losses, imported by model.py; read it first.

The MiLe loss (Su et al., "MiLe Loss: a New Loss for Mitigating the Bias of Learning
Difficulties in Generative Language Models", NAACL 2024 Findings, arXiv 2310.19531),
its Focal-loss baseline, and plain cross-entropy, written to be read against the formulas.

For one predicted position i with logits z_i over the vocabulary and target y_i
(the steps numbered as in docs/mile.md):

          p_i   = softmax(z_i)
          CE_i  = -log p_i[y_i]
    (1)   H_i   = -sum_v q_iv log q_iv,  q_i = clamp(p_i, 1e-8, 1)   (entropy of the prediction, nats,
                                                                      from detached logits: no gradient)
    (2)   w_i   = (sigma + H_i) ** gamma                             (sigma = 1, gamma = 1 in the paper)
    (3)   alpha = 1 / mean_i(w_i)                                    (per micro-batch)
    (4)   L     = mean_i(alpha * w_i * CE_i)

Positions where the model is unsure (high entropy) weigh more; alpha keeps L on the scale of
cross-entropy. Because w and alpha carry no gradient, dL/dz_i = alpha * w_i * (p_i - onehot(y_i)) / N.

Focal loss (the paper's baseline) uses w_i = (1 - exp(-CE_i)) ** gamma with the same alpha.
Why entropy rather than the target's probability: with several valid next tokens ("I like
playing ___": football, chess, ...) the target's probability is low however good the model is,
so Focal keeps pushing it up; the entropy is high there too, but it measures how spread the
whole prediction is, not how much it missed this one target.

The exact definition, as read from the authors' code (class InfoEntropyLoss, MiLe's earlier name, in
their utils/trainer.py), is docs/mile.md. Conventions of this project:
- softmax, entropy and CE are computed in float32 whatever the dtype of the logits;
- positions whose target is ignore_index are left out of both means (alpha and L);
- under torch.distributed each rank computes its alpha, then alpha is all-reduced (sum) and
  divided by the world size: every rank uses the mean of the per-rank reciprocals, as the
  authors' code does.
"""

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("ce", "focal", "mile")
EPS, LOG_EPS = 1e-8, math.log(1e-8)  # the authors' clamp of the probabilities in the entropy

# -----------------------------------------------------------------------------
# the readable losses: the reference every faster path is tested against (docs/mile.md numbers the steps)


def entropy(log_p):
    """Step 1: H_i = -sum_v q_iv log q_iv with q_i = clamp(p_i, 1e-8, 1), given log p_i (float32)."""
    q = log_p.exp().clamp(EPS, 1.0)  # q_iv
    log_q = log_p.clamp(LOG_EPS, 0.0)  # log q_iv: the log is monotone, so the clamp passes through it
    return -(q * log_q).sum(dim=-1)  # H_i


def token_entropy(logits):
    """H_i of every row of logits, from detached logits (no gradient flows through it), in float32."""
    return entropy(F.log_softmax(logits.detach(), dim=-1, dtype=torch.float32))


def mile_weights(H, gamma=1.0, sigma=1.0):
    """Step 2: w_i = (sigma + H_i) ** gamma."""
    return (sigma + H) ** gamma


def focal_weights(ce, gamma=1.0):
    """Focal's weight: w_i = (1 - pt_i) ** gamma with pt_i = exp(-CE_i), detached."""
    pt = torch.exp(-ce.detach())  # pt_i, the probability of the target
    return (1.0 - pt) ** gamma


def masked_mean(x, keep):
    """mean_i(x_i) over the positions that count (keep). A masked sum rather than x[keep], whose
    data-dependent shape would break torch.compile's graph (and keep (N, V) tensors alive between graphs)."""
    return torch.where(keep, x, 0.0).sum() / keep.sum()


def normalizer(weights, keep=None, group=None):
    """Step 3: alpha = 1 / mean_i(w_i) (over keep); with a process group (data parallelism), the mean over
    its processes of each one's alpha."""
    return mean_over_ranks(1.0 / (weights.mean() if keep is None else masked_mean(weights, keep)), group)


def mean_over_ranks(alpha, group=None):
    """The mean of alpha over the processes of group (torch.distributed), as the authors' code averages it;
    alpha itself without a group. With one, this is a collective: every process of the group must compute
    the loss together (train.py passes the group; a loss computed in one process alone passes none)."""
    if group is not None:
        alpha = alpha.clone()
        dist.all_reduce(alpha, op=dist.ReduceOp.SUM, group=group)
        alpha = alpha / dist.get_world_size(group)
    return alpha


def _flatten(logits, targets):
    """(B, T, V) or (N, V) logits -> float32 (N, V) logits and (N,) targets."""
    return logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1)


def cross_entropy_loss(logits, targets, ignore_index=-1):
    """Plain mean cross-entropy over the kept positions, in float32."""
    logits, targets = _flatten(logits, targets)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def mile_loss(logits, targets, gamma=1.0, sigma=1.0, ignore_index=-1, group=None):
    """Step 4, MiLe: L = mean_i(alpha * w_i * CE_i) with w_i = (sigma + H_i) ** gamma, alpha = 1 / mean(w)."""
    logits, targets = _flatten(logits, targets)
    keep = targets != ignore_index  # the positions that count: both means run over these
    log_p = F.log_softmax(logits, dim=-1)  # log p_i, shared by CE_i and H_i
    ce = F.nll_loss(log_p, targets, reduction="none", ignore_index=ignore_index)  # CE_i = -log p_i[y_i]
    w = mile_weights(entropy(log_p.detach()), gamma, sigma)  # w_i, no gradient
    alpha = normalizer(w, keep, group)  # alpha, no gradient
    return masked_mean(alpha * w * ce, keep)  # L


def focal_loss(logits, targets, gamma=1.0, ignore_index=-1, group=None):
    """Focal: L = mean_i(alpha * w_i * CE_i) with w_i = (1 - exp(-CE_i)) ** gamma, alpha = 1 / mean(w)."""
    logits, targets = _flatten(logits, targets)
    keep = targets != ignore_index  # the positions that count: both means run over these
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_index)  # CE_i
    w = focal_weights(ce, gamma)  # w_i, no gradient
    alpha = normalizer(w, keep, group)  # alpha, no gradient
    return masked_mean(alpha * w * ce, keep)  # L


def build_loss(name, gamma=1.0, sigma=1.0, ignore_index=-1, group=None):
    """The training loss by name: a function (logits, targets) -> scalar loss. group: the processes alpha is
    averaged over (data parallelism), or None."""
    if name == "ce":
        return lambda logits, targets: cross_entropy_loss(logits, targets, ignore_index)
    if name == "focal":
        return lambda logits, targets: focal_loss(logits, targets, gamma, ignore_index, group)
    if name == "mile":
        return lambda logits, targets: mile_loss(logits, targets, gamma, sigma, ignore_index, group)
    raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")


# -----------------------------------------------------------------------------
# the fast paths. Two ways to compute the training loss of hidden states (N, d) and an output layer (V, d):
# "full", the logits made whole and the readable loss above, which torch.compile fuses into a few kernels
# (the fastest on a GPU, when the (N, V) logits fit), or "chunked", chunked_loss below, which never holds
# more than one chunk of logits (the memory-lean path; on a CPU also the faster one). docs/chunked.md
# has the measurements behind the choice.

DEFAULT_CHUNK_SIZE = 512  # rows of logits per chunk on a CPU: the fastest there, with bench.py
CHUNK_LOGITS = 2 ** 27  # logits per chunk on a GPU, at most: 512 MiB of bf16 logits and their gradient
# what the full path holds at its peak, forward and backward, per logit (bytes), by whether it is compiled:
# measured with bench.py --dtype=bfloat16 (docs/chunked.md); compiled, little beyond the logits and their
# gradient; eager, the float32 copies of the readable loss too
FULL_BYTES_PER_LOGIT = {True: 4, False: 20}


def default_chunk_size(vocab, device_type):
    """Rows per chunk when none is given: 512 on a CPU; on a GPU the largest power of two with at most
    CHUNK_LOGITS logits (2048 rows at V = 50304, 4096 at V = 32000): few, large kernels, and a size that
    divides the usual batch x context, so one compiled graph serves every chunk."""
    if device_type != "cuda":
        return DEFAULT_CHUNK_SIZE
    return max(256, 2 ** ((CHUNK_LOGITS // vocab).bit_length() - 1))


def choose_loss_path(n_rows, vocab, device, path="auto", chunk_size=0, budget_bytes=None, compiled=False):
    """How to compute the loss of n_rows x vocab logits on device: ("full", chunk_size) or ("chunked",
    chunk_size). path "full" or "chunked" is taken as it is; "auto" is the fastest path that fits: on a
    GPU, full when the logits at FULL_BYTES_PER_LOGIT[compiled] fit in budget_bytes (default: a quarter of
    the GPU's memory), chunked otherwise; on a CPU, chunked. chunk_size 0: default_chunk_size for the device.
    train.py asks once, at start-up."""
    device = torch.device(device)
    if path not in ("auto", "full", "chunked"):
        raise ValueError(f"the loss path must be auto, full or chunked, not {path!r}")
    chunk_size = chunk_size or default_chunk_size(vocab, device.type)
    if path == "auto" and device.type == "cuda":
        if budget_bytes is None:
            budget_bytes = torch.cuda.get_device_properties(device).total_memory // 4
        path = "chunked" if n_rows * vocab * FULL_BYTES_PER_LOGIT[compiled] > budget_bytes else "full"
    return ("chunked" if path == "auto" else path), chunk_size


# The chunked path: output layer plus loss in chunks, never materialising the (N, V) logits.
# Per chunk: the logits, the float32 log-softmax, the detached weights, the CE, and at once the gradient
# with respect to the chunk's logits, which goes straight into the gradients of the hidden states and of
# the output weight; then the chunk is dropped. This is exact because w and alpha carry no gradient:
# dL/dz_i = alpha * w_i * (p_i - onehot(y_i)) / n, so the sums can run with w_i alone and alpha / n, one
# scalar known after the last chunk (and after its all-reduce), scales both gradients in backward.

def clamped_entropy(log_p):
    """entropy(log_p), fused: where p_iv >= 1e-8 the clamp leaves q_iv = p_iv and the term is p_iv log p_iv;
    below it, q_iv = 1e-8 and the term is the constant 1e-8 log 1e-8. So no log is taken and no clamped
    copy made: torch.compile fuses it into the reductions of the log-sum-exp; eager, it works in place on
    one temporary. tests/test_mile.py checks it against entropy()."""
    q_log_q = log_p.exp().mul_(log_p)  # p_iv log p_iv
    q_log_q.masked_fill_(log_p < LOG_EPS, EPS * LOG_EPS)  # the clamp
    return -q_log_q.sum(dim=-1)


def chunk_loss_terms(logits, targets, loss, gamma, sigma, ignore_index, need_grad=True):
    """One chunk of rows: the sums over its kept rows [sum_i w_i CE_i, sum_i w_i], and with
    need_grad w_i (p_i - onehot(y_i)) in the dtype of the logits. Reductions over each row and elementwise
    expressions only, so that torch.compile makes a few fused kernels that keep p_i in registers."""
    log_p = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # log p_i
    keep = targets != ignore_index
    y = torch.where(keep, targets, 0)  # any valid index on ignored rows: they get w_i = 0 below
    ce = -log_p.gather(1, y[:, None]).squeeze(1)  # CE_i
    if loss == "mile":
        w = mile_weights(clamped_entropy(log_p), gamma, sigma)
    elif loss == "focal":
        w = focal_weights(ce, gamma)
    else:
        w = torch.ones_like(ce)
    w = torch.where(keep, w, 0.0)
    sums = torch.stack([(w * ce).sum(), w.sum()])
    if not need_grad:
        return sums, None
    # onehot(y_i) as a comparison with the column index: compiled, it is never a tensor
    onehot = (torch.arange(logits.size(1), device=logits.device) == y[:, None]).float()
    grad = log_p.exp().sub_(onehot).mul_(w[:, None])  # w_i (p_i - onehot(y_i)), in place on one temporary
    return sums, grad.to(logits.dtype)


_compiled_terms = None  # chunk_loss_terms through torch.compile, made on first use; False where it cannot compile
_compiled_ran = False  # whether it has run once: after that, an error is the computation's, not the compiler's


def _terms_fn(compiled):
    """The per-chunk function: compiled where torch.compile works, else (with a warning) eager. Only an
    error of the first compiled call turns to eager (no compiler on this platform, an unsupported Python);
    an out-of-memory error, or any error after that, is raised as it is. Static shapes (dynamic=False): a
    shorter last chunk gets its own graph rather than turning the first one into a slower dynamic-shape graph."""
    global _compiled_terms
    if not compiled or _compiled_terms is False:
        return chunk_loss_terms
    if _compiled_terms is None:
        _compiled_terms = torch.compile(chunk_loss_terms, dynamic=False)
    if _compiled_ran:
        return _compiled_terms

    def first_call(*args):
        global _compiled_terms, _compiled_ran
        if _compiled_terms is False:  # a chunk before this one failed to compile
            return chunk_loss_terms(*args)
        try:
            result = _compiled_terms(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            warnings.warn(f"torch.compile failed ({type(e).__name__}); chunked loss falls back to eager")
            _compiled_terms = False
            return chunk_loss_terms(*args)
        _compiled_ran = True
        return result
    return first_call


_mixed_addmm = True  # torch.addmm(..., out_dtype=float32) with bf16/fp16 inputs, on CUDA in recent PyTorch


def _add_mm(acc, a, b):
    """acc += a @ b, acc float32: one GEMM into acc when the dtypes allow (float32 inputs; bf16 or fp16
    ones on CUDA through out_dtype), else through a temporary product in the inputs' dtype."""
    global _mixed_addmm
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _mixed_addmm:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):  # an older PyTorch
            _mixed_addmm = False
    acc += a @ b


class ChunkedHeadLoss(torch.autograd.Function):
    """loss(hidden @ weight.T, targets) for ce, focal or mile, one chunk of rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, loss, gamma, sigma, ignore_index, chunk_size, compiled, need_grad, group):
        # the matmuls run in the autocast dtype when autocast is on (bf16 on GPUs), else in hidden's;
        # the loss math is float32 in chunk_loss_terms, the weight's gradient is summed in float32
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        with torch.autocast(device_type, enabled=False):
            W = weight.to(dtype)
            terms = _terms_fn(compiled)
            grad_hidden = hidden.new_empty(hidden.shape, dtype=dtype) if need_grad else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
            sums = []
            for start in range(0, hidden.size(0), chunk_size):
                rows = slice(start, start + chunk_size)
                h = hidden[rows].to(dtype)
                chunk_sums, grad = terms(h @ W.t(), targets[rows], loss, gamma, sigma, ignore_index, need_grad)
                sums.append(chunk_sums)
                if need_grad:
                    torch.mm(grad, W, out=grad_hidden[rows])  # dL/dh = dL/dz W, up to alpha / n
                    _add_mm(grad_weight, grad.t(), h)  # dL/dW = sum_i dL/dz_i h_i^T, up to alpha / n
            wce_sum, w_sum = torch.stack(sums).sum(dim=0)
            n = (targets != ignore_index).sum()
            # alpha = 1 / mean_i(w_i) = n / sum_i w_i, averaged over ranks like normalizer(); 1 for CE
            alpha = torch.ones((), device=hidden.device) if loss == "ce" else mean_over_ranks(n / w_sum, group)
            scale = alpha / n
            if need_grad:
                ctx.save_for_backward(grad_hidden, grad_weight, scale)
                ctx.dtypes = hidden.dtype, weight.dtype
        return wce_sum * scale

    @staticmethod
    def backward(ctx, grad_loss):
        # scale the stored gradients in place where they are already in the parameter's dtype, so that
        # no second (V, d) buffer is made; so this backward runs once only
        assert not getattr(ctx, "done", False), "chunked_loss supports one backward pass per forward"
        ctx.done = True
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        scale = scale * grad_loss
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = grad_hidden.to(hidden_dtype).mul_(scale.to(hidden_dtype))
        grad_weight = grad_weight.mul_(scale).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def chunked_loss(hidden, weight, targets, loss="mile", gamma=1.0, sigma=1.0, ignore_index=-1,
                 chunk_size=DEFAULT_CHUNK_SIZE, compiled=True, vocab_size=None, group=None):
    """The loss of the logits hidden @ weight.T, as ce, focal or mile (same semantics as the
    readable losses), computed chunk_size rows at a time. hidden (..., d), weight (V, d), targets (...).
    compiled: run the per-chunk math through torch.compile (falls back to eager where it fails).
    vocab_size: the logits are the first vocab_size columns only, the rest of weight's rows padding.
    group: the processes alpha is averaged over (data parallelism), or None."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")
    weight = weight[:vocab_size]  # a view, no copy; the padding's rows get no gradient
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return ChunkedHeadLoss.apply(hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), loss,
                                 float(gamma), float(sigma), ignore_index, chunk_size, compiled, need_grad, group)
