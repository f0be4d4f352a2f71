"""
Module: the GPT, imported by train.py, sample.py and the other commands.

A GPT language model in one file, in the spirit of nanoGPT (github.com/karpathy/nanoGPT): the GPT-2
block or the LLaMA block of the MiLe paper's models, the training loss (cross-entropy, Focal or MiLe,
from mile.py) chosen in the config, and generation with a key/value cache.
"""

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

from mile import build_loss, chunked_loss, default_chunk_size, token_entropy


@dataclass
class GPTConfig:
    block_size: int = 256  # context length
    vocab_size: int = 50257  # GPT-2's BPE: the token ids the model predicts
    # rows of the embedding and output tables; those past vocab_size are padding, which keeps the head's
    # matmul a multiple of 64 wide (nanoGPT's 50304) and never enters a softmax. 0: no padding
    padded_vocab_size: int = 0
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit faster (llama: none)
    # "gpt2": LayerNorm, GELU MLP, learned positions, tied embeddings, init std 0.02.
    # "llama", the paper's models: RMSNorm, SwiGLU MLP, rotary positions, untied
    # embeddings, no biases, init std 0.01.
    arch: str = "gpt2"
    n_ffn: int = 0  # width of the MLP's hidden layer; 0 means 4 * n_embd
    rope_theta: float = 10000.0  # llama: base of the rotary frequencies
    norm_eps: float = 1e-5  # epsilon of the LayerNorms / RMSNorms (imported models bring their own)
    gelu_approximate: str = "none"  # gpt2's GELU: "none" (exact), or "tanh" as in OpenAI's GPT-2 weights
    loss: str = "mile"  # the training loss: "ce", "focal" or "mile" (mile.py)
    gamma: float = 1.0  # exponent of the Focal / MiLe weight
    sigma: float = 1.0  # MiLe's offset: w = (sigma + H) ** gamma
    # how a run computes the model (its loss path, compilation, activation checkpointing) is no part of what
    # the model is, nor saved with it: GPT.configure_run


