"""
Command: python export.py --out_dir=DIR --to=HF_DIR

Write a checkpoint of train.py as a Hugging Face model directory, which transformers loads with no
code of ours (AutoModelForCausalLM, AutoTokenizer, pipelines, lm-evaluation-harness):

    python export.py --out_dir=out --to=out/hf

It holds config.json and model.safetensors (GPT2LMHeadModel for --arch=gpt2, LlamaForCausalLM for
--arch=llama) and the dataset's tokenizer: GPT-2's BPE (derived here from the tiktoken ranks, no
download) or the character vocabulary of the char datasets. A model vocabulary padded beyond the
tokenizer's is cut to the tokenizer's size: those ids are never trained and no tokenizer can decode
them. Going back: python train.py --init_from=out/hf. The conversion itself is hf.py's. Needs
requirements-hf.txt (transformers, safetensors).
"""

import argparse
import os
import shutil

import checkpoint
from system import fail

WRITTEN = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja"}


def main():
    parser = argparse.ArgumentParser(description="Write a train.py checkpoint as a Hugging Face model directory.",
                                     allow_abbrev=False)
    parser.add_argument("--out_dir", default="out", help="the run directory: ckpt.pt, or the sharded ckpt-N folders of torchrun (default: out)")
    parser.add_argument("--to", default=None, help="the directory to write (default: OUT_DIR/hf)")
    args = parser.parse_args()
    to = args.to or os.path.join(args.out_dir, "hf")
    if os.path.exists(to) and not (os.path.isdir(to) and set(os.listdir(to)) <= WRITTEN):
        fail(f"{to} exists and holds other files than an earlier export; choose another --to")
    try:
        import safetensors  # noqa: F401  (save_pretrained writes model.safetensors with it)
        import transformers
    except ImportError:
        fail("export.py needs transformers and safetensors: pip install -r requirements-hf.txt")
    import hf
    transformers.logging.disable_progress_bar()
    model, ckpt = checkpoint.load_model(args.out_dir)
    meta = ckpt["meta"]
    try:
        tokenizer = hf.hf_tokenizer(meta)
    except ValueError as e:
        fail(f"{e}; export.py writes GPT-2 BPE and character tokenizers only")
    if meta["vocab_size"] > model.config.vocab_size:
        fail(f"the tokenizer has {meta['vocab_size']} tokens, the model only {model.config.vocab_size}")

    # write everything into a fresh directory beside the target, then swap it in: never half an export
    tmp = to.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    eos = 50256 if meta.get("tokenizer") == "gpt2" else None  # characters have no end-of-text token
    hf.hf_model(model, meta["vocab_size"], eos).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if "stoi" not in meta:
        tokenizer.backend_tokenizer.model.save(tmp)  # also GPT-2's vocab.json and merges.txt
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp):  # the files as any other the user writes (safetensors makes its file 0600)
        os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    shutil.rmtree(to, ignore_errors=True)
    os.replace(tmp, to)
    print(f"wrote {to}: {model.config.arch} model ({model.get_num_params(False) / 1e6:.2f}M parameters, "
          f"vocabulary {meta['vocab_size']}), config.json, model.safetensors and the tokenizer")


if __name__ == "__main__":
    main()
