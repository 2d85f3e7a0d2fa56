"""ssa_megatron: SSA (Sparse Sparse Attention) pretraining on megatron-core and DeepSpeed."""
from ssa_megatron.console import quiet_library_notices as _quiet_library_notices

__version__ = "0.1.0"
_quiet_library_notices()  # before megatron-core / DeepSpeed are imported (ssa_megatron/console.py)
