"""
A GPT language model in one file, in the spirit of nanoGPT (github.com/karpathy/nanoGPT).
The training objective (cross-entropy, Focal or MiLe) comes from mile.py and is chosen in the config.
"""

import inspect
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from mile import DEFAULT_CHUNK_SIZE, build_loss, chunked_loss

# torch.compile of the whole model stops at the chunked loss: its loop over chunks stays in Python
# and its per-chunk math is compiled on its own (compile_loss)
head_chunked_loss = torch.compiler.disable(chunked_loss)



@dataclass
class GPTConfig:
    block_size: int = 256  # context length
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit faster
    loss: str = "mile"  # training objective: "ce", "focal" or "mile" (see mile.py)
    gamma: float = 1.0  # exponent of the Focal / MiLe weight
    sigma: float = 1.0  # MiLe's offset: w = (sigma + H) ** gamma
    chunked_loss: bool = True  # output layer + loss through mile.chunked_loss: no (B, T, V) logits
    loss_chunk_size: int = DEFAULT_CHUNK_SIZE  # rows of logits per chunk
    compile_loss: bool = False  # torch.compile the per-chunk loss math (fast on GPUs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # flash attention where the platform has it; is_causal masks the future
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings

        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), one per residual add
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; position embeddings are left out by default, as in the GPT-2/PaLM counts.
        The token embeddings are counted: they are the output layer's weights too."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, objective=None):
        """idx (B, T) token ids -> (logits (B, T, V), loss) with targets, the loss being the config's
        objective unless `objective` names another ("ce", "focal", "mile"); with chunked_loss the
        logits are never made and None comes back in their place. Without targets:
        (logits (B, 1, V) of the last position, None), all that generation needs."""
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens is longer than block_size {self.config.block_size}"
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        cfg = self.config
        objective = objective or cfg.loss
        if cfg.chunked_loss:
            return None, head_chunked_loss(x, self.lm_head.weight, targets, objective, cfg.gamma, cfg.sigma,
                                           chunk_size=cfg.loss_chunk_size, compiled=cfg.compile_loss)
        logits = self.lm_head(x)
        return logits, build_loss(objective, cfg.gamma, cfg.sigma)(logits, targets)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on the matrices (Linear weights, embeddings) only, not on
        biases and LayerNorm gains; the fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self):
        """Training FLOPs per token, forward and backward: 6N for the matmuls with the weights,
        plus 12 * L * T * d for attention (PaLM paper, appendix B)."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 means greedy;
        top_k keeps only the k most likely tokens at each step."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]  # crop the context to block_size
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# -----------------------------------------------------------------------------
# model FLOPs utilisation: achieved FLOP/s over the device's peak, which we look up rather than
# assume (nanoGPT hard-codes the A100's 312 TFLOP/s and prints over 100% on an H100)

# dense bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets; matched against the
# CUDA device name, first match wins, so the more specific names come first
PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM and NVL
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16; V100 has no bf16
    ("T4", 65e12),  # fp16
]


def peak_flops(device_name):
    """Peak FLOP/s of a CUDA device from its name, or None when it is not in the table."""
    for key, flops in PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def load_checkpoint(path):
    """The dict train.py saved at path, on the CPU, or exit with one sentence saying what is wrong."""
    if not os.path.isfile(path):
        sys.exit(f"error: no checkpoint at {path}; train one first (python train.py), or point --out_dir "
                 f"at the directory that holds ckpt.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"error: {path} is not a readable checkpoint (it may be truncated or corrupt: "
                 f"{type(e).__name__}); restore a good copy or train afresh with --init_from=scratch")
    needed = {"model", "optimizer", "model_args", "config", "iter_num", "best_val_loss", "rng"}
    if not isinstance(checkpoint, dict) or not needed <= checkpoint.keys():
        sys.exit(f"error: {path} is a PyTorch file but not a checkpoint written by train.py")
    return checkpoint
