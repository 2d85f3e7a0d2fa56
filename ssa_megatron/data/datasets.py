"""Training data: megatron-core GPTDatasets (weighted blends, splits) and a resumable sampler."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import get_blend_from_list

from ssa_megatron.errors import ConfigError


@dataclass
class DataTokenizerInfo:
    vocab_size: int
    eod: int
    description: dict


def parse_blend(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    if len(data_path) > 1 and len(data_path) % 2 == 0:
        try:
            [float(x) for x in data_path[0::2]]
        except ValueError:
            pass
        else:
            prefixes, weights = get_blend_from_list(list(data_path))
            return prefixes, weights
    for item in data_path:
        try:
            float(item)
        except ValueError:
            continue
        raise ConfigError(f"--data-path {' '.join(data_path)}: a blend needs weight/prefix pairs, "
                          "e.g. --data-path 0.7 A 0.3 B")
    return list(data_path), None


def index_fingerprints(data_path: Sequence[str]) -> dict:
    """{prefix: sha256 of its .idx} of the datasets of ``--data-path`` that exist: cheap (the
    index, not the tokens), and it changes when a dataset is rebuilt under the same prefix."""
    from ssa_megatron.data.tokenizer import file_sha256
    prefixes, _ = parse_blend(data_path)
    return {p: file_sha256(p + ".idx") for p in prefixes if os.path.isfile(p + ".idx")}


def check_data_files(prefixes: Sequence[str]) -> None:
    """Refuse, in one line, a missing, truncated or mismatched .bin/.idx pair (an interrupted copy,
    or an .idx of another corpus) before anything is built from it."""
    for prefix in prefixes:
        stem, ext = os.path.splitext(prefix)
        if ext in (".bin", ".idx") and os.path.isfile(stem + ".bin") and os.path.isfile(stem + ".idx"):
            raise ConfigError(f"--data-path {prefix}: pass the dataset prefix {stem} (without {ext})")
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ConfigError(f"data file {prefix + ext} does not exist: build it with "
                                  "tools/preprocess_data.py or fix --data-path")
        check_index_matches_data(prefix)


_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_INDEX_HEADER = len(_INDEX_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequences, documents
_ITEM_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron-core DType codes


def check_index_matches_data(prefix: str) -> None:
    """The .idx header, the .idx size and the .bin size it implies must all agree (megatron-core's
    IndexedDataset format; the last sequence ends where the .bin ends)."""
    import struct

    import numpy as np
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    redo = "copy the pair again, or rebuild both with tools/preprocess_data.py"
    idx_size, bin_size = os.path.getsize(idx), os.path.getsize(bin_)
    with open(idx, "rb") as f:
        head = f.read(_INDEX_HEADER)
    if len(head) < _INDEX_HEADER or head[:len(_INDEX_MAGIC)] != _INDEX_MAGIC:
        raise ConfigError(f"data index {idx} is not a megatron index file ({idx_size} bytes, header "
                          f"{'too short' if len(head) < _INDEX_HEADER else 'wrong'}): {redo}")
    code = head[len(_INDEX_MAGIC) + 8]
    n_seq, n_doc = struct.unpack("<QQ", head[-16:])
    item = _ITEM_SIZES.get(code)
    expected_idx = _INDEX_HEADER + n_seq * (4 + 8) + n_doc * 8
    if item is None or idx_size < expected_idx:
        raise ConfigError(f"data index {idx} is {idx_size} bytes, its header describes {expected_idx} "
                          f"(a truncated copy?): {redo}")
    expected_bin = 0
    if n_seq:
        lengths = np.memmap(idx, dtype=np.int32, mode="r", offset=_INDEX_HEADER, shape=(n_seq,))
        pointers = np.memmap(idx, dtype=np.int64, mode="r", offset=_INDEX_HEADER + 4 * n_seq, shape=(n_seq,))
        expected_bin = int(pointers[-1]) + int(lengths[-1]) * item
    if bin_size != expected_bin:
        why = "truncated" if bin_size < expected_bin else "longer than its index"
        raise ConfigError(f"data file {bin_} is {bin_size} bytes but {idx} describes {expected_bin} "
                          f"bytes ({why}: an interrupted copy, or an .idx of another corpus): {redo}")
    from ssa_megatron.data.metadata import metadata_path
    meta = _dataset_record(prefix)
    if meta is not None and meta.get("tokens") is not None and int(meta["tokens"]) * item != expected_bin:
        raise ConfigError(f"data index {idx} describes {expected_bin // item} tokens but "
                          f"{metadata_path(prefix)} records {meta['tokens']} "
                          f"(an .idx of another corpus?): {redo}")


def _dataset_record(prefix: str) -> Optional[dict]:
    """The "dataset" part of the record beside ``prefix`` (None: no readable record)."""
    from ssa_megatron.data.corpus import CorpusError
    from ssa_megatron.data.metadata import read_metadata
    try:
        meta = read_metadata(prefix)
    except CorpusError:
        return None
    record = (meta or {}).get("dataset")
    return record if isinstance(record, dict) else None


def read_tokenizer_info(prefixes: Sequence[str], vocab_size: Optional[int]) -> DataTokenizerInfo:
    """The tokenizer recorded next to the data; every blended dataset must agree."""
    from ssa_megatron.data.metadata import metadata_path, read_metadata
    infos = []
    for prefix in prefixes:
        record = read_metadata(prefix)
        if record is not None:
            meta = dict(record["tokenizer"])
            bos = record["dataset"].get("bos")
            if bos is not None:  # what begins each document (checkpoints carry it on)
                meta["bos"] = list(bos)
            infos.append((prefix, meta))
    if not infos:
        if vocab_size is None:
            raise ConfigError(f"no {metadata_path(prefixes[0])}: preprocess the data with "
                              "tools/preprocess_data.py, or pass --vocab-size")
        return DataTokenizerInfo(vocab_size, vocab_size - 1, {"kind": "unknown"})
    first_prefix, first = infos[0]
    for prefix, meta in infos[1:]:
        if meta["vocab_size"] != first["vocab_size"] or meta.get("sha256") != first.get("sha256"):
            raise ConfigError(f"datasets {first_prefix} and {prefix} were tokenised with different "
                              "tokenizers; re-preprocess them with one tokenizer")
    if vocab_size is not None and vocab_size < first["vocab_size"]:
        raise ConfigError(f"--vocab-size {vocab_size} does not match the tokenizer of {first_prefix} "
                          f"(vocab size {first['vocab_size']}); drop --vocab-size or re-preprocess")
    # a larger --vocab-size: an imported model whose embedding has rows beyond its tokenizer
    # (Qwen2: 151936 rows, 151665 tokens); the output layer keeps them, as the source does
    return DataTokenizerInfo(int(vocab_size or first["vocab_size"]), int(first["eod"]), first)


def split_bounds(split: str):
    """--split "969,30,1" -> (weights, cumulative fractions [0, train, train+valid, 1]), the way
    megatron-core cuts documents into train/valid/test."""
    try:
        weights = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--split {split!r} must be three numbers like 969,30,1") from None
    if len(weights) != 3 or sum(weights) <= 0 or min(weights) < 0:
        raise ConfigError(f"--split {split!r} must be three non-negative numbers like 969,30,1")
    total = sum(weights)
    bounds = [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w / total)
    return weights, bounds


def _effective_split(split: str, num_samples: Sequence[int], prefixes: Sequence[str]) -> str:
    """The split megatron-core should build, checked against the documents there are.

    Held-out documents stay held out even when no samples are drawn from them (a split keeps its
    share of documents whatever the run asks of it). A split that gets no document at all is
    refused when samples are asked of it and dropped otherwise (megatron-core would loop forever
    looking for tokens in it).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    weights, bounds = split_bounds(split)
    names = ("train", "valid", "test")
    empty = set()
    for prefix in prefixes:
        n_docs = len(IndexedDataset(prefix, mmap=True).document_indices) - 1
        for i, name in enumerate(names):
            if weights[i] > 0 and round(bounds[i + 1] * n_docs) - round(bounds[i] * n_docs) < 1:
                if num_samples[i] > 0:
                    raise ConfigError(f"--split {split} leaves the {name} split of {prefix} "
                                      f"({n_docs} documents) empty; give it a larger share or more data "
                                      "(a few large text files: preprocess them with --text-unit "
                                      "paragraph)")
                empty.add(i)
    weights = [0.0 if i in empty else w for i, w in enumerate(weights)]
    if weights[0] == 0:
        raise ConfigError(f"--split {split!r} gives no documents to the training split")
    return ",".join(f"{w:g}" for w in weights)


