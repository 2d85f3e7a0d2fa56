"""Work on a second CUDA stream beside the current one.

SSA's selection does not depend on the full branch, and the two are bound by different things
(the selection by latency, SDPA by tensor-core throughput), so the selection can run on a side
stream while the full branch's SDPA runs on the current one. ``beside`` starts a function there
and gives back the wait that joins it. The caching allocator is told which stream uses which
tensor, so no memory is reused while the other stream still reads it.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch


@lru_cache(maxsize=16)
def _side_stream(device_index: int) -> "torch.cuda.Stream":
    return torch.cuda.Stream(device=device_index)


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(t)]


def beside(fn: Callable, *inputs: torch.Tensor) -> Callable:
    """Start ``fn()`` on a side stream of the inputs' CUDA device, after the work queued so far
    on the current stream; return ``wait()``, which makes the current stream wait for it and
    gives ``fn``'s result. Off CUDA, ``fn`` runs here and now."""
    if not inputs or not inputs[0].is_cuda:
        out = fn()
        return lambda: out
    device = inputs[0].device
    main = torch.cuda.current_stream(device)
    side = _side_stream(device.index if device.index is not None else torch.cuda.current_device())
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn()
    for x in inputs:
        x.record_stream(side)

    def wait():
        main.wait_stream(side)
        for t in _tensors(out):
            t.record_stream(main)
        return out
    return wait


__all__ = ["beside"]
