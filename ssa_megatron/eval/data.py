"""Evaluation token streams and the windows cut from them.

A *stream* is one 1-D integer array: the documents of a .bin/.idx split (in file order, each
ending with its EOD token as preprocessed), or raw text / jsonl documents tokenised on the fly
with the checkpoint's tokenizer (EOD appended after each). Windows are cut from it the way
training sees text: contiguous, crossing document boundaries.

Windows of ``length`` L score the L next-token predictions of ``stream[s : s + L + 1]``.
Without a stride they tile the stream (start ``i * L``); with ``stride`` S < L (sliding-window
evaluation of long texts) window i starts at ``i * S`` and scores only its last S targets (the
first window scores all of its L), so every target is predicted once, with at least L - S tokens
of context. Only whole windows are used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ssa_megatron.eval.model import EvalError

SPLIT_NAMES = ("train", "valid", "test")


def split_document_range(num_docs: int, split: str, name: str) -> Tuple[int, int]:
    """Documents [first, last) of split ``name`` the way megatron-core's dataset builder cuts a
    ``--split`` like ``969,30,1`` (fractions of the document count, rounded bounds)."""
    if name == "all":
        return 0, num_docs
    if name not in SPLIT_NAMES:
        raise EvalError(f"--split-name {name!r}: use one of train, valid, test, all")
    from ssa_megatron.data.datasets import split_bounds
    from ssa_megatron.errors import ConfigError
    try:
        _, bounds = split_bounds(split)
    except ConfigError as err:
        raise EvalError(str(err)) from None
    i = SPLIT_NAMES.index(name)
    first, last = int(round(bounds[i] * num_docs)), int(round(bounds[i + 1] * num_docs))
    if last <= first:
        raise EvalError(f"the {name} split of --split {split} holds no document of the "
                        f"{num_docs}; pick another --split-name (or all) or pass --split")
    return first, last


def indexed_stream(prefix: str, split: str = "969,30,1", split_name: str = "all") -> np.ndarray:
    """The tokens of a split of a megatron-core .bin/.idx dataset (a read-only memory map)."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise EvalError(f"data file {prefix + ext} does not exist; pass the prefix that "
                            "tools/preprocess_data.py wrote (without .bin/.idx)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix, mmap=True)
    doc_index = ds.document_indices  # sequence index where each document starts (+ the end)
    first_doc, last_doc = split_document_range(len(doc_index) - 1, split, split_name)
    seq0, seq1 = int(doc_index[first_doc]), int(doc_index[last_doc])
    dtype = ds.index.dtype
    itemsize = np.dtype(dtype).itemsize
    start = int(ds.index.sequence_pointers[seq0]) // itemsize
    if seq1 < len(ds.index.sequence_pointers):
        end = int(ds.index.sequence_pointers[seq1]) // itemsize
    else:
        end = int(ds.index.sequence_pointers[-1]) // itemsize + int(ds.index.sequence_lengths[-1])
    return np.memmap(prefix + ".bin", dtype=dtype, mode="r")[start:end]


def text_stream(paths: Sequence[str], tokenizer, json_keys: Sequence[str] = ("text",),
                max_tokens: Optional[int] = None, prefix: Optional[Sequence[int]] = None) -> np.ndarray:
    """Raw .txt/.jsonl(.gz/.zst...) documents tokenised with ``tokenizer`` as the preprocessor
    tokenises training data: the tokenizer's document prefix (an imported Llama's BOS) before
    each (``prefix``: other ids instead, e.g. those the training data recorded), EOD after each."""
    from ssa_megatron.data.corpus import CorpusError, expand_inputs, iter_documents
    try:
        files = expand_inputs(list(paths), flag="--text")
        out: List[int] = []
        prefix = tokenizer.document_prefix() if prefix is None else list(prefix)
        for _, text in iter_documents(files, json_keys=json_keys):
            out.extend(prefix)
            out.extend(tokenizer.tokenize(text))
            if tokenizer.eod is not None:
                out.append(tokenizer.eod)
            if max_tokens is not None and len(out) >= max_tokens:
                break
    except CorpusError as e:
        raise EvalError(str(e)) from None
    if not out:
        raise EvalError(f"no text in {', '.join(paths)}")
    return np.asarray(out, dtype=np.int64)


@dataclass
class Window:
    start: int        # first token of the window in the stream
    score_from: int   # targets before this position of the window are context only


def make_windows(num_tokens: int, length: int, stride: Optional[int] = None,
                 max_windows: Optional[int] = None) -> List[Window]:
    """Windows of ``length`` predictions (``length + 1`` tokens) over a stream."""
    if length < 1:
        raise EvalError("--seq-length must be positive")
    stride = length if not stride else stride
    if not 0 < stride <= length:
        raise EvalError(f"--stride {stride} must lie in 1..{length} (the sequence length)")
    out: List[Window] = []
    start = 0
    while start + length + 1 <= num_tokens:
        out.append(Window(start, 0 if start == 0 else length - stride))
        if max_windows is not None and len(out) >= max_windows:
            break
        start += stride
    return out


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share of ``items`` (round robin)."""
    return items[rank::world]


def batch_windows(stream: np.ndarray, windows: Sequence[Window], length: int):
    """tokens [B, L], labels [B, L], loss mask [B, L] (float) as torch tensors."""
    import torch
    toks = np.stack([np.asarray(stream[w.start: w.start + length + 1], dtype=np.int64)
                     for w in windows])
    mask = np.ones((len(windows), length), dtype=np.float32)
    for i, w in enumerate(windows):
        mask[i, : w.score_from] = 0.0
    t = torch.from_numpy(toks)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous(), torch.from_numpy(mask)
