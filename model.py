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

from mile import build_loss, choose_loss_path, chunked_loss, default_chunk_size, token_entropy

# torch.compile of the whole model stops at the chunked loss: its loop over chunks stays in Python
# and its per-chunk math is compiled on its own (compile_loss). torch.compiler.disable would import
# the compiler (over a second) whenever model.py is imported, by sample.py too; this form of it,
# torch's own, waits until the first call
head_chunked_loss = torch._compile._disable_dynamo(chunked_loss)


@dataclass
class GPTConfig:
    block_size: int = 256  # context length
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
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
    loss: str = "mile"  # training objective: "ce", "focal" or "mile" (see mile.py)
    gamma: float = 1.0  # exponent of the Focal / MiLe weight
    sigma: float = 1.0  # MiLe's offset: w = (sigma + H) ** gamma
    # the training loss's path (mile.choose_loss_path): True, output layer + loss through mile.chunked_loss,
    # never the (B, T, V) logits; False, the logits and the readable loss; "auto", the logits on a GPU
    # when they fit (compiled with the model, the fastest), chunks when they do not and on a CPU
    chunked_loss: str | bool = "auto"
    loss_chunk_size: int = 0  # rows of logits per chunk; 0: per device (mile.default_chunk_size)
    compile_loss: bool = False  # torch.compile the per-chunk loss math (fast on GPUs)


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

    def forward(self, x, cache=None):
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
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=None if llama else nn.Embedding(config.block_size, config.n_embd),  # learned positions
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=Norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if not llama:
            self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings

        self.apply(self._init_weights)
        if not llama:  # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), one per residual add
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        std = 0.01 if self.config.arch == "llama" else 0.02  # llama: std 0.01, as the paper's models
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)

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

    def forward(self, idx, targets=None, objective=None, cache=None):
        """idx (B, T) token ids -> (logits (B, T, V), loss) with targets, the loss being the config's
        objective unless `objective` names another ("ce", "focal", "mile"); on the chunked path the
        logits are never made and None comes back in their place. Without targets:
        (logits (B, 1, V) of the last position, None), all that generation needs; `cache` is
        generation's key/value cache (see generate)."""
        x = self.hidden(idx, cache)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        cfg = self.config
        objective = objective or cfg.loss
        path, chunk_size = choose_loss_path(targets.numel(), cfg.vocab_size, x.device, cfg.chunked_loss,
                                            cfg.loss_chunk_size)
        if path == "chunked":
            return None, head_chunked_loss(x, self.lm_head.weight, targets, objective, cfg.gamma, cfg.sigma,
                                           chunk_size=chunk_size, compiled=cfg.compile_loss)
        logits = self.lm_head(x)
        return logits, build_loss(objective, cfg.gamma, cfg.sigma)(logits, targets)

    @torch.no_grad()
    def token_stats(self, idx, targets):
        """Per position, in float32: the cross-entropy of the target and the entropy of the prediction
        (mile.token_entropy), each (B, T), for evaluation (evaluate.py). The logits are made
        loss_chunk_size rows at a time, so memory stays small at any vocabulary."""
        x, y = self.hidden(idx).flatten(0, 1), targets.flatten()
        ce, entropy = [], []
        step = self.config.loss_chunk_size or default_chunk_size(self.config.vocab_size, x.device.type)
        for i in range(0, len(y), step):
            logits = self.lm_head(x[i:i + step]).float()
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

    @classmethod
    def from_pretrained(cls, name, vocabulary=None, **override):
        """A GPT with the weights of a Hugging Face GPT-2 or LLaMA model, as nanoGPT's: a hub name
        (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local directory (export.py writes those).
        The shape comes from the weights: `override` sets the other GPTConfig fields (loss, dropout, ...)
        and may shrink block_size (the first positions) and vocab_size (the first token ids), but a
        shape field must agree with the weights. `vocabulary`, a {token: id} dict (export.vocabulary),
        must agree with the model's tokenizer. Whatever cannot load exactly stops with one sentence.
        Needs transformers (requirements-hf.txt)."""
        try:
            import transformers
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            sys.exit("error: loading Hugging Face weights needs transformers: pip install -r requirements-hf.txt")
        transformers.logging.disable_progress_bar()

        def refuse(what):
            sys.exit(f"error: {name} has {what}, which model.py does not implement; it loads GPT-2 and LLaMA "
                     f"models without it")
        try:
            c = AutoConfig.from_pretrained(name)
        except Exception as e:  # offline, a typo, a directory without config.json
            sys.exit(f"error: cannot load {name!r}: it is not a local Hugging Face model directory, and the hub did "
                     f"not give it either (offline, or no such model: {type(e).__name__}); check the name or path")
        if c.model_type == "gpt2":
            if c.activation_function not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
                refuse(f"the activation {c.activation_function}")
            if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
                refuse("attention scaled otherwise than by 1/sqrt(head size)")
            if not c.tie_word_embeddings:
                refuse("an output layer untied from the token embeddings")
            shape = dict(arch="gpt2", n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_ffn=c.n_inner or 0,
                         block_size=c.n_positions, norm_eps=c.layer_norm_epsilon,
                         gelu_approximate="none" if c.activation_function == "gelu" else "tanh")
        elif c.model_type == "llama":
            rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta, **(c.rope_scaling or {})}
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if c.num_key_value_heads != c.num_attention_heads:
                refuse(f"grouped-query attention ({c.num_key_value_heads} key/value heads for "
                       f"{c.num_attention_heads} query heads)")
            if rope_type != "default":
                refuse(f"rotary embeddings with {rope_type} scaling")
            if c.attention_bias or c.mlp_bias:
                refuse("biases in its attention or MLP")
            if c.hidden_act != "silu":
                refuse(f"the activation {c.hidden_act}")
            if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
                refuse(f"a head size of {c.head_dim}, not hidden_size / num_attention_heads")
            shape = dict(arch="llama", n_layer=c.num_hidden_layers, n_head=c.num_attention_heads, n_embd=c.hidden_size,
                         n_ffn=c.intermediate_size, block_size=c.max_position_embeddings, norm_eps=c.rms_norm_eps,
                         rope_theta=rope["rope_theta"], bias=False)
        else:
            sys.exit(f"error: {name} is a {c.model_type} model; model.py loads gpt2 and llama models only")
        if vocabulary is not None:  # the tokens the model will be trained on must mean what they meant
            try:
                theirs = AutoTokenizer.from_pretrained(name).get_vocab()
            except Exception as e:
                sys.exit(f"error: {name} has no tokenizer to check the dataset's vocabulary against "
                         f"({type(e).__name__}); add the model's tokenizer files to it")
            wrong = next((t for t, i in vocabulary.items() if theirs.get(t) != i), None)
            if wrong is not None:
                sys.exit(f"error: the dataset's vocabulary is not {name}'s: token {wrong!r} is id {vocabulary[wrong]} in "
                         f"the dataset, {theirs.get(wrong)} in the model; use a dataset made with the model's tokenizer "
                         f"(GPT-2's BPE: shakespeare, fineweb)")

        sd_hf = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).state_dict()
        if shape["arch"] == "gpt2":  # our names are GPT-2's; its Conv1D layers store their weights transposed
            sd = {k: v.t() if k.endswith(("attn.c_attn.weight", "c_proj.weight", "mlp.c_fc.weight")) else v
                  for k, v in sd_hf.items() if k.startswith(("transformer.", "lm_head."))}
            shape["bias"] = any(v.any() for k, v in sd.items() if k.endswith(".bias"))  # all zero: a bias-free export
        else:  # LLaMA's q, k, v are our fused c_attn; its rotate_half is our rotate: no permutation
            sd = {"transformer.wte.weight": sd_hf["model.embed_tokens.weight"], "lm_head.weight": sd_hf["lm_head.weight"],
                  "transformer.ln_f.weight": sd_hf["model.norm.weight"]}  # a tied head becomes an untied copy
            for i in range(shape["n_layer"]):
                ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
                sd[ours + "attn.c_attn.weight"] = torch.cat([sd_hf[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"])
                sd[ours + "attn.c_proj.weight"] = sd_hf[hf + "self_attn.o_proj.weight"]
                sd[ours + "mlp.c_gate.weight"] = sd_hf[hf + "mlp.gate_proj.weight"]
                sd[ours + "mlp.c_fc.weight"] = sd_hf[hf + "mlp.up_proj.weight"]
                sd[ours + "mlp.c_proj.weight"] = sd_hf[hf + "mlp.down_proj.weight"]
                sd[ours + "ln_1.weight"] = sd_hf[hf + "input_layernorm.weight"]
                sd[ours + "ln_2.weight"] = sd_hf[hf + "post_attention_layernorm.weight"]
        shape["vocab_size"] = sd["lm_head.weight"].size(0)

        def width(n_ffn):
            return n_ffn or 4 * shape["n_embd"]  # n_ffn 0 means 4 * n_embd
        shape["n_ffn"] = 0 if width(shape["n_ffn"]) == 4 * shape["n_embd"] else shape["n_ffn"]
        for key, value in override.items():
            if key in ("block_size", "vocab_size"):
                if value > shape[key]:
                    sys.exit(f"error: {key}={value} is more than the {shape[key]} of {name}; give at most {shape[key]}")
            elif key in shape and value != shape[key] and not (key == "n_ffn" and width(value) == width(shape[key])):
                sys.exit(f"error: {key}={value} conflicts with {name}, whose weights have {key}={shape[key]}; "
                         f"leave {key} out: the weights set it")
        model = cls(GPTConfig(**{**shape, **override}))
        V, T = model.config.vocab_size, model.config.block_size
        crop = {"transformer.wte.weight": V, "lm_head.weight": V, "transformer.wpe.weight": T}
        model.load_state_dict({k: sd[k][:crop.get(k)] for k in model.state_dict()})
        return model


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


def load_checkpoint(path, elsewhere="point --out_dir at the directory that holds ckpt.pt"):
    """The dict train.py saved at path, on the CPU, or exit with one sentence saying what is wrong.
    elsewhere: how the caller's user names another checkpoint directory."""
    if not os.path.isfile(path):
        sys.exit(f"error: no checkpoint at {path}; train one first (python train.py), or {elsewhere}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"error: {path} is not a readable checkpoint (it may be truncated or corrupt: "
                 f"{type(e).__name__}); restore a good copy, or train afresh over it with python train.py "
                 f"--out_dir={os.path.dirname(path) or '.'} --overwrite=True")
    needed = {"model", "optimizer", "model_args", "config", "iter_num", "best_val_loss", "rng"}
    if not isinstance(checkpoint, dict) or not needed <= checkpoint.keys():
        sys.exit(f"error: {path} is a PyTorch file but not a checkpoint written by train.py")
    return checkpoint
