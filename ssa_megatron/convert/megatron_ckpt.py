"""Read and write ssa_megatron (DeepSpeed) checkpoints as one full megatron state dict, through
the checkpoint format's owner (training/checkpoint_format.py: file names, meta, manifest, latest).

Reading (:func:`read_checkpoint`) accepts a ``--save`` directory (its newest intact checkpoint) or
one tag directory, of any layout the format reads (PP, TP, ZeRO 0-3): each TP rank's weights come
in GPTModel names and the TP ranks are merged (layout.merge_tp).

Writing (:func:`write_checkpoint`) produces a *weights-only* checkpoint (``iter_0000000``, one
``mp_rank_XX_model_states.pt`` per TP rank, ``ssa_meta.json`` with ``"weights_only": true``,
``latest``) that ``--load`` starts from: weights in, fresh optimizer, iteration 0. PP > 1 output
and ZeRO-3 loading of weights-only checkpoints are not available; the messages say so.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Dict, Optional, Tuple

import torch

from ssa_megatron.convert.layout import ConversionError, merge_tp, split_tp
from ssa_megatron.model.shape import ModelShape, padded_vocab_size
from ssa_megatron.training import checkpoint_format as fmt


def resolve_tag_dir(path: str, tag: Optional[str] = None, warn: Optional[Callable] = None) -> str:
    """checkpoint_format.resolve_tag_dir, its problems as ConversionError."""
    try:
        return fmt.resolve_tag_dir(path, tag, warn)
    except fmt.CheckpointError as err:
        raise ConversionError(str(err)) from None


def read_meta(tag_dir: str) -> dict:
    try:
        return fmt.read_meta(tag_dir)
    except fmt.CheckpointError as err:
        raise ConversionError(str(err)) from None


def read_checkpoint(path: str, tag: Optional[str] = None,
                    warn=None) -> Tuple[Dict[str, torch.Tensor], dict, ModelShape]:
    """(full megatron state dict, ssa_meta.json, model shape) of a checkpoint of any layout,
    verified against its manifest (``warn``: where warning lines go, default stderr)."""
    return read_tag_dir(resolve_tag_dir(path, tag, warn))


def read_tag_dir(tag_dir: str) -> Tuple[Dict[str, torch.Tensor], dict, ModelShape]:
    """:func:`read_checkpoint` of a tag directory :func:`resolve_tag_dir` has chosen."""
    meta = read_meta(tag_dir)
    try:
        shards = fmt.read_model_shards(tag_dir)
    except fmt.CheckpointError as err:
        raise ConversionError(str(err)) from None
    full = merge_tp(shards)
    return full, meta, ModelShape.from_meta(meta, full["embedding.word_embeddings.weight"].shape[0])


def repad_embedding(full: Dict[str, torch.Tensor], vocab_size: int, tp: int) -> Dict[str, torch.Tensor]:
    """Give the embedding (and an untied output layer) the padded size the model builds with
    ``tp`` (extra rows zero)."""
    rows = padded_vocab_size(vocab_size, tp)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        t = full.get(name)
        if t is not None and t.shape[0] != rows:
            new = torch.zeros(rows, t.shape[1], dtype=t.dtype)
            n = min(rows, t.shape[0])
            new[:n] = t[:n]
            full = dict(full, **{name: new})
    return full


def write_checkpoint(full: Dict[str, torch.Tensor], shape: ModelShape, out_dir: str, tp: int, pp: int = 1,
                     data: Optional[dict] = None, source: Optional[str] = None,
                     progress=None) -> str:
    """A weights-only checkpoint of layout TP=``tp`` that ``--load`` continues from (iteration 0).

    Written into a temporary directory and renamed into place, so a failure leaves nothing behind.
    """
    if pp != 1:
        raise ConversionError("writing a pipeline-parallel (PP > 1) checkpoint is not available yet; "
                              "write PP=1 and load it with --pipeline-model-parallel-size 1")
    if shape.num_query_groups % tp or shape.num_attention_heads % tp:
        raise ConversionError(f"TP {tp} does not divide {shape.num_query_groups} kv groups / "
                              f"{shape.num_attention_heads} heads; pick a TP size that divides both")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"output {out_dir} exists and is not empty; choose a new directory")
    full = repad_embedding(full, shape.vocab_size, tp)
    shards = split_tp(full, tp)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        fmt.write_weights_only(tmp, shards, {
            "args": shape.to_meta_args(tp), "data": data or {}, "source": source,
            "padded_vocab_size": int(full["embedding.word_embeddings.weight"].shape[0])},
            progress=progress)
        from ssa_megatron.convert.hf_ckpt import _publish
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
