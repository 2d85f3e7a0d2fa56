"""The alignment loss's way into training (megatron-core's auxiliary-loss pattern, as its DSA
indexer loss): the gradient injection with the main loss's backward scale, and the per-layer
trackers the trainer logs (the alignment loss's, and the selection alignment loss's beside it).
These are the only SSA state kept at class level, because every
layer of every pipeline stage needs them without a tensor crossing the pipeline."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class AlignLossAutoScaler(torch.autograd.Function):
    """Returns ``output`` unchanged; in backward, gives ``loss`` the main loss's backward scale.

    The alignment loss therefore trains on the pipeline stage that owns the layer, with no
    tensor crossing the pipeline, and is scaled exactly like the main loss (1/GAS under
    DeepSpeed gradient accumulation, times the loss scale under fp16). The trainer sets the
    scale before each step with :meth:`set_loss_scale`.
    """

    main_loss_backward_scale: float = 1.0

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(loss, AlignLossAutoScaler.main_loss_backward_scale)

    @staticmethod
    def set_loss_scale(scale: float) -> None:
        """What the main loss is multiplied by before backward (1/GAS, times the fp16 scale)."""
        AlignLossAutoScaler.main_loss_backward_scale = scale


def attach_alignment_loss(output: torch.Tensor, weighted_loss: torch.Tensor) -> torch.Tensor:
    """``output`` unchanged; ``weighted_loss`` trains through the autoscaler in backward."""
    return AlignLossAutoScaler.apply(output, weighted_loss)


class AlignLossTracker:
    """Sums each layer's alignment loss over the micro-batches of one logging window."""

    def __init__(self):
        self.num_layers = 0
        self._sum: Optional[torch.Tensor] = None
        self._count: Optional[torch.Tensor] = None

    def configure(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self._sum = torch.zeros(self.num_layers, dtype=torch.float64)
        self._count = torch.zeros(self.num_layers, dtype=torch.float64)

    def record(self, layer_number: int, value: torch.Tensor) -> None:
        if self._sum is None:
            self.configure(self.num_layers)
        if layer_number > self.num_layers:  # not configured for this many layers: grow
            grow = layer_number - self.num_layers
            self._sum = torch.cat([self._sum, self._sum.new_zeros(grow)])
            self._count = torch.cat([self._count, self._count.new_zeros(grow)])
            self.num_layers = layer_number
        value = value.detach()
        if self._sum.device != value.device:  # sums stay where the losses are: no sync per layer
            self._sum = self._sum.to(value.device)
        self._sum[layer_number - 1] += value.to(torch.float64)
        self._count[layer_number - 1] += 1

    def per_layer(self, pp_group=None, tp_group=None, dp_group=None, device=None) -> torch.Tensor:
        """Per-layer mean alignment loss, summed over PP and averaged over TP and DP.

        Every rank must call this together (it all-reduces). Layers no rank saw read NaN.
        """
        device = device or "cpu"
        stats = torch.stack([self._sum.to(device), self._count.to(device)]).to(torch.float64)
        if dist.is_available() and dist.is_initialized():
            if pp_group is not None:
                dist.all_reduce(stats, group=pp_group)  # layers are disjoint across stages
            for group in (tp_group, dp_group):
                if group is not None and dist.get_world_size(group) > 1:
                    dist.all_reduce(stats, group=group)
        mean = stats[0] / stats[1]  # summed losses over summed counts: the average over TP and DP
        return mean.cpu()


class AlignLossLoggingHelper:
    """The alignment losses of the current logging window (megatron's DSAIndexerLossLoggingHelper
    pattern): SSA layers record into ``tracker`` as they run; the trainer configures it for the
    model's layers, reads it at each log step and resets it. ``selection_tracker`` does the same
    for the selection alignment loss (ops/selection_loss.py), the other auxiliary loss."""

    tracker = AlignLossTracker()
    selection_tracker = AlignLossTracker()
