"""
Module: Hugging Face import and export, imported by train.py, sample.py and export.py.

Hugging Face, both ways: a GPT with the weights of a GPT-2 or LLaMA model (hub name or local
directory: train.py --init_from, sample.py --init_from), and a GPT as a transformers model with its
tokenizer (export.py). One table of names serves both directions. Needs requirements-hf.txt
(transformers, safetensors); the core never imports this module.
"""

import math
import sys

import torch

from data.common import gpt2_encoding
from model import GPT, GPTConfig

GPT2_EOT = "<|endoftext|>"  # GPT-2's end of text, id 50256
# our GPTConfig fields and the Hugging Face config's, per block
CONFIG_NAMES = {
    "gpt2": {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "n_ffn": "n_inner",
             "block_size": "n_positions", "norm_eps": "layer_norm_epsilon"},
    "llama": {"n_layer": "num_hidden_layers", "n_head": "num_attention_heads", "n_embd": "hidden_size",
              "n_ffn": "intermediate_size", "block_size": "max_position_embeddings", "norm_eps": "rms_norm_eps",
              "rope_theta": "rope_theta"},
}
# GPT-2: the parameter names are ours; its Conv1D layers store these weights transposed, (in, out)
GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# LLaMA: our name -> its name, outside the blocks and inside block i; our c_attn is its q, k, v stacked
LLAMA_NAMES = {"transformer.wte.weight": "model.embed_tokens.weight", "transformer.ln_f.weight": "model.norm.weight",
               "lm_head.weight": "lm_head.weight"}
LLAMA_BLOCK_NAMES = {"attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.c_gate.weight": "mlp.gate_proj.weight",
                     "mlp.c_fc.weight": "mlp.up_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight",
                     "ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight"}
QKV = [f"self_attn.{p}_proj.weight" for p in "qkv"]


