"""SSA settings carried on megatron-core's TransformerConfig, with clear checks."""
from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import TransformerConfig

from ssa_megatron.errors import ConfigError  # noqa: F401  (imported from here by older code)
from ssa_megatron.model.recipe_defaults import recipe_default
from ssa_megatron.model.shape import ATTENTION_MODES, INFERENCE_MODES, shape_default  # noqa: F401


@dataclass
class SSAConfig(TransformerConfig):
    """TransformerConfig plus the SSA attention settings."""

    # the model's shape (model/shape.py) passes these; its defaults are theirs
    attention_mode: str = shape_default("attention_mode")
    ssa_block_size: int = shape_default("ssa_block_size")
    ssa_block_counts: int = shape_default("ssa_block_counts")
    ssa_selection_score: str = shape_default("ssa_selection_score")
    ssa_align_coef: float = recipe_default("ssa_align_coef")
    # the selection alignment loss (ops/selection_loss.py): its weight (0: off) and the query
    # rows per sequence and layer it samples
    ssa_select_proj: bool = shape_default("ssa_select_proj")
    ssa_select_align_coef: float = recipe_default("ssa_select_align_coef")
    ssa_select_align_rows: int = recipe_default("ssa_select_align_rows")
    ssa_full_prob: float = recipe_default("ssa_full_prob")
    nsa_window_size: int = shape_default("nsa_window_size")  # sliding-window branch of --attention-mode nsa
    ssa_gate_init: str = recipe_default("ssa_gate_init")  # "zero": every gate starts at sigmoid(0) = 0.5
    # Branch used outside training; None means the mode's natural one (sparse for "sparse").
    inference_mode: str | None = None
    # Seed of the weight initialisation (per layer, see layer_spec.SSATransformerLayer).
    init_seed: int = 1234
    # Imported architectures (model/options.py): a separate output layer, and the RoPE scaling
    # applied to the rotary frequencies (options.rope_scaling; None: plain RoPE).
    untie_embeddings_and_output_weights: bool = False
    rope_scaling: dict | None = None
    # Training settings the model's pieces read: the LM loss's weight (0 trains the alignment
    # loss alone) and --reset-attention-mask (pipeline stages derive each micro-batch's document
    # boundaries from the reset position ids they pass along).
    lm_loss_weight: float = recipe_default("lm_loss_weight")
    reset_attention_mask: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_ssa_settings(self.attention_mode, self.ssa_block_size, self.ssa_block_counts,
                           self.ssa_full_prob, self.inference_mode, self.nsa_window_size)

    @property
    def default_inference_mode(self) -> str:
        if self.inference_mode is not None:
            return self.inference_mode
        return "sparse" if self.attention_mode == "sparse" else "full"


def check_ssa_settings(attention_mode, block_size, block_counts, full_prob, inference_mode=None,
                       nsa_window_size=shape_default("nsa_window_size")):
    if attention_mode not in ATTENTION_MODES:
        raise ConfigError(f"unknown --attention-mode {attention_mode!r}; "
                          f"use one of {', '.join(ATTENTION_MODES)}")
    if block_size < 1 or block_counts < 1:
        raise ConfigError("--ssa-block-size and --ssa-block-counts must be positive integers")
    if not 0.0 <= full_prob <= 1.0:
        raise ConfigError(f"--ssa-full-prob {full_prob} must lie in [0, 1]")
    if inference_mode is not None and inference_mode not in INFERENCE_MODES:
        raise ConfigError(f"unknown inference mode {inference_mode!r}; use full or sparse")
    if nsa_window_size < 1:
        raise ConfigError(f"--nsa-window-size {nsa_window_size} must be a positive number of tokens")


def check_parallel_layout(num_attention_heads: int, num_query_groups: int, tp: int,
                          seq_length: int, block_size: int) -> None:
    """Layouts that cannot work end here with one line saying what to change."""
    if num_attention_heads % num_query_groups:
        raise ConfigError(f"--num-attention-heads {num_attention_heads} is not a multiple of "
                          f"--num-query-groups {num_query_groups}")
    if num_query_groups % tp:
        raise ConfigError(
            f"--num-query-groups {num_query_groups} is not divisible by "
            f"--tensor-model-parallel-size {tp}: each TP rank must hold whole kv groups; "
            f"pick a TP size that divides {num_query_groups}")
    if seq_length % block_size:
        below, above = seq_length // block_size * block_size, -(-seq_length // block_size) * block_size
        nearest = " or ".join(str(n) for n in (below, above) if n > 0)
        raise ConfigError(f"--seq-length {seq_length} is not a multiple of --ssa-block-size "
                          f"{block_size}; use {nearest}")
