"""The tokenizer record kept next to a preprocessed dataset: ``<prefix>.tokenizer.json``.

Written by :mod:`ssa_megatron.data.preprocess` (last but one, before the ``.idx``), read at training
time by :func:`check_dataset_tokenizer`. Format (version 1)::

    {
      "format": "ssa_megatron.dataset.tokenizer", "version": 1,
      "tokenizer": {"kind": "sentencepiece" | "huggingface", "vocab_size": int, "eod": int,
                    "sha256": hex of the tokenizer file, "path": absolute path it was read from,
                    "file": name of the copy next to the dataset (same directory) or null},
      "dataset": {"prefix": base name, "dtype": "uint16" | "int32", "documents": int,
                  "tokens": int (EOD included), "append_eod": bool, "bos": [int] (ids before
                  each document; absent in older records: none), "json_key": str | null,
                  "input_format": str, "text_unit": str, "inputs": [absolute paths],
                  "inputs_sha256": hex, "skipped": {reason: count}},
      "created": ISO-8601 UTC time, "tool": "ssa_megatron <version> preprocess"
    }

Synthetic corpora (benchmarks, fault injection, tests) write the same record with tokenizer kind
"synthetic" through :func:`write_synthetic_record`. Records of earlier versions that held only the
tokenizer fields (``{"kind", "vocab_size", "eod", "sha256"}``) read as version 0 with an empty
"dataset" part.

This module imports nothing heavy (no torch, no megatron) so training code can use it freely.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

from ssa_megatron.data.corpus import CorpusError

FORMAT = "ssa_megatron.dataset.tokenizer"
VERSION = 1
SUFFIX = ".tokenizer.json"


def metadata_path(prefix: str) -> str:
    return os.fspath(prefix) + SUFFIX


def tokenizer_copy_name(prefix: str, kind: str) -> str:
    """File name (in the dataset's directory) of the tokenizer copy kept with the dataset."""
    base = os.path.basename(os.fspath(prefix))
    return base + (".tokenizer.model" if kind == "sentencepiece" else ".hf-tokenizer.json")


def read_metadata(prefix: str) -> Optional[dict]:
    """The metadata dict of dataset ``prefix``, or None if the dataset has none."""
    path = metadata_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CorpusError(f"cannot read dataset metadata {path}: {e}; rebuild the dataset with "
                          f"tools/preprocess_data.py") from None
    if isinstance(meta, dict) and "format" not in meta and {"kind", "vocab_size", "eod"} <= meta.keys():
        return {"format": FORMAT, "version": 0, "tokenizer": meta, "dataset": {}}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorpusError(f"{path} is not an ssa_megatron dataset metadata file; rebuild the dataset "
                          f"with tools/preprocess_data.py")
    return meta


def write_synthetic_record(prefix: str, vocab_size: int, eod: int, documents: int, tokens: int,
                           dtype: str = "uint16") -> str:
    """The record of a corpus of generated token ids (no tokenizer file): kind "synthetic"."""
    import datetime

    from ssa_megatron import __version__
    record = {"format": FORMAT, "version": VERSION,
              "tokenizer": {"kind": "synthetic", "vocab_size": int(vocab_size), "eod": int(eod),
                            "sha256": "none", "path": None, "file": None},
              "dataset": {"prefix": os.path.basename(os.fspath(prefix)), "dtype": dtype,
                          "documents": int(documents), "tokens": int(tokens), "append_eod": True,
                          "json_key": None, "input_format": "synthetic", "text_unit": "document",
                          "inputs": [], "inputs_sha256": None, "skipped": {}},
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "tool": f"ssa_megatron {__version__} synthetic"}
    path = metadata_path(prefix)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    return path


def dataset_tokenizer_file(prefix: str) -> Optional[str]:
    """Path of the tokenizer copy stored with dataset ``prefix`` (None if absent)."""
    meta = read_metadata(prefix)
    if not meta or not meta["tokenizer"].get("file"):
        return None
    p = os.path.join(os.path.dirname(os.path.abspath(prefix)), meta["tokenizer"]["file"])
    return p if os.path.exists(p) else None


def check_dataset_tokenizer(
    prefix: str,
    vocab_size: Optional[int] = None,
    tokenizer: Union[None, str, "object"] = None,
    require: bool = False,
) -> Optional[dict]:
    """Check that dataset ``prefix`` can be trained with this vocabulary / tokenizer.

    * ``vocab_size``: the model's (possibly padded) vocabulary size; error if the dataset's tokenizer
      has more ids than that (its ids would index past the embedding table).
    * ``tokenizer``: a tokenizer (anything with ``describe()``) or a tokenizer path; error if its
      file differs from the one the dataset was built with.
    * ``require``: error if the dataset has no metadata (else return None).

    Returns the metadata dict. Errors are :class:`CorpusError` with a one-line message.
    """
    meta = read_metadata(prefix)
    if meta is None:
        if require:
            raise CorpusError(f"dataset {prefix} has no {SUFFIX} (tokenizer record); rebuild it with "
                              f"tools/preprocess_data.py")
        return None
    tok = meta["tokenizer"]
    if vocab_size is not None and int(tok["vocab_size"]) > int(vocab_size):
        raise CorpusError(
            f"dataset {prefix} was tokenized with a {tok['vocab_size']}-token {tok['kind']} tokenizer "
            f"but the model vocabulary has {vocab_size} entries; use the dataset's tokenizer "
            f"({tok.get('path')}) or rebuild the data with yours")
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            from ssa_megatron.data.tokenizer import build_tokenizer

            tokenizer = build_tokenizer(os.fspath(tokenizer))
        mine = tokenizer.describe()
        if mine["sha256"] != tok["sha256"]:
            what = ("vocab size %d vs %d" % (mine["vocab_size"], tok["vocab_size"])
                    if mine["vocab_size"] != tok["vocab_size"] else "same vocab size, different file")
            raise CorpusError(
                f"dataset {prefix} was built with tokenizer {tok.get('path')} but training uses "
                f"{mine['path']} ({what}); pass the dataset's tokenizer or rebuild the data")
    return meta


__all__ = [
    "FORMAT", "VERSION", "SUFFIX", "metadata_path", "tokenizer_copy_name", "read_metadata",
    "write_synthetic_record", "dataset_tokenizer_file", "check_dataset_tokenizer",
]
