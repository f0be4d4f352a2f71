"""
Command: python data/shakespeare_char/prepare.py (train.py runs it when the data is missing)

Shakespeare, character level: 42 modern-spelling texts (about 5 MB) mapped to integers, one per
character. Writes train.bin and val.bin (uint16 ids, first 90% / last 10% of the text) and meta.pkl
(vocab_size, stoi, itos) in data/shakespeare_char (or $NANOMILE_DATA/shakespeare_char), as nanoGPT does.

    python data/shakespeare_char/prepare.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for common.py
from common import dataset_dir, shakespeare_text, write_dataset

out_dir = dataset_dir("shakespeare_char")
os.makedirs(out_dir, exist_ok=True)
text = shakespeare_text()
chars = sorted(set(text))
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}
print(f"{len(text):,} characters, vocabulary of {len(chars)}: {''.join(chars)!r}")

n = int(0.9 * len(text))  # the first 90% for training, the last 10% for validation
write_dataset(out_dir, {"train": [stoi[c] for c in text[:n]], "val": [stoi[c] for c in text[n:]]},
              {"vocab_size": len(chars), "stoi": stoi, "itos": itos})
