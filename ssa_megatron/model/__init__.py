"""SSA model: megatron-core GPT layers with gated SSA attention."""
from ssa_megatron.model.attention import (SSACoreAttention, SSASelfAttention, set_inference_mode,  # noqa: F401
                                          ssa_branch)
from ssa_megatron.model.config import ConfigError, SSAConfig  # noqa: F401
from ssa_megatron.model.layer_spec import get_ssa_layer_spec  # noqa: F401
from ssa_megatron.model.runtime import draw_mode  # noqa: F401
