"""The transformer-layer ModuleSpec: megatron-core's local GPT layer with SSA attention."""
from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from ssa_megatron.model.attention import (SSACoreAttention, SSASelfAttention,
                                          SSASelfAttentionSubmodules)


def get_ssa_layer_spec() -> ModuleSpec:
    """RMSNorm, SwiGLU MLP (from the config), RoPE, GQA and gated SSA attention.

    Starts from megatron-core's own local spec so norms, MLP and bias-dropout-add stay stock,
    and swaps in the SSA self-attention.
    """
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    stock = spec.submodules.self_attention.submodules
    spec.submodules.self_attention = ModuleSpec(
        module=SSASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SSASelfAttentionSubmodules(
            linear_qkv=stock.linear_qkv,
            core_attention=SSACoreAttention,
            linear_proj=stock.linear_proj,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
            linear_gate=ColumnParallelLinear,
        ),
    )
    return spec
