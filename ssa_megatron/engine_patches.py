"""The only place where DeepSpeed's engine is patched (as compat.py is for megatron-core's CUDA
assumptions). Each patch replaces one engine or optimizer method on one engine instance:

* :func:`record_fp32_grad_norm`: without ZeRO or mixed precision DeepSpeed clips fp32 gradients
  with a norm that is wrong for pipelines, and drops it; ours clips and keeps the value.
* :func:`guard_fp32_optimizer`: the plain fp32 optimizer (ZeRO-0, no bf16/fp16) skips a step whose
  gradient norm is not finite, as DeepSpeed's own optimizers do.
* :func:`call_before_optimizer_step`: a callback after backward, before each optimizer step
  (tests and the profiler use it).
* :func:`checkpoint_write_errors_recorded`: during one save, a failed file write (a full disk)
  is recorded instead of raised (training/checkpointing.py).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, List


def record_fp32_grad_norm(engine) -> None:
    from ssa_megatron.training.grad_norm import clip_grad_norm

    def clip_and_record():
        engine._global_grad_norm = clip_grad_norm(engine.module.parameters(), engine.gradient_clipping())
    engine.clip_fp32_gradients = clip_and_record


def guard_fp32_optimizer(engine) -> None:
    """A non-finite step changes nothing (``overflow``: DeepSpeed then counts it in
    ``skipped_steps`` and does not advance the LR schedule)."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return
    optimizer = engine.optimizer
    step = optimizer.step

    @functools.wraps(step)  # keeps torch's LR-scheduler mark (else a UserWarning on the first step)
    def guarded_step(*a, **kw):
        norm = engine._global_grad_norm if engine.gradient_clipping() > 0 else None
        if norm is None:  # no clipping ran: measure it (every rank takes this step)
            from ssa_megatron.training.grad_norm import clip_grad_norm
            norm = clip_grad_norm(engine.module.parameters(), 0.0)
            engine._global_grad_norm = norm
        optimizer.overflow = not math.isfinite(float(norm))
        if optimizer.overflow:
            return None
        return step(*a, **kw)
    optimizer.overflow = False
    optimizer.step = guarded_step


def call_before_optimizer_step(engine, callback: Callable[[], None]) -> None:
    take_step = engine._take_model_step

    def hooked_step(*a, **kw):
        callback()
        return take_step(*a, **kw)
    engine._take_model_step = hooked_step


@contextlib.contextmanager
def checkpoint_write_errors_recorded(engine, errors: List[str]):
    """DeepSpeed writes every file through ``engine.checkpoint_engine.save``: record an OSError
    (a full disk) instead of raising it, so that this rank still reaches the collectives the other
    ranks are in, and all ranks can agree that the save failed."""
    ce = engine.checkpoint_engine
    write = ce.save

    def save(state_dict, path, *a, **kw):
        if errors:
            return None  # this save has failed already; write nothing more
        try:
            return write(state_dict, path, *a, **kw)
        except OSError as err:
            errors.append(f"{path}: {err.strerror or err}")
    own = vars(ce).get("save")
    ce.save = save
    try:
        yield
    finally:
        if own is None:
            del ce.save  # the class's method again
        else:
            ce.save = own