def llama_names(n_layer):
    """{our name: Hugging Face's} for every LLaMA tensor but the stacked q, k, v."""
    names = dict(LLAMA_NAMES)
    for i in range(n_layer):
        names.update({f"transformer.h.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in LLAMA_BLOCK_NAMES.items()})
    return names


def from_hf_state_dict(theirs, arch, n_layer):
    """A Hugging Face state dict in our names and layout."""
    if arch == "gpt2":
        return {k: v.t() if k.endswith(GPT2_CONV1D) else v for k, v in theirs.items()
                if k.startswith(("transformer.", "lm_head."))}
    ours = {o: theirs[t] for o, t in llama_names(n_layer).items()}  # a tied head becomes an untied copy
    for i in range(n_layer):  # no permutation of q and k: its rotate_half pairs features as our rotate does
        ours[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([theirs[f"model.layers.{i}.{n}"] for n in QKV])
    return ours


def to_hf_state_dict(ours, arch, n_layer):
    """Our state dict in Hugging Face's names and layout."""
    if arch == "gpt2":
        return {k: v.t() if k.endswith(GPT2_CONV1D) else v for k, v in ours.items()}
    theirs = {t: ours[o] for o, t in llama_names(n_layer).items()}
    for i in range(n_layer):
        q, k, v = ours[f"transformer.h.{i}.attn.c_attn.weight"].chunk(3, dim=0)
        theirs.update(zip([f"model.layers.{i}.{n}" for n in QKV], (q, k, v)))
    return theirs


# -----------------------------------------------------------------------------
# import: Hugging Face -> our GPT


def refuse(name, what):
    sys.exit(f"error: {name} has {what}, which model.py does not implement; it loads GPT-2 and LLaMA models "
             f"without it")


def shape_of(name, c):
    """Our GPTConfig shape fields from a Hugging Face config, or one sentence on what we cannot load exactly."""
    if c.model_type == "gpt2":
        if c.activation_function not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            refuse(name, f"the activation {c.activation_function}")
        if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
            refuse(name, "attention scaled otherwise than by 1/sqrt(head size)")
        if not c.tie_word_embeddings:
            refuse(name, "an output layer untied from the token embeddings")
        shape = {"arch": "gpt2", "gelu_approximate": "none" if c.activation_function == "gelu" else "tanh"}
    elif c.model_type == "llama":
        rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta, **(c.rope_scaling or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if c.num_key_value_heads != c.num_attention_heads:
            refuse(name, f"grouped-query attention ({c.num_key_value_heads} key/value heads for "
                         f"{c.num_attention_heads} query heads)")
        if rope_type != "default":
            refuse(name, f"rotary embeddings with {rope_type} scaling")
        if c.attention_bias or c.mlp_bias:
            refuse(name, "biases in its attention or MLP")
        if c.hidden_act != "silu":
            refuse(name, f"the activation {c.hidden_act}")
        if getattr(c, "head_dim", None) not in (None, c.hidden_size // c.num_attention_heads):
            refuse(name, f"a head size of {c.head_dim}, not hidden_size / num_attention_heads")
        c.rope_theta = rope["rope_theta"]
        shape = {"arch": "llama", "bias": False}
    else:
        sys.exit(f"error: {name} is a {c.model_type} model; model.py loads gpt2 and llama models only")
    shape.update({ours: getattr(c, theirs) for ours, theirs in CONFIG_NAMES[shape["arch"]].items()})
    shape["n_ffn"] = 0 if shape["n_ffn"] in (None, 4 * shape["n_embd"]) else shape["n_ffn"]  # 0 means 4 * n_embd
    return shape


def check_vocabulary(name, vocabulary):
    """Stop with one sentence unless the model's tokenizer gives each of the dataset's tokens the same id."""
    from transformers import AutoTokenizer
    try:
        theirs = AutoTokenizer.from_pretrained(name).get_vocab()
    except Exception as e:
        theirs, why = {}, type(e).__name__
    else:
        why = f"its tokenizer knows {len(theirs)} tokens"
    if len(theirs) < len(vocabulary):  # transformers gives a folder without tokenizer files a near-empty one
        sys.exit(f"error: {name} has no tokenizer to check the dataset's vocabulary of {len(vocabulary)} tokens "
                 f"against ({why}); add the model's tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
    wrong = next((t for t, i in vocabulary.items() if theirs.get(t) != i), None)
    if wrong is not None:
        sys.exit(f"error: the dataset's vocabulary is not {name}'s: token {wrong!r} is id {vocabulary[wrong]} in the "
                 f"dataset, {theirs.get(wrong)} in the model; use a dataset made with the model's tokenizer "
                 f"(GPT-2's BPE: shakespeare, fineweb)")


def from_pretrained(name, vocabulary=None, **override):
    """A GPT with the weights of a Hugging Face GPT-2 or LLaMA model, as nanoGPT's: a hub name (gpt2,
    gpt2-medium, gpt2-large, gpt2-xl) or a local directory (export.py writes those). The shape comes from
    the weights: `override` sets the other GPTConfig fields (loss, dropout, ...) and may shrink block_size
    (the first positions) and vocab_size (the first token ids), but a shape field must agree with the
    weights. `vocabulary`, a {token: id} dict (vocabulary(meta)), must agree with the model's tokenizer.
    Whatever cannot load exactly stops with one sentence."""
    try:
        import huggingface_hub
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        sys.exit("error: loading Hugging Face weights needs transformers: pip install -r requirements-hf.txt")
    transformers.logging.disable_progress_bar()
    huggingface_hub.utils.logging.set_verbosity_error()  # offline, its retries print a line each: the error says it once
    try:
        c = AutoConfig.from_pretrained(name)
    except Exception as e:  # offline, a typo, a directory without config.json
        sys.exit(f"error: cannot load {name!r}: it is not a local Hugging Face model directory, and the hub did "
                 f"not give it either (offline, or no such model: {type(e).__name__}); check the name or path (with no "
                 f"network, HF_HUB_OFFLINE=1 skips the hub's retries)")
    shape = shape_of(name, c)
    if vocabulary is not None:  # the tokens the model will be trained on must mean what they meant
        check_vocabulary(name, vocabulary)
    theirs = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).state_dict()
    sd = from_hf_state_dict(theirs, shape["arch"], shape["n_layer"])
    if shape["arch"] == "gpt2":
        shape["bias"] = any(v.any() for k, v in sd.items() if k.endswith(".bias"))  # all zero: a bias-free export
    shape["vocab_size"] = sd["lm_head.weight"].size(0)

    def width(n_ffn):
        return n_ffn or 4 * shape["n_embd"]
    for key, value in override.items():
        if key in ("block_size", "vocab_size"):
            if value > shape[key]:
                sys.exit(f"error: {key}={value} is more than the {shape[key]} of {name}; give at most {shape[key]}")
        elif key in shape and value != shape[key] and not (key == "n_ffn" and width(value) == width(shape[key])):
            sys.exit(f"error: {key}={value} conflicts with {name}, whose weights have {key}={shape[key]}; "
                     f"leave {key} out: the weights set it")
    model = GPT(GPTConfig(**{**shape, **override}))
    V, T = model.config.vocab_size, model.config.block_size
    crop = {"transformer.wte.weight": V, "lm_head.weight": V, "transformer.wpe.weight": T}
    model.load_state_dict({k: sd[k][:crop.get(k)] for k in model.state_dict()})
    return model


# -----------------------------------------------------------------------------
# export: our GPT -> a transformers model and tokenizer


def gpt2_ranks():
    """GPT-2's BPE: {token bytes: rank} from tiktoken (data/common.py fetches the ranks through PyPI)."""
    return gpt2_encoding()._mergeable_ranks


def byte_to_unicode():
    """GPT-2's printable stand-in for each byte, which its vocab.json and merges.txt are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def vocabulary(meta):
    """{token: id} of a dataset's tokenizer (its meta.pkl), as Hugging Face tokenizers write tokens."""
    if "stoi" in meta:
        return dict(meta["stoi"])
    if meta.get("tokenizer") == "gpt2":
        u = byte_to_unicode()
        return {**{"".join(u[b] for b in token): rank for token, rank in gpt2_ranks().items()}, GPT2_EOT: 50256}
    raise ValueError(f"the dataset's meta names no tokenizer this project knows ({sorted(meta)})")


def gpt2_merges(ranks):
    """The merges, in order, that GPT-2's BPE (tiktoken's ranks) performs: byte-pair encoding a token
    of rank r with the tokens of lower rank ends in two parts, whose merge is token r's."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            _, i = min((ranks.get(a + b, math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(tuple(parts))
    return merges


def hf_tokenizer(meta):
    """The dataset's tokenizer as a transformers PreTrainedTokenizerFast: GPT-2's byte-level BPE,
    or one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(meta)
    if "stoi" in meta:
        tk = Tokenizer(models.WordLevel(vocab, unk_token=None))
        tk.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # every character, newlines too
        tk.decoder = decoders.Fuse()  # join the characters back without spaces
        return PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False)
    u = byte_to_unicode()
    merges = [tuple("".join(u[b] for b in part) for part in pair) for pair in gpt2_merges(gpt2_ranks())]
    tk = Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split pattern, then bytes
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=GPT2_EOT, eos_token=GPT2_EOT, unk_token=GPT2_EOT,
                                   clean_up_tokenization_spaces=False)


def hf_model(model, vocab_size, eos_token_id=None):
    """A transformers GPT2LMHeadModel or LlamaForCausalLM with the weights of our GPT, its vocabulary
    cut to its first vocab_size ids; eos_token_id (GPT-2's <|endoftext|>) ends Hugging Face's generate."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    cfg = model.config
    fields = {theirs: getattr(cfg, ours) for ours, theirs in CONFIG_NAMES[cfg.arch].items()}
    fields[CONFIG_NAMES[cfg.arch]["n_ffn"]] = cfg.n_ffn or 4 * cfg.n_embd
    common = dict(vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id, **fields)
    if cfg.arch == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(
            activation_function="gelu" if cfg.gelu_approximate == "none" else "gelu_new", resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **common))
    else:
        hf = LlamaForCausalLM(LlamaConfig(
            num_key_value_heads=cfg.n_head, tie_word_embeddings=False, hidden_act="silu", attention_bias=False,
            mlp_bias=False, pad_token_id=None, **common))
    theirs = to_hf_state_dict(model.state_dict(), cfg.arch, cfg.n_layer)
    expected = hf.state_dict()
    theirs = {k: v for k, v in theirs.items() if k in expected}
    theirs.update({k: torch.zeros_like(v) for k, v in expected.items() if k not in theirs and k.endswith(".bias")})
    for k in ("transformer.wte.weight", "lm_head.weight", "model.embed_tokens.weight"):  # a padded vocabulary, cut
        if k in theirs:
            theirs[k] = theirs[k][:vocab_size]
    hf.load_state_dict({k: v.float().contiguous() for k, v in theirs.items()})
    return hf.eval()
