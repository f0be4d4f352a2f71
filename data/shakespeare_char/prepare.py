"""
Shakespeare, character level: 42 modern-spelling texts (about 5 MB) mapped to integers, one per
character. Writes train.bin and val.bin (uint16 ids, first 90% / last 10% of the text) and meta.pkl
(vocab_size, stoi, itos) next to this file, as nanoGPT does.

    python data/shakespeare_char/prepare.py
"""

import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for common.py
from common import shakespeare_text

out_dir = os.path.dirname(os.path.abspath(__file__))
text = shakespeare_text()
chars = sorted(set(text))
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}
print(f"{len(text):,} characters, vocabulary of {len(chars)}: {''.join(chars)!r}")

n = int(0.9 * len(text))
for split, part in (("train", text[:n]), ("val", text[n:])):
    ids = np.array([stoi[c] for c in part], dtype=np.uint16)
    ids.tofile(os.path.join(out_dir, f"{split}.bin.tmp"))
    os.replace(os.path.join(out_dir, f"{split}.bin.tmp"), os.path.join(out_dir, f"{split}.bin"))
    print(f"{split}.bin: {len(ids):,} tokens")
# meta.pkl last: its presence says the dataset is complete
with open(os.path.join(out_dir, "meta.pkl.tmp"), "wb") as f:
    pickle.dump({"vocab_size": len(chars), "stoi": stoi, "itos": itos}, f)
os.replace(os.path.join(out_dir, "meta.pkl.tmp"), os.path.join(out_dir, "meta.pkl"))
