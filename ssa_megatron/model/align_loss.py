"""Alignment-loss gradient injection (megatron-core's auxiliary-loss autoscaler pattern)."""
from __future__ import annotations

import torch

from ssa_megatron.model.runtime import RUNTIME


class AlignLossAutoScaler(torch.autograd.Function):
    """Returns ``output`` unchanged; in backward, gives ``loss`` the main loss's backward scale.

    The alignment loss therefore trains on the pipeline stage that owns the layer, with no
    tensor crossing the pipeline, and is scaled exactly like the main loss (1/GAS under
    DeepSpeed gradient accumulation, times the loss scale under fp16).
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(loss, RUNTIME.align_backward_scale)


def attach_alignment_loss(output: torch.Tensor, weighted_loss: torch.Tensor) -> torch.Tensor:
    if RUNTIME.collect_graph is not None:
        RUNTIME.collect_graph.append(weighted_loss)
        return output
    return AlignLossAutoScaler.apply(output, weighted_loss)
