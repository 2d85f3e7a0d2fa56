"""SSA model: megatron-core GPT layers with gated SSA attention.

The names below load on first use (PEP 562), so that a tool which only reads checkpoints or
configs does not import megatron-core through ``ssa_megatron.model``."""
import importlib

_HOMES = {"SSACoreAttention": ".attention", "SSASelfAttention": ".attention",
          "set_inference_mode": ".attention", "forward_params": ".runtime",
          "ConfigError": "ssa_megatron.errors", "SSAConfig": ".config",
          "get_ssa_layer_spec": ".layer_spec", "draw_mode": ".runtime"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
