"""The transformer-layer ModuleSpec: megatron-core's local GPT layer with SSA attention."""
from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset

from ssa_megatron.model.attention import (SSACoreAttention, SSASelfAttention,
                                          SSASelfAttentionSubmodules)


def init_seed_for_layer(base_seed: int, layer_number: int) -> int:
    return (base_seed * 1_000_003 + 7919 * layer_number) % (2 ** 63)


class SSATransformerLayer(TransformerLayer):
    """megatron-core's TransformerLayer, initialised from a seed of its own.

    With CPU initialisation every layer draws its weights from (seed, global layer number), so a
    model has the same weights whether it is built whole (GPTModel) or stage by stage
    (pipeline), on any TP x PP layout.
    """

    def __init__(self, config, submodules, layer_number: int = 1, *args, **kwargs):
        if config.use_cpu_initialization:
            global_number = layer_number + get_transformer_layer_offset(config, kwargs.get("vp_stage"))
            torch.manual_seed(init_seed_for_layer(config.init_seed, global_number))
        super().__init__(config, submodules, layer_number, *args, **kwargs)


def get_ssa_layer_spec(attention_mode: str = "ssa", qk_layernorm: bool = False) -> ModuleSpec:
    """RMSNorm, SwiGLU MLP (from the config), RoPE, GQA and gated SSA attention.

    Starts from megatron-core's own local spec so norms, MLP and bias-dropout-add stay stock,
    and swaps in the SSA self-attention (``attention_mode="nsa"``: the three-branch NSA
    attention of model/nsa_attention.py).
    """
    self_attention, core_attention = SSASelfAttention, SSACoreAttention
    if attention_mode == "nsa":
        from ssa_megatron.model.nsa_attention import NSACoreAttention, NSASelfAttention
        self_attention, core_attention = NSASelfAttention, NSACoreAttention
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm)
    spec.module = SSATransformerLayer
    stock = spec.submodules.self_attention.submodules
    spec.submodules.self_attention = ModuleSpec(
        module=self_attention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SSASelfAttentionSubmodules(
            linear_qkv=stock.linear_qkv,
            core_attention=core_attention,
            linear_proj=stock.linear_proj,
            q_layernorm=stock.q_layernorm if qk_layernorm else IdentityOp,
            k_layernorm=stock.k_layernorm if qk_layernorm else IdentityOp,
            linear_gate=ColumnParallelLinear,
        ),
    )
    return spec
