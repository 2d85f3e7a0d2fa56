"""Gradient norm over the whole model, counting every gradient exactly once in any TP x PP x DP
layout: TP-sharded tensors on every TP rank, replicated ones on TP rank 0 only, and the tied
embedding copy of the last pipeline stage (``ds_pipe_replicated``) not at all."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def _counted_here(param, tp_rank: int) -> bool:
    if getattr(param, "ds_pipe_replicated", False):
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def clip_grad_norm(parameters, max_norm: float) -> float:
    params = [p for p in parameters if p.grad is not None]
    tp_rank = ps.get_tensor_model_parallel_rank()
    device = params[0].grad.device if params else torch.device("cpu")
    sq = torch.zeros(1, dtype=torch.float64, device=device)
    for p in params:
        if _counted_here(p, tp_rank):
            sq += p.grad.detach().double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sq, group=ps.get_model_parallel_group())  # TP x PP
    norm = math.sqrt(float(sq))
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.detach().mul_(coef)
    return norm


def mark_pipeline_norm_ownership(module: torch.nn.Module) -> None:
    """DeepSpeed's ZeRO norm counts a non-sharded tensor only on model-parallel rank 0, and with a
    pipeline that rank spans all stages, which would drop the norms and biases of later stages.
    Flag those tensors as owned by TP rank 0 of their own stage instead."""
    if ps.get_tensor_model_parallel_rank() != 0:
        return
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = True
