"""Checkpoint conversion: ssa_megatron (DeepSpeed) checkpoints <-> Hugging Face directories, and
re-layout to another TP size. Command line: ``tools/convert_checkpoint.py``; see :mod:`.api`."""
from ssa_megatron.convert.api import hf_to_megatron_checkpoint, megatron_to_hf, relayout  # noqa: F401
from ssa_megatron.convert.layout import ConversionError  # noqa: F401