def rotate(x, positions, theta=10000.0):
    """Rotary position embedding (Su et al., RoFormer): pairs of features (i, i + hs/2) of each head
    turn by the angle position * theta^(-2i/hs), so q.k depends on positions only through their
    difference. x (B, n_head, T, hs), positions (T,)."""
    hs = x.size(-1)
    freqs = theta ** (-torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs)  # (hs/2,)
    angles = positions.float()[:, None] * freqs[None, :]  # (T, hs/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def Norm(config):
    """The block's normalisation: LayerNorm for gpt2, RMSNorm for llama."""
    if config.arch == "llama":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.rotary = config.arch == "llama"
        self.rope_theta = config.rope_theta

    def forward(self, x, cache=None):
        """cache: None in training; in generation a dict of this layer's keys and values of the earlier
        tokens ({} at first), to which the new ones are appended."""
        B, T, C = x.size()
        start = cache["k"].size(2) if cache else 0  # the position of x's first token
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.rotary:  # llama: positions enter here, as rotations of q and k
            positions = torch.arange(start, start + T, device=x.device)
            q, k = rotate(q, positions, self.rope_theta), rotate(k, positions, self.rope_theta)
        if cache is not None:  # generation: attend to the cached tokens too, and keep the new ones
            assert start == 0 or T == 1, "after the first call, a cache takes one token at a time"
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        # flash attention where the platform has it; is_causal masks the future (one new token after
        # cached ones may see them all)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=start == 0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """gpt2: c_proj(gelu(c_fc(x))). llama, SwiGLU: c_proj(silu(c_gate(x)) * c_fc(x))."""

    def __init__(self, config):
        super().__init__()
        n_ffn = config.n_ffn or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, n_ffn, bias=config.bias)
        self.c_gate = nn.Linear(config.n_embd, n_ffn, bias=False) if config.arch == "llama" else None
        self.c_proj = nn.Linear(n_ffn, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.gelu_approximate = config.gelu_approximate

    def forward(self, x):
        if self.c_gate is not None:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            h = F.gelu(self.c_fc(x), approximate=self.gelu_approximate)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)
        self.recompute = False  # activation checkpointing (GPT.configure_run)

    def forward(self, x, cache=None):
        if self.recompute and torch.is_grad_enabled():  # keep x only; backward computes the block again
            return torch.utils.checkpoint.checkpoint(self.compute, x, use_reentrant=False)
        return self.compute(x, cache)

    def compute(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.arch in ("gpt2", "llama"), f"arch must be gpt2 or llama, not {config.arch!r}"
        if config.arch == "llama":
            config.bias = False  # LLaMA has no biases
        self.config = config
        llama = config.arch == "llama"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size or config.vocab_size, config.n_embd),  # token embeddings
            wpe=None if llama else nn.Embedding(config.block_size, config.n_embd),  # learned positions
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=Norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size or config.vocab_size, bias=False)
        if not llama:
            self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings

        self.configure_run()  # the plain way, what generation, evaluation and export want
        # the processes MiLe's and Focal's alpha is averaged over in training (train.py sets it under torchrun;
        # mile.normalizer): None, so that a model used in one process alone computes its loss alone
        self.loss_group = None

        self.init_weights()

    def configure_run(self, loss_path="full", loss_chunk_size=0, compiled=False, activation_checkpointing=False):
        """How a run computes the model, which is no part of what the model is (its config, saved with it):
        train.py sets it from its settings, before compiling; a model built or loaded otherwise keeps the
        defaults. loss_path (mile.choose_loss_path): "full" makes the (B, T, V) logits and calls the readable
        loss; "chunked", mile.chunked_loss, makes loss_chunk_size rows of them at a time (0: per device,
        mile.default_chunk_size). compiled: the model runs under torch.compile. activation_checkpointing: in
        training, each block keeps its input only and backward recomputes the rest. Returns the model."""
        self.loss_path, self.loss_chunk_size, self.compiled = loss_path, loss_chunk_size, compiled
        # under torch.compile the chunked loss stays out of the model's graph: its loop over chunks runs in
        # Python and its per-chunk math is compiled on its own. (torch.compiler.disable imports the compiler,
        # 1.9 s on 2 CPU cores: only a model that is compiled anyway asks for it)
        self.chunked_loss = torch.compiler.disable(chunked_loss) if compiled else chunked_loss
        for block in self.transformer.h:
            block.recompute = activation_checkpointing
        return self

    def to_empty(self, *, device, recurse=True):
        """nn.Module.to_empty (memory for a model built on the meta device, uninitialised: see init_weights),
        keeping gpt2's tied input and output embeddings one tensor, which it would make two."""
        super().to_empty(device=device, recurse=recurse)
        if self.config.arch == "gpt2":
            self.transformer.wte.weight = self.lm_head.weight
        return self

    @torch.no_grad()
    def init_weights(self):
        """Draw the initial weights from the global random stream: Linear and Embedding weights normal with
        std 0.02 (llama: 0.01), GPT-2's residual projections 0.02 / sqrt(2 * n_layer), biases zero, norms one.
        A model built on the meta device and sharded (distributed.build) is initialised here once its shards
        have memory: each process draws every whole matrix, in the same order from the same seed, and keeps
        its own shard of it, so a seed makes the same model on any number of processes."""
        def shard_of(p):  # the part of parameter p this process holds: a shard under FSDP, else all of it
            return p.to_local() if hasattr(p, "device_mesh") else p

        def draw(p, std):
            whole = torch.empty(p.shape, dtype=p.dtype, device=shard_of(p).device).normal_(0.0, std)
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor  # cuts the local shard out, no messages
                whole = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)
            shard_of(p).copy_(shard_of(whole))

        std = 0.01 if self.config.arch == "llama" else 0.02  # llama: std 0.01, as the paper's models
        for module in self.modules():  # the order of earlier versions, so a seed keeps its model
            if isinstance(module, (nn.Linear, nn.Embedding)):
                draw(module.weight, std)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                shard_of(module.weight).fill_(1.0)
            if getattr(module, "bias", None) is not None:
                shard_of(module.bias).zero_()
        if self.config.arch == "gpt2":  # scale the residual projections by 1/sqrt(2 * n_layer), one per residual add
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    draw(p, 0.02 / math.sqrt(2 * self.config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameter count. non_embedding leaves out the tables that are only looked up, as the
        GPT-2/PaLM counts do: gpt2's position embeddings, llama's (untied) input embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if not non_embedding:
            return n
        lookup = self.transformer.wpe if self.transformer.wpe is not None else self.transformer.wte
        return n - lookup.weight.numel()

    def hidden(self, idx, cache=None):
        """idx (B, T) token ids -> the final hidden states (B, T, n_embd), which lm_head maps to logits.
        cache: None, or in generation one dict per block holding the keys and values of the tokens
        before idx (see generate)."""
        B, T = idx.size()
        start = cache[0]["k"].size(2) if cache and cache[0] else 0  # tokens already in the cache
        assert start + T <= self.config.block_size, f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}"
        x = self.transformer.wte(idx)
        if self.transformer.wpe is not None:  # gpt2's learned positions; llama rotates q and k instead
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i])
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> (logits (B, T, V), the training loss) with targets; on the chunked path
        the logits are never made whole and None comes back in their place. Without targets: (logits
        (B, 1, V) of the last position, None), all that generation needs; `cache` is generation's
        key/value cache (see generate)."""
        x = self.hidden(idx, cache)
        if targets is None:
            return self.logits(x[:, [-1], :]), None
        return self.head_loss(x, targets)

    def logits(self, x):
        """The logits of hidden states x over the vocabulary: lm_head's output without its padded columns."""
        logits = self.lm_head(x)
        return logits[..., :self.config.vocab_size] if self.config.padded_vocab_size else logits

    def head_loss(self, x, targets):
        """(logits or None, loss) of the final hidden states x against targets, on the run's loss path."""
        cfg = self.config
        if self.loss_path == "chunked":
            chunk_size = self.loss_chunk_size or default_chunk_size(cfg.vocab_size, x.device.type)
            return None, self.chunked_loss(x, self.lm_head.weight, targets, cfg.loss, cfg.gamma, cfg.sigma,
                                           chunk_size=chunk_size, compiled=self.compiled, vocab_size=cfg.vocab_size,
                                           group=self.loss_group)
        logits = self.logits(x)
        return logits, build_loss(cfg.loss, cfg.gamma, cfg.sigma, group=self.loss_group)(logits, targets)

    @torch.no_grad()
    def token_stats(self, idx, targets):
        """Per position, in float32: the cross-entropy of the target and the entropy of the prediction
        (mile.token_entropy), each (B, T), for evaluation (buckets.py). The logits are made
        loss_chunk_size rows at a time, so memory stays small at any vocabulary."""
        x, y = self.hidden(idx).flatten(0, 1), targets.flatten()
        ce, entropy = [], []
        step = self.loss_chunk_size or default_chunk_size(self.config.vocab_size, x.device.type)
        for i in range(0, len(y), step):
            logits = self.logits(x[i:i + step]).float()
            ce.append(F.cross_entropy(logits, y[i:i + len(logits)], reduction="none"))
            entropy.append(token_entropy(logits))
        return torch.cat(ce).view_as(targets), torch.cat(entropy).view_as(targets)

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
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T). temperature 0 means greedy;
        top_k keeps only the k most likely tokens at each step."""
        return torch.cat([idx, *self.stream(idx, max_new_tokens, temperature, top_k, use_cache)], dim=1)

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """generate(), one new token (B, 1) at a time, as it is drawn.

        With use_cache, each layer keeps the keys and values of the tokens seen so far, so a step
        computes one token, not the whole window. Once the sequence outgrows block_size, the window
        slides and every token's position changes (and with it every key and value above the first
        layer), so the cache is computed anew from the cropped window: exact, as fast as no cache."""
        bs, cache = self.config.block_size, None
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= bs:  # the window still grows: feed the newest token
                logits, _ = self(idx[:, -1:], cache=cache)
            else:  # the first step, or the window slid: the whole (cropped) window
                cache = [{} for _ in self.transformer.h] if use_cache else None
                logits, _ = self(idx[:, -bs:], cache=cache)
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
            yield idx_next
