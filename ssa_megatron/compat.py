"""The only place where megatron-core's CUDA assumptions are bent for CPU runs (tests, demo).

megatron-core 0.16 asks ``torch.cuda.current_device()`` for a device in a few places (RoPE
frequencies, the global memory buffer, TP gathers), keeps its model-parallel RNG streams in
CUDA generators, and builds the causal mask of its own (``--layer-spec megatron-local``) softmax
on CUDA. Without CUDA, :func:`enable_cpu_fallbacks` points the first at the CPU, backs the RNG
tracker with the CPU generator and builds that mask on the CPU. It does nothing when CUDA is
available.
"""
from __future__ import annotations

import torch

_ENABLED = False


def enable_cpu_fallbacks() -> bool:
    """Install the CPU fallbacks once, only when CUDA is unavailable. Returns whether active."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: "cpu"  # megatron uses the result only as a device

    @functools.lru_cache(maxsize=8)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()
    fused_softmax.get_default_causal_mask = cpu_causal_mask
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's named RNG streams, kept as CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _ENABLED = True
    return True
