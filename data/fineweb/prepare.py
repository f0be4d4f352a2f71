"""
Command: python data/fineweb/prepare.py [--files PATH ...] [--hf_dataset NAME ...]

A large corpus in shards, GPT-2 BPE: FineWeb-Edu's 10B-token sample by default, any Hugging Face
dataset with a text field, or local .jsonl / .parquet / .txt files.

    python data/fineweb/prepare.py                                # FineWeb-Edu sample-10BT, streamed
    python data/fineweb/prepare.py --hf_dataset=monology/pile-uncopyrighted --hf_name=default --max_tokens=2e9
    python data/fineweb/prepare.py --files='corpus/*.jsonl' --dataset=data/mycorpus
    python train.py config/paper_468m.py                          # dataset = "fineweb"
    python train.py --dataset=data/mycorpus ...

--dataset names the folder as train.py's --dataset does: a name is a folder of data/, a path is itself.

Documents are tokenised in parallel processes, each followed by <|endoftext|>, and written in
order: the first val_tokens tokens to val_000000.bin, the rest to train_000001.bin, train_000002.bin,
... (uint16, shard_size tokens each, the last one shorter). The document that straddles the val/train
boundary is cut there and its rest dropped, so no text is in both splits. meta.pkl comes last
(vocabulary, tokenizer, the training split's token counts for the frequency buckets): its presence
says the dataset is complete. Interrupted? Run the same command again: it continues after the last
complete shard (progress.json), skipping the documents already written.

Streaming from the Hugging Face hub needs `pip install datasets`; .parquet files need pyarrow.
Local files: .jsonl is one JSON object per line with the text under --text_field; .parquet reads
that column; .txt is one document per line (--txt_split=line, as the datasets text loader),
per blank-line-separated paragraph, or per file.
"""

import argparse
import glob
import json
import multiprocessing as mp
import os
import pickle
import sys
from itertools import islice

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for common.py
from common import dataset_dir, gpt2_encoding

EOT = 50256  # GPT-2's <|endoftext|>


def read_documents(args):
    """The corpus as an iterator of non-empty strings, in a fixed order (so a rerun can skip ahead)."""
    if not args.files:
        try:
            from datasets import load_dataset
        except ImportError:
            sys.exit("error: streaming from the Hugging Face hub needs the datasets package: pip install datasets "
                     "(or give local .jsonl/.parquet/.txt files with --files)")
        rows = load_dataset(args.hf_dataset, name=args.hf_name, split=args.hf_split, streaming=True)
        return (row[args.text_field] for row in rows if row[args.text_field])
    paths = sorted(p for pattern in args.files for p in glob.glob(pattern))
    if not paths:
        sys.exit(f"error: no file matches {' '.join(args.files)}; give existing .jsonl, .parquet or .txt files")
    for path in paths:
        if not path.endswith((".jsonl", ".parquet", ".txt")):
            sys.exit(f"error: {path} is not .jsonl, .parquet or .txt; convert it, or load it with --hf_dataset")
    return (doc for path in paths for doc in read_file(path, args) if doc)


