"""Small on-disk datasets for tests (megatron-core IndexedDatasetBuilder, random documents)."""
from __future__ import annotations

import json
import os

import numpy as np
import torch


def write_random_dataset(prefix: str, vocab_size: int = 256, num_docs: int = 200,
                         seed: int = 0, min_len: int = 20, max_len: int = 300) -> str:
    """Documents of random tokens that follow a simple learnable pattern, each ending in EOD."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    rng = np.random.default_rng(seed)
    eod = vocab_size - 1
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(num_docs):
        n = int(rng.integers(min_len, max_len))
        start = int(rng.integers(0, vocab_size - 1))
        step = int(rng.integers(1, 4))
        doc = (start + step * np.arange(n)) % (vocab_size - 1)  # predictable: loss can fall
        noise = rng.random(n) < 0.1
        doc[noise] = rng.integers(0, vocab_size - 1, noise.sum())
        builder.add_document(torch.tensor(np.append(doc, eod), dtype=torch.int64), [n + 1])
    builder.finalize(prefix + ".idx")
    with open(prefix + ".tokenizer.json", "w") as f:
        json.dump({"kind": "synthetic", "vocab_size": vocab_size, "eod": eod, "sha256": "none"}, f)
    return prefix
