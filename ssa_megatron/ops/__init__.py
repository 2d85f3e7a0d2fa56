"""Attention math. ``reference`` is the spec; ``dispatch`` picks Triton kernels on CUDA."""
from ssa_megatron.ops.reference import (  # noqa: F401
    alignment_loss, block_scores, full_attention, mean_pool_blocks, select_blocks,
    selection_mask, sparse_attention,
)
