"""Small on-disk datasets for tests (megatron-core IndexedDatasetBuilder, random documents)."""
from __future__ import annotations

import os

import numpy as np
import torch

from ssa_megatron.data.metadata import write_synthetic_record


def write_random_dataset(prefix: str, vocab_size: int = 256, num_docs: int = 200,
                         seed: int = 0, min_len: int = 20, max_len: int = 300) -> str:
    """Documents of random tokens that follow a simple learnable pattern, each ending in EOD."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    rng = np.random.default_rng(seed)
    eod = vocab_size - 1
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    tokens = 0
    for _ in range(num_docs):
        n = int(rng.integers(min_len, max_len))
        tokens += n + 1
        start = int(rng.integers(0, vocab_size - 1))
        step = int(rng.integers(1, 4))
        doc = (start + step * np.arange(n)) % (vocab_size - 1)  # predictable: loss can fall
        noise = rng.random(n) < 0.1
        doc[noise] = rng.integers(0, vocab_size - 1, noise.sum())
        builder.add_document(torch.tensor(np.append(doc, eod), dtype=torch.int64), [n + 1])
    builder.finalize(prefix + ".idx")
    write_synthetic_record(prefix, vocab_size, eod, num_docs, tokens)
    return prefix
