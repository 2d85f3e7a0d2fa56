"""Model construction from parsed arguments: SSAConfig + megatron-core GPTModel."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from ssa_megatron.model.config import SSAConfig
from ssa_megatron.model.layer_spec import get_ssa_layer_spec, init_seed_for_layer
from ssa_megatron.model.options import rope_scaling, scale_rotary_embedding
from ssa_megatron.model.recipe_defaults import recipe_setting
from ssa_megatron.model.shape import ModelShape, padded_vocab_size, shape_default  # noqa: F401


def build_config(args) -> SSAConfig:
    """SSAConfig of parsed flags: every field of the model's shape that SSAConfig declares, under
    its own name, plus the precision, fusion and parallel settings."""
    dtype = torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)
    shape = ModelShape.from_args(args)
    declared = {f.name for f in dataclasses.fields(SSAConfig)}
    return SSAConfig(
        **{name: value for name, value in shape.items() if name in declared},
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        normalization="RMSNorm",
        layernorm_epsilon=shape.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        rope_scaling=rope_scaling(shape),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=args.use_cpu_initialization,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        bias_activation_fusion=bool(getattr(args, "bias_swiglu_fusion", False)),
        cross_entropy_loss_fusion=bool(getattr(args, "cross_entropy_loss_fusion", False)),
        cross_entropy_fusion_impl="native",
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        ssa_align_coef=args.ssa_align_coef,
        ssa_select_align_coef=recipe_setting(args, "ssa_select_align_coef"),
        ssa_select_align_rows=recipe_setting(args, "ssa_select_align_rows"),
        ssa_full_prob=args.ssa_full_prob,
        ssa_gate_init=recipe_setting(args, "ssa_gate_init"),
        init_seed=args.seed,
        lm_loss_weight=recipe_setting(args, "lm_loss_weight"),
        reset_attention_mask=bool(getattr(args, "reset_attention_mask", False)),
        **(dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
           if getattr(args, "recompute_activations", False) else {}),
    )


def build_gpt_model(config: SSAConfig, vocab_size: int, max_sequence_length: int,
                    rotary_base: float = shape_default("rotary_base"), pre_process: bool = True,
                    post_process: bool = True, layer_spec=None) -> GPTModel:
    """A megatron-core GPTModel with SSA layers; the output layer is the word embedding unless
    ``config.untie_embeddings_and_output_weights``; RoPE scaled per ``config.rope_scaling``."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if config.use_cpu_initialization:
        torch.manual_seed(config.init_seed)  # the embedding's draw; layers reseed themselves
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec or get_ssa_layer_spec(config.attention_mode,
                                                                config.qk_layernorm),
        vocab_size=padded_vocab_size(vocab_size, tp),
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=rotary_base,
    )
    scale_rotary_embedding(model.rotary_pos_emb, config.rope_scaling)
    if post_process and config.untie_embeddings_and_output_weights:
        init_output_layer(model.output_layer.weight, config)
    return model


def init_output_layer(weight: torch.Tensor, config: SSAConfig) -> None:
    """With CPU initialisation, draw the untied output layer (this TP rank's rows) from a seed of
    its own, so the model has the same head whether built whole or stage by stage, on any layout."""
    if not config.use_cpu_initialization:
        return
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    generator = torch.Generator().manual_seed(init_seed_for_layer(config.init_seed, config.num_layers + 1))
    full = torch.empty(weight.shape[0] * tp, weight.shape[1]).normal_(
        0.0, config.init_method_std, generator=generator)
    with torch.no_grad():
        weight.copy_(full.chunk(tp)[rank].to(weight.dtype))
