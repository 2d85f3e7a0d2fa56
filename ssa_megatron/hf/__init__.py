"""Hugging Face model code for SSA checkpoints (copied next to converted weights).

``tools/convert_checkpoint.py`` writes ``configuration_ssa.py``, ``modeling_ssa.py`` and
``ssa_cache.py`` (the KV cache layer that keeps the pooled block keys) from this
package, plus ``ssa_ops.py`` (a copy of :mod:`ssa_megatron.ops.reference`) and ``ssa_nsa.py`` (a copy of
:mod:`ssa_megatron.ops.nsa` importing ``ssa_ops``), into every exported
directory and registers them through ``auto_map``; the directory then loads with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` without ssa_megatron.
"""
MODEL_FILES = ("configuration_ssa.py", "modeling_ssa.py", "ssa_cache.py")
OPS_FILE = "ssa_ops.py"  # the copy of ssa_megatron/ops/reference.py
NSA_FILE = "ssa_nsa.py"  # the copy of ssa_megatron/ops/nsa.py (imports rewritten to ssa_ops)
