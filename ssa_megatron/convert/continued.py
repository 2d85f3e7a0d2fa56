"""The trainer's model flags for continued pretraining of a converted model at a new context: the
model's own flags (``ModelShape.training_flags``), its ``--seq-length`` and the RoPE change that
the longer context needs. One owner for slurm/configs/continued.sh (and through it
examples/continued_pretraining.sh): ``tools/convert_checkpoint.py continue-flags``."""
from __future__ import annotations

import os
from typing import Optional, Tuple

from ssa_megatron.convert import megatron_ckpt
from ssa_megatron.model.shape import ModelShape

LONGEST_DEFAULT_CONTEXT = 32768
ROPE_CHOICES = ("auto", "scaling", "base", "keep")


def default_seq_length(context: int) -> int:
    """4x the model's context, at most 32768 (a 128k model trains SSA at 32k unless told)."""
    return min(4 * context, LONGEST_DEFAULT_CONTEXT)


def has_checkpoint(save_dir: Optional[str]) -> bool:
    """Whether a --save directory holds a finished checkpoint (``latest``, or an ``iter_N`` left
    by a save stopped before it moved ``latest``)."""
    from ssa_megatron.training.checkpoint_format import list_tags
    return bool(save_dir) and (os.path.isfile(os.path.join(save_dir, "latest"))
                               or bool(list_tags(save_dir)))


def _with_layout(flags: list, meta: dict) -> list:
    """``flags`` plus the tensor-parallel size the checkpoint was written for."""
    tp = (meta.get("args") or {}).get("tensor_model_parallel_size") or 1
    return flags + ["--tensor-model-parallel-size", str(tp)]


def continued_flags(checkpoint: Optional[str], seq_length: Optional[int] = None, rope: str = "auto",
                    rope_base_factor: float = 8.0,
                    resume_from: Optional[str] = None) -> Tuple[list, str]:
    """(flags, a one-line summary) for training ``checkpoint`` (a converted model's directory)
    at ``seq_length`` (default :func:`default_seq_length`), with the tensor-parallel size it was
    converted for. ``rope``: "keep" the model's RoPE; "scaling": the model's RoPE scaled by
    seq_length / its context (a plain model gets Llama-3.1's llama3 scaling from its context; a
    model that scales already has its factor multiplied, its original context and type kept);
    "base": its theta times ``rope_base_factor``; "auto": scaling beyond the model's context,
    else keep. ``resume_from``: the run's own --save directory; once it holds a checkpoint, that
    checkpoint's flags as it trained (the converted model is no longer read)."""
    if rope not in ROPE_CHOICES:
        raise ValueError(f"rope {rope!r}: use one of {', '.join(ROPE_CHOICES)}")
    if has_checkpoint(resume_from):
        meta = megatron_ckpt.read_meta(megatron_ckpt.resolve_tag_dir(resume_from))
        seq = meta["args"]["seq_length"]
        shape = ModelShape.from_meta(meta, 0).replace(max_position_embeddings=seq)
        return (_with_layout(shape.training_flags(), meta),
                f"continued pretraining: resuming {resume_from} (seq {seq}, RoPE as it trained)")
    if not checkpoint:
        raise ValueError("no converted model to start from (INIT_FROM) and no checkpoint of the "
                         "run to resume")
    meta = megatron_ckpt.read_meta(megatron_ckpt.resolve_tag_dir(checkpoint))
    shape = ModelShape.from_meta(meta, 0)
    context = int(shape.max_position_embeddings)
    seq = int(seq_length) if seq_length else default_seq_length(context)
    if rope == "auto":
        rope = "scaling" if seq > context else "keep"
    if rope == "scaling" and seq <= context:
        raise ValueError(f"RoPE scaling needs a context above the model's {context} "
                         f"(seq length {seq}); use ROPE=keep")
    note = ""
    if rope == "scaling" and shape.use_rope_scaling:
        factor = shape.rope_scaling_factor * seq / context
        note = (f" (the model's {shape.rope_scaling_type} factor {shape.rope_scaling_factor:g} "
                f"becomes {factor:g})")
        new = shape.replace(rope_scaling_factor=factor)
    elif rope == "scaling":
        note = f" (llama3, factor {seq / context:g} from {context})"
        new = shape.replace(use_rope_scaling=True, rope_scaling_type="llama3",
                            rope_scaling_factor=seq / context,
                            rope_scaling_original_max_position_embeddings=context)
    elif rope == "base":
        new = shape.replace(rotary_base=shape.rotary_base * float(rope_base_factor))
        note = f" (theta {new.rotary_base:g})"
    else:
        new = shape
    return (_with_layout(new.replace(max_position_embeddings=seq).training_flags(), meta),
            f"continued pretraining: seq {seq} (model context {context}), RoPE {rope}{note}")
