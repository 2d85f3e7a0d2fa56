"""Architecture options of the models people continue pretraining from: an untied output layer,
q/k/v biases and RoPE scaling.

They are fields of the model's shape (model/shape.py, group OPTIONS: Megatron-LM's flag names
where it has them); :data:`MODEL_OPTIONS` is the view of them this module works with. A checkpoint
or HF directory written before they existed reads as the defaults: a tied, bias-free, plain-RoPE
model, as before.

RoPE scaling changes the rotary frequencies only (megatron-core's ``RotaryEmbedding.inv_freq``):

* ``llama3`` (Llama-3.1/3.2's ``rope_type``): megatron-core's own ``_apply_scaling``, called with
  all four parameters. Its formula is transformers' ``_compute_llama3_parameters``, but its
  constructor fixes low/high frequency factors 1 and 4 and an original context of 8192, so
  :func:`scale_rotary_embedding` calls it directly with the model's values.
* ``linear``: every frequency divided by the factor, as transformers' ``linear`` does (megatron's
  ``seq_len_interpolation_factor`` multiplies the positions instead: another rounding).
"""
from __future__ import annotations

import argparse
from typing import Mapping, Optional

from ssa_megatron.errors import ConfigError
from ssa_megatron.model.shape import (OPTIONS, ROPE_SCALING_TYPES, shape_default, shape_fields,  # noqa: F401
                                      shape_help)

# name: (default, help), from the shape's OPTIONS fields
MODEL_OPTIONS = {name: (shape_default(name), shape_help(name)) for name in shape_fields(OPTIONS)}
# Options that change which tensors the model has (a checkpoint must agree with them to load).
WEIGHT_OPTIONS = shape_fields(OPTIONS, weights=True)


def model_options(source) -> dict:
    """The options from parsed flags, checkpoint args, a model shape or our HF config (a
    Namespace or a mapping); missing or null entries take their defaults."""
    values = vars(source) if isinstance(source, argparse.Namespace) else dict(source or {})
    out = {}
    for name, (default, _) in MODEL_OPTIONS.items():
        value = values.get(name)
        out[name] = default if value is None else type(default)(value)
    return out


def check_model_options(options: Mapping) -> None:
    """Settings that cannot work end here with one line saying what to change."""
    if not options["use_rope_scaling"]:
        return
    if options["rope_scaling_type"] not in ROPE_SCALING_TYPES:
        raise ConfigError(f"--rope-scaling-type {options['rope_scaling_type']!r}: use one of "
                          f"{', '.join(ROPE_SCALING_TYPES)}")
    if options["rope_scaling_factor"] <= 0:
        raise ConfigError(f"--rope-scaling-factor {options['rope_scaling_factor']} must be positive")
    if options["rope_scaling_type"] == "llama3":
        low, high = options["rope_scaling_low_freq_factor"], options["rope_scaling_high_freq_factor"]
        if not 0 < low < high:
            raise ConfigError(f"--rope-scaling-low-freq-factor {low} must be positive and below "
                              f"--rope-scaling-high-freq-factor {high}")
        if options["rope_scaling_original_max_position_embeddings"] < 1:
            raise ConfigError("--rope-scaling-original-max-position-embeddings must be positive")


def rope_scaling(options: Mapping) -> Optional[dict]:
    """The RoPE scaling the model applies ({type, factor, ...}), or None for plain RoPE."""
    if not options["use_rope_scaling"]:
        return None
    if options["rope_scaling_type"] == "linear":
        return {"type": "linear", "factor": float(options["rope_scaling_factor"])}
    return {"type": "llama3", "factor": float(options["rope_scaling_factor"]),
            "low_freq_factor": float(options["rope_scaling_low_freq_factor"]),
            "high_freq_factor": float(options["rope_scaling_high_freq_factor"]),
            "original_max_position_embeddings":
                int(options["rope_scaling_original_max_position_embeddings"])}


def describe_rope(rotary_base: float, options: Mapping) -> str:
    scaling = rope_scaling(options)
    text = f"RoPE base {rotary_base:g}"
    if scaling:
        text += ", " + " ".join(f"{k} {v:g}" if not isinstance(v, str) else f"{k} {v}"
                                for k, v in scaling.items())
    return text


def rope_change_note(saved_args: Mapping, args) -> Optional[str]:
    """A note when a run continues a checkpoint with other RoPE settings (on purpose when
    extending the context; by mistake when the imported model's RoPE flags were left out)."""
    if "rotary_base" not in saved_args:
        return None
    before = describe_rope(float(saved_args["rotary_base"]), model_options(saved_args))
    now = describe_rope(float(args.rotary_base), model_options(args))
    if before == now:
        return None
    return (f"note: the checkpoint's model used {before}; this run uses {now} (right when "
            "extending the context, otherwise pass the checkpoint's RoPE flags)")


def scale_rotary_embedding(rotary, scaling: Optional[dict]) -> None:
    """Apply ``scaling`` (see :func:`rope_scaling`) to a megatron-core RotaryEmbedding, in place,
    before its first use (its forward caches the angle tables)."""
    if not scaling:
        return
    if scaling["type"] == "linear":
        rotary.inv_freq = rotary.inv_freq / scaling["factor"]
    else:
        rotary.inv_freq = rotary._apply_scaling(
            rotary.inv_freq, factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"])