def read_file(path, args):
    """The documents of one local file."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if args.text_field not in row:
                        sys.exit(f"error: line {n} of {path} has no {args.text_field!r} field; name the field "
                                 f"with --text_field (it has {', '.join(row)})")
                    yield row[args.text_field]
    elif path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            sys.exit("error: reading .parquet needs pyarrow: pip install pyarrow")
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[args.text_field]):
            yield from batch.column(0).to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            if args.txt_split == "file":
                yield f.read()
            elif args.txt_split == "line":
                yield from (line.rstrip("\n") for line in f)
            else:  # paragraphs: runs of lines between blank lines
                paragraph = []
                for line in f:
                    if line.strip():
                        paragraph.append(line)
                    elif paragraph:
                        yield "".join(paragraph).rstrip("\n")
                        paragraph = []
                if paragraph:
                    yield "".join(paragraph).rstrip("\n")


_enc = None


def init_worker():
    global _enc
    _enc = gpt2_encoding()


def tokenize(doc):
    """One document -> its GPT-2 tokens followed by <|endoftext|>, as uint16."""
    tokens = _enc.encode_ordinary(doc)
    tokens.append(EOT)
    return np.array(tokens, dtype=np.uint16)  # GPT-2's 50257 ids fit in 16 bits


def write_atomic(path, data):
    """Write bytes (or a numpy array's bytes) to a temporary file, then rename it over path: a kill
    leaves the old file or the new one, never half of one."""
    with open(path + ".tmp", "wb") as f:
        f.write(data if isinstance(data, bytes) else data.tobytes())
    os.replace(path + ".tmp", path)


def shard_name(index):
    return f"val_{index:06d}.bin" if index == 0 else f"train_{index:06d}.bin"


def prepare(args, documents):
    """Tokenise `documents` into shards in args.data_dir, continuing from progress.json if there is one."""
    os.makedirs(args.data_dir, exist_ok=True)
    if os.path.exists(os.path.join(args.data_dir, "meta.pkl")):
        print(f"{args.data_dir} is already prepared (meta.pkl exists); delete the folder to prepare it again")
        return
    # what must match for a rerun to continue the same work
    settings = {k: getattr(args, k) for k in ("hf_dataset", "hf_name", "hf_split", "text_field", "files", "txt_split",
                                              "shard_size", "val_tokens", "max_tokens")}
    progress_path = os.path.join(args.data_dir, "progress.json")
    # state at a shard boundary: shards written, documents fully written, tokens of the next one written
    state = {"settings": settings, "shards": 0, "docs": 0, "offset": 0, "tokens": 0}
    if os.path.exists(progress_path):
        with open(progress_path) as f:
            saved = json.load(f)
        if saved["settings"] != settings:
            sys.exit(f"error: {args.data_dir} holds an unfinished preparation with other settings ({saved['settings']}); "
                     f"run with those to continue, or delete the folder to start over")
        state = saved
        print(f"continuing after shard {state['shards'] - 1}: {state['docs']:,} documents, {state['tokens']:,} tokens done")

    init_worker()  # fetch the tokenizer once here, before the workers read it from the cache
    total = int(args.max_tokens) or None
    bar = tqdm(total=total, initial=state["tokens"], unit="tok", unit_scale=True, dynamic_ncols=True)
    shard = state["shards"]
    size = args.val_tokens if shard == 0 else args.shard_size
    buf, fill = np.empty(size, dtype=np.uint16), 0
    documents = islice(documents, state["docs"], None)  # skip what is already in the shards
    doc_index, skip = state["docs"], state["offset"]

    def flush(next_doc, offset):
        """Write the buffer as shard number `shard`, then record where the next shard starts."""
        nonlocal shard, buf, fill
        write_atomic(os.path.join(args.data_dir, shard_name(shard)), buf[:fill])
        state.update(shards=shard + 1, docs=next_doc, offset=offset, tokens=state["tokens"] + fill)
        write_atomic(progress_path, json.dumps(state).encode())
        shard += 1
        buf, fill = np.empty(args.shard_size, dtype=np.uint16), 0

    with mp.Pool(args.workers, initializer=init_worker) as pool:
        done = False
        while not done:
            batch = list(islice(documents, 64 * args.workers))  # a bounded batch: memory stays flat
            if not batch:
                break
            for tokens in pool.imap(tokenize, batch, chunksize=16):
                pos, skip = skip, 0  # a resumed run drops the part of its first document already written
                while pos < len(tokens):
                    take = min(len(tokens) - pos, len(buf) - fill)
                    if total:
                        take = min(take, total - state["tokens"] - fill)
                    buf[fill:fill + take] = tokens[pos:pos + take]
                    fill, pos = fill + take, pos + take
                    bar.update(take)
                    if total and state["tokens"] + fill >= total:
                        done = True
                        break
                    if fill == len(buf):
                        if shard == 0:  # the val/train boundary: drop the rest of this document
                            pos = len(tokens)
                        flush(doc_index + (pos == len(tokens)), pos % len(tokens))
                doc_index += 1
                if done:
                    break
    if fill:
        flush(doc_index, 0)
    bar.close()
    if shard < 2:
        sys.exit(f"error: the corpus gave only {state['tokens']:,} tokens, not enough for a val shard of "
                 f"{args.val_tokens:,} and any training tokens; lower --val_tokens or give more text")

    # the training split's token counts, for the frequency buckets of buckets.py
    counts = np.zeros(EOT + 1, dtype=np.int64)
    for index in tqdm(range(1, shard), desc="counting tokens", unit="shard"):
        counts += np.bincount(np.fromfile(os.path.join(args.data_dir, shard_name(index)), dtype=np.uint16),
                              minlength=len(counts))
    # a list, not an array: checkpoints carry the meta, and torch.load(weights_only=True) takes no numpy
    meta = {"vocab_size": EOT + 1, "tokenizer": "gpt2", "train_counts": counts.tolist()}
    write_atomic(os.path.join(args.data_dir, "meta.pkl"), pickle.dumps(meta))
    os.remove(progress_path)
    print(f"{args.data_dir}: {args.val_tokens:,} val tokens, {counts.sum():,} train tokens in {shard - 1} shards, "
          f"{doc_index:,} documents")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], allow_abbrev=False)
    parser.add_argument("--hf_dataset", default="HuggingFaceFW/fineweb-edu", help="Hugging Face dataset to stream")
    parser.add_argument("--hf_name", default="sample-10BT", help="its configuration (subset)")
    parser.add_argument("--hf_split", default="train")
    parser.add_argument("--text_field", default="text", help="the column or JSON key holding the text")
    parser.add_argument("--files", nargs="+", help="local .jsonl/.parquet/.txt files or globs, instead of --hf_dataset")
    parser.add_argument("--txt_split", default="line", choices=("line", "paragraph", "file"),
                        help="what a document is in a .txt file (default: a line)")
    parser.add_argument("--dataset", default="fineweb", help="where the shards go: a folder of data/ (default: "
                        "fineweb), or a path, as train.py's --dataset")
    parser.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per training shard")
    parser.add_argument("--val_tokens", type=int, default=10_000_000, help="tokens in the val shard")
    parser.add_argument("--max_tokens", type=float, default=0, help="stop after this many tokens; 0 for all")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenising processes")
    renamed = {"--hf": "--hf_dataset", "--out_dir": "--dataset (a folder of data/ or a path, as train.py's)"}
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.split("=", 1)[0] in renamed:
            sys.exit(f"error: {arg.split('=', 1)[0]} is now {renamed[arg.split('=', 1)[0]]}")
    args = parser.parse_args(argv)
    args.data_dir = dataset_dir(args.dataset)
    if args.shard_size < 1 or args.val_tokens < 1 or args.workers < 1 or args.max_tokens < 0:
        parser.error("shard_size, val_tokens and workers must be at least 1, max_tokens not negative")
    return args


if __name__ == "__main__":
    args = parse_args()
    prepare(args, read_documents(args))
