"""
Command: python sample.py [--out_dir=DIR | --init_from=gpt2] [--start=TEXT] [--key=value ...]

Sample text from a checkpoint written by train.py, or from a Hugging Face model (GPT-2 or LLaMA).
The text streams out as it is generated; the speed (tokens/s) comes last, on stderr.

    python sample.py                                    # three samples from out/ckpt.pt
    python sample.py --out_dir=out --start="ROMEO:" --num_samples=1 --max_new_tokens=300
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=40 --seed=7
    python sample.py --init_from=out/hf                 # a directory of export.py (or any GPT-2/LLaMA one)
    python sample.py --init_from=gpt2 --start="Hello,"  # OpenAI's GPT-2, from the hub (needs network once)
"""

import argparse
import math
import sys
import time

import torch

import checkpoint
from data.common import gpt2_encoding
from settings import refuse_renamed
from system import autocast, fail, resolve_device, resolve_dtype

refuse_renamed(sys.argv[1:], {"--hf": "--init_from (a Hugging Face model: a directory or a hub name)"})
parser = argparse.ArgumentParser(description="Sample text from a checkpoint written by train.py.", allow_abbrev=False)
parser.add_argument("--out_dir", default="out", help="the run directory: ckpt.pt, or the sharded ckpt-N folders of torchrun (default: out)")
parser.add_argument("--init_from", default="resume", help="resume (default): the checkpoint in --out_dir; or a Hugging "
                    "Face model, a directory (export.py's) or a hub name (gpt2, ...), which needs requirements-hf.txt")
parser.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file (default: a newline)")
parser.add_argument("--num_samples", type=int, default=3, help="how many samples (default: 3)")
parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens generated per sample (default: 500)")
parser.add_argument("--temperature", type=float, default=0.8, help="below 1 is more conservative, 0 is greedy (default: 0.8)")
parser.add_argument("--top_k", type=int, default=200, help="sample among the k most likely tokens only; 0 for all (default: 200)")
parser.add_argument("--seed", type=int, default=1337)
parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="the matmuls' precision: auto is bfloat16 on a CUDA GPU that has it, else float32 (default: auto)")
parser.add_argument("--no_cache", action="store_true", help="recompute the whole context at every step (slow; for comparison)")
args = parser.parse_args()
if args.num_samples < 1:
    fail(f"--num_samples must be at least 1, not {args.num_samples}")
if args.max_new_tokens < 0:
    fail(f"--max_new_tokens must not be negative, not {args.max_new_tokens}")
if not (math.isfinite(args.temperature) and args.temperature >= 0):
    fail(f"--temperature must be a number of at least 0 (0 is greedy), not {args.temperature}")
if args.top_k < 0:
    fail(f"--top_k must not be negative (0 samples among all tokens), not {args.top_k}")

# -----------------------------------------------------------------------------
# model and tokenizer: a checkpoint's, whose dataset meta names the tokenizer (the character table, or the
# BPE's name), or a Hugging Face model's own
device = resolve_device(args.device)
if args.init_from == "resume":
    model, ckpt = checkpoint.load_model(args.out_dir, device)
    meta = ckpt["meta"]
    if "stoi" in meta:  # characters
        stoi, itos = meta["stoi"], meta["itos"]

        def encode(s):
            missing = sorted(set(s) - set(stoi))
            if missing:
                fail(f"the prompt has {''.join(missing)!r}, which the model's character vocabulary lacks; use only "
                     f"these characters: {''.join(sorted(stoi))!r}")
            return [stoi[c] for c in s]

        def decode(ids):
            return "".join(itos[i] for i in ids)
    elif meta.get("tokenizer") == "gpt2":  # GPT-2's BPE
        enc = gpt2_encoding()

        def encode(s):
            try:
                return enc.encode(s, allowed_special={"<|endoftext|>"})
            except Exception as e:  # e.g. text that is not valid Unicode
                fail(f"the GPT-2 tokenizer cannot encode the prompt ({e}); give it as UTF-8 text")

        def decode(ids):
            return enc.decode(ids)
    else:
        fail(f"the checkpoint's dataset meta names no tokenizer this script knows ({sorted(meta)}); expected a "
             f"character table (stoi, itos) or tokenizer 'gpt2'")
else:
    import hf
    from transformers import AutoTokenizer
    model = hf.from_pretrained(args.init_from).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
    except Exception as e:
        fail(f"{args.init_from} has no tokenizer that transformers can load ({type(e).__name__}); add the model's "
             f"tokenizer files")

    def encode(s):
        try:
            return tokenizer(s)["input_ids"]
        except Exception as e:  # e.g. a character outside a character vocabulary
            fail(f"the model's tokenizer cannot encode the prompt ({str(e).splitlines()[0]}); give text made of "
                 f"what it knows (a character-level model: the characters of its training text)")

    def decode(ids):
        return tokenizer.decode(ids)
ctx = autocast(device, resolve_dtype(args.dtype, device))

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
