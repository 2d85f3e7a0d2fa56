"""The trainer's model flags for continued pretraining of a converted model at a new context: the
model's own flags (``ModelShape.training_flags``), its ``--seq-length`` and the RoPE change that
the longer context needs. One owner for slurm/configs/continued.sh (and through it
examples/continued_pretraining.sh): ``tools/convert_checkpoint.py continue-flags``."""
from __future__ import annotations

from typing import Optional, Tuple

from ssa_megatron.convert import megatron_ckpt
from ssa_megatron.model.shape import ModelShape

LONGEST_DEFAULT_CONTEXT = 32768
ROPE_CHOICES = ("auto", "scaling", "base", "keep")


def default_seq_length(context: int) -> int:
    """4x the model's context, at most 32768 (a 128k model trains SSA at 32k unless told)."""
    return min(4 * context, LONGEST_DEFAULT_CONTEXT)


def continued_flags(checkpoint: str, seq_length: Optional[int] = None, rope: str = "auto",
                    rope_base_factor: float = 8.0) -> Tuple[list, str]:
    """(flags, a one-line summary) for training ``checkpoint`` (a converted model's directory)
    at ``seq_length`` (default :func:`default_seq_length`). ``rope``: "keep" the model's RoPE;
    "scaling": llama3 scaling of its unscaled frequencies by seq_length / its context (Llama-3.1's
    recipe; it replaces a scaling the model has); "base": its theta times ``rope_base_factor``;
    "auto": keep a model that scales RoPE already or trains within its context, else scaling."""
    if rope not in ROPE_CHOICES:
        raise ValueError(f"rope {rope!r}: use one of {', '.join(ROPE_CHOICES)}")
    meta = megatron_ckpt.read_meta(megatron_ckpt.resolve_tag_dir(checkpoint))
    shape = ModelShape.from_meta(meta, 0)
    context = int(shape.max_position_embeddings)
    seq = int(seq_length) if seq_length else default_seq_length(context)
    if rope == "auto":
        rope = "keep" if shape.use_rope_scaling or seq <= context else "scaling"
    note = ""
    if rope == "scaling":
        if shape.use_rope_scaling:
            note = f"; the model's own scaling (factor {shape.rope_scaling_factor:g}) is replaced"
        new = shape.replace(use_rope_scaling=True, rope_scaling_type="llama3",
                            rope_scaling_factor=seq / context,
                            rope_scaling_original_max_position_embeddings=context)
    elif rope == "base":
        new = shape.replace(rotary_base=shape.rotary_base * float(rope_base_factor))
    else:
        new = shape
    flags = new.replace(max_position_embeddings=seq).training_flags()
    summary = (f"continued pretraining: seq {seq} (model context {context}), RoPE {rope}"
               + (f" (factor {seq / context:g})" if rope == "scaling" else "")
               + (f" (theta {new.rotary_base:g})" if rope == "base" else "") + note)
    return flags, summary
