"""ssa_megatron: SSA (Sparse Sparse Attention) pretraining on megatron-core and DeepSpeed."""
__version__ = "0.1.0"
