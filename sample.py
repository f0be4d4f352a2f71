"""
Sample text from a checkpoint written by train.py, or from a Hugging Face model (GPT-2 or LLaMA).
The text streams out as it is generated; the speed (tokens/s) comes last, on stderr.

    python sample.py                                    # three samples from out/ckpt.pt
    python sample.py --out_dir=out --start="ROMEO:" --num_samples=1 --max_new_tokens=300
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=40 --seed=7
    python sample.py --hf=out/hf                        # a directory of export.py (or any GPT-2/LLaMA one)
    python sample.py --hf=gpt2 --start="Hello,"         # OpenAI's GPT-2, from the hub (needs network once)
"""

import argparse
import os
import sys
import time
from contextlib import nullcontext

import torch

from data.common import dataset_dir, read_meta
from model import GPT, GPTConfig, load_checkpoint

parser = argparse.ArgumentParser(description="Sample text from a checkpoint written by train.py.", allow_abbrev=False)
parser.add_argument("--out_dir", default="out", help="directory holding ckpt.pt (default: out)")
parser.add_argument("--hf", default=None, help="sample from this Hugging Face model instead: a directory (export.py's) "
                    "or a hub name (gpt2, ...); needs requirements-hf.txt")
parser.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file (default: a newline)")
parser.add_argument("--num_samples", type=int, default=3, help="how many samples (default: 3)")
parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per sample (default: 500)")
parser.add_argument("--temperature", type=float, default=0.8, help="below 1 is more conservative, 0 is greedy (default: 0.8)")
parser.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens only; 0 for all (default: 200)")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
parser.add_argument("--no_cache", action="store_true", help="recompute the whole context at every step (slow; for comparison)")
args = parser.parse_args()


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


if args.num_samples < 1 or args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
    fail("num_samples must be at least 1, and max_new_tokens, temperature and top_k must not be negative")

# -----------------------------------------------------------------------------
# model
device = args.device
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
device_type = device.split(":")[0]
if device_type == "cuda" and not torch.cuda.is_available() or device_type == "mps" and not torch.backends.mps.is_available():
    fail(f"device {device} asked for, but this PyTorch does not see it; use --device=cpu")
if device_type not in ("cuda", "mps", "cpu"):
    fail(f"device must be auto, cpu, mps, cuda or cuda:N, not {device!r}")
if args.hf:
    model = GPT.from_pretrained(args.hf)
else:
    checkpoint = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt"))
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
model.eval().to(device)
use_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
ctx = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

# -----------------------------------------------------------------------------
# tokenizer: a Hugging Face model's own, or the checkpoint's dataset's meta (the char vocabulary, or the BPE's name)
meta = None if args.hf else checkpoint.get("meta")
if meta is None and not args.hf:  # an older checkpoint: read the dataset's meta.pkl
    meta_path = os.path.join(dataset_dir(checkpoint["config"]["dataset"]), "meta.pkl")
    if not os.path.exists(meta_path):
        fail(f"the checkpoint names dataset {checkpoint['config']['dataset']!r}, but {meta_path} is missing; prepare that dataset first")
    try:
        meta = read_meta(meta_path)  # as plain data: it cannot run code
    except ValueError as e:
        fail(str(e))
if args.hf:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.hf)
    except Exception as e:
        fail(f"{args.hf} has no tokenizer that transformers can load ({type(e).__name__}); add the model's tokenizer files")

    def encode(s):
        try:
            return tokenizer(s)["input_ids"]
        except Exception as e:  # e.g. a character outside a character vocabulary
            fail(f"the model's tokenizer cannot encode the prompt ({str(e).splitlines()[0]}); give text made of "
                 f"what it knows (a character-level model: the characters of its training text)")

    def decode(ids):
        return tokenizer.decode(ids)
elif "stoi" in meta:  # characters
    stoi, itos = meta["stoi"], meta["itos"]

    def encode(s):
        missing = sorted(set(s) - set(stoi))
        if missing:
            fail(f"the prompt has {''.join(missing)!r}, which the model's character vocabulary lacks; "
                 f"use only these characters: {''.join(sorted(stoi))!r}")
        return [stoi[c] for c in s]

    def decode(ids):
        return "".join(itos[i] for i in ids)
elif meta.get("tokenizer") == "gpt2":  # GPT-2 BPE
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    from common import gpt2_encoding

    enc = gpt2_encoding()

    def encode(s):
        try:
            return enc.encode(s, allowed_special={"<|endoftext|>"})
        except Exception as e:  # e.g. text that is not valid Unicode
            fail(f"the GPT-2 tokenizer cannot encode the prompt ({e}); give it as UTF-8 text")

    def decode(ids):
        return enc.decode(ids)
else:
    fail(f"the checkpoint's dataset meta names no tokenizer this script knows ({sorted(meta)}); "
         f"expected a character table (stoi, itos) or tokenizer 'gpt2'")

# -----------------------------------------------------------------------------
# prompt and sampling
start = args.start
if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompt file {start[5:]!r} ({e.__class__.__name__}); give a readable UTF-8 text file")
ids = encode(start)
if not ids:
    fail("the prompt is empty; give at least one character with --start")


def show(tokens):
    """Print the text of the tokens as they come. A token can end inside a character (GPT-2's BPE
    splits rare characters into bytes): the tokens since the last line break are decoded together
    and what is new is printed, unless it ends in an unfinished character (shown as U+FFFD)."""
    line, shown = [], 0
    for token in tokens:
        line.append(token.item())
        text = decode(line)
        if not text.endswith("\ufffd"):
            print(text[shown:], end="", flush=True)
            line, shown = ([], 0) if text.endswith("\n") else (line, len(text))
    print(decode(line)[shown:])  # what is left (a character never finished), and the closing newline


torch.manual_seed(args.seed)
x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]
seconds = 0.0
with torch.no_grad(), ctx:
    for _ in range(args.num_samples):
        print(decode(ids), end="", flush=True)
        t0 = time.perf_counter()
        show(model.stream(x, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                          use_cache=not args.no_cache))
        seconds += time.perf_counter() - t0
        print("---------------", flush=True)
n = args.num_samples * args.max_new_tokens
print(f"{n} tokens in {seconds:.2f} s: {n / max(seconds, 1e-9):.1f} tokens/s "
      f"({'without' if args.no_cache else 'with'} the key/value cache, on {device})", file=sys.stderr)
