"""Training: flags, the DeepSpeed engine and loop, checkpoints, logging (``python -m
ssa_megatron.training.pretrain`` or the ``ssa-pretrain`` command)."""