class _DatasetTokenizer:
    """What megatron-core's GPTDataset asks of a tokenizer: ids, and an identity for its cache.
    The identity also carries the data's index fingerprints: megatron-core keys its sample-index
    cache (``<prefix dir>/cache``) by path, split, seed and tokenizer, so a dataset rebuilt under
    the same prefix would otherwise reuse the old indices (an IndexError, or wrong samples)."""

    def __init__(self, info: DataTokenizerInfo, data_fingerprints: dict):
        self.eod = info.eod
        self.pad = -1  # no pad id: GPTDataset then never masks real tokens as padding
        self.vocab_size = info.vocab_size
        self.unique_identifiers = {"class": "ssa_megatron", "vocab_size": info.vocab_size,
                                   "eod": info.eod, "sha256": info.description.get("sha256"),
                                   "data_index_sha256": data_fingerprints}


def build_datasets(args, info: DataTokenizerInfo, num_samples: Sequence[int],
                   fingerprints: Optional[dict] = None):
    """Train/valid/test GPTDatasets through BlendedMegatronDatasetBuilder (call on every rank).
    ``fingerprints``: :func:`index_fingerprints` of ``args.data_path`` if already computed."""
    prefixes, weights = parse_blend(args.data_path)
    check_data_files(prefixes)
    split = _effective_split(args.split, num_samples, prefixes)
    args.split = split  # recorded in checkpoints, so evaluation cuts the same held-out documents
    token_info = _DatasetTokenizer(info, fingerprints if fingerprints is not None
                                   else index_fingerprints(args.data_path))
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=args.data_cache_path,
        tokenizer=token_info,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()


class ResumableSampler:
    """Megatron-LM's pretraining sampler: global order, each DP rank takes its slice of every
    micro-batch, starting after ``consumed_samples`` so a resumed run reads the exact next sample."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        self.total = total_samples
        self.consumed = consumed_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __len__(self):
        return (self.total - self.consumed) // (self.mbs * self.dp_size)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.mbs * self.dp_size
        for start in range(self.consumed, self.total - step + 1, step):
            lo = start + self.dp_rank * self.mbs
            yield list(range(lo, lo + self.mbs))


def make_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                num_workers: int = 1):
    if dataset is None:
        return None
    sampler = ResumableSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False)
