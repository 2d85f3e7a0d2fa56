"""A checkpoint as a single-process (TP=1, PP=1) megatron-core GPTModel for evaluation.

Weights come from :func:`ssa_megatron.convert.megatron_ckpt.read_checkpoint`, which merges any TP
/ ZeRO layout into one full state dict; the model is rebuilt from the flags the checkpoint
recorded (``ssa_meta.json``), so it has exactly the training architecture.

RoPE scaling (llama3 style)
---------------------------
megatron-core's ``RotaryEmbedding`` keeps its frequencies in ``inv_freq`` and caches the angle
table per length (``forward`` is ``lru_cache``-d). :func:`set_rope_scaling` recomputes
``inv_freq`` from the model's own frequencies with megatron's llama3 scaling (what training applies
to imported models: model/options.py) and clears that cache; nothing else in the model changes.
The llama3 rule, with ``L0`` = the training context, ``factor`` f, and wavelength
``w = 2 pi / freq`` of each frequency pair:

* ``w < L0 / 4`` (high frequencies, local order): unchanged;
* ``w > L0`` (low frequencies, which never completed a turn in training): divided by f
  (position interpolation);
* in between: a linear blend of the two, weight ``(L0 / w - 1) / 3`` on the unchanged frequency.
"""
from __future__ import annotations

import argparse
from typing import Optional, Tuple

import torch

from ssa_megatron.errors import ConfigError


class EvalError(ConfigError):
    """A problem the user can fix (bad path, flag, data); the message says how."""


def set_rope_scaling(model: torch.nn.Module, factor: Optional[float], original_length: int) -> None:
    """Scale (or, with factor None/<=1, restore) the model's RoPE frequencies in place."""
    from ssa_megatron.model.options import scale_rotary_embedding
    rope = model.rotary_pos_emb
    if not hasattr(rope, "_eval_base_inv_freq"):
        rope._eval_base_inv_freq = rope.inv_freq.detach().clone()
    rope.inv_freq = rope._eval_base_inv_freq.clone()
    if factor is not None and factor > 1.0:
        scale_rotary_embedding(rope, {"type": "llama3", "factor": float(factor), "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": original_length})
    type(rope).forward.cache_clear()  # the angle tables were cached for the old frequencies


def _namespace_from_meta(meta_args: dict) -> argparse.Namespace:
    """Training flags: parser defaults overridden by what the checkpoint recorded."""
    from ssa_megatron.training.arguments import build_parser, fill_model_defaults
    parser = build_parser()
    values = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    values.update(meta_args)
    if values.get("ssa_selection_score") is None:  # recorded before the score existed: the paper's
        from ssa_megatron.model.shape import shape_default
        values["ssa_selection_score"] = shape_default("ssa_selection_score")
    return fill_model_defaults(argparse.Namespace(**values))


def load_model(checkpoint: str, tag: Optional[str] = None, device: Optional[str] = None,
               bf16: bool = False, max_seq_length: int = 0) -> Tuple[torch.nn.Module, dict, dict]:
    """(model in eval mode on ``device``, shape, ssa_meta) of a checkpoint of any TP/ZeRO layout;
    the shape (a dict of model/shape.py's fields) adds how the model trained: its
    ``train_seq_length``, ``layer_spec`` and ``reset_attention_mask``.

    Needs torch.distributed + megatron parallel_state with TP=1 (``init_distributed(1, 1)``).
    """
    from ssa_megatron.convert.layout import ConversionError
    from ssa_megatron.convert.megatron_ckpt import read_checkpoint, repad_embedding
    from ssa_megatron.model.builder import build_config, build_gpt_model

    try:
        full, meta, shape = read_checkpoint(checkpoint, tag)
    except ConversionError as e:
        raise EvalError(str(e)) from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    args = _namespace_from_meta(meta["args"])
    args.tensor_model_parallel_size = 1
    args.pipeline_model_parallel_size = 1
    args.bf16, args.fp16 = bool(bf16), False
    on_gpu = str(device).startswith("cuda")
    args.use_cpu_initialization = not on_gpu
    args.inference_mode = None
    # fused kernels follow the device evaluated on, not the one trained on (torch.compile on a
    # CPU needs a compiler; the fused cross entropy is a bf16 training kernel)
    args.bias_swiglu_fusion = on_gpu
    args.cross_entropy_loss_fusion = on_gpu and args.bf16
    config = build_config(args)
    train_len = int(args.seq_length)
    model = build_gpt_model(config, shape.vocab_size, max(train_len, max_seq_length,
                                                            int(args.max_position_embeddings)),
                            float(args.rotary_base))
    full = repad_embedding(full, shape.vocab_size, 1)
    own = model.state_dict()
    weights = {k: v for k, v in full.items() if k in own}
    missing = [k for k in own if k not in weights and not k.endswith("_extra_state")
               and (k != "output_layer.weight" or config.untie_embeddings_and_output_weights)]
    unused = [k for k in full if k not in own]
    if missing or unused:
        raise EvalError(f"checkpoint {checkpoint} does not fit the model its flags describe "
                        f"(missing {missing[:3]}, unexpected {unused[:3]}); is it an "
                        "ssa_megatron checkpoint of this version?")
    model.load_state_dict(weights, strict=False)
    model.to(device)
    model.eval()
    shape = dict(shape, train_seq_length=train_len,
                 layer_spec=getattr(args, "layer_spec", "ssa"),
                 reset_attention_mask=bool(getattr(args, "reset_attention_mask", False)))
    return model, shape, meta


def init_single_process_or_dp(seed: int = 1234) -> None:
    """torch.distributed (world from torchrun env, else 1) + parallel_state with TP=PP=1."""
    from ssa_megatron.training.distributed import init_distributed
    init_distributed(1, 1, seed=seed)
