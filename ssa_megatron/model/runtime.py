"""Per-process SSA state the training loop drives: the branch of the current micro-batch,
the alignment loss's backward scale, and the per-layer alignment-loss tracker."""
from __future__ import annotations

import hashlib
from typing import List, Optional

import torch
import torch.distributed as dist


def _uniform(key: str) -> float:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64


def draw_mode(seed: int, iteration: int, micro_batch: int, full_prob: float = 0.5) -> str:
    """full or sparse for one micro-batch; the same on every rank that holds it."""
    return "full" if _uniform(f"ssa-mode:{seed}:{iteration}:{micro_batch}") < full_prob else "sparse"


def draw_sequence_branches(seed: int, sample_indices, full_prob: float = 0.5) -> torch.Tensor:
    """One branch per sequence, keyed by the sample's global index in the training order, so the
    draw does not depend on the micro-batch size, accumulation or data-parallel layout. Returns a
    bool tensor (True: the sequence trains the full branch)."""
    return torch.tensor([_uniform(f"ssa-seq:{seed}:{int(i)}") < full_prob for i in sample_indices],
                        dtype=torch.bool)


def collapse_branches(rows: torch.Tensor):
    """A per-sequence draw whose rows all agree is just that branch ("full"/"sparse")."""
    if bool(rows.all()):
        return "full"
    if not bool(rows.any()):
        return "sparse"
    return rows


class PiecewiseLinear:
    """A value over training iterations from ``ITER:VALUE,ITER:VALUE,...`` points, linear between
    them and constant outside. ITER may be a fraction of the run (``0.1``) or an iteration (``200``):
    a point written with a dot is a fraction of --train-iters."""

    def __init__(self, spec: str, train_iters: int, name: str = "schedule"):
        self.spec = spec
        points = []
        for part in spec.split(","):
            at, sep, value = part.strip().partition(":")
            try:
                if not sep:
                    raise ValueError
                where = float(at) * train_iters if "." in at else float(int(at))
                points.append((where, float(value)))
            except ValueError:
                raise ValueError(f"{name} {spec!r}: write ITER:VALUE pairs separated by commas, e.g. "
                                 "'0:1.0,200:0.5' (an ITER with a dot, like 0.1, is a fraction of the run)")
        points.sort(key=lambda point: point[0])  # stable: two points at one ITER make a step
        self.points = points

    def __call__(self, iteration: int) -> float:
        pts = self.points
        if iteration <= pts[0][0]:
            return pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if iteration <= x1:
                return y0 + (y1 - y0) * (iteration - x0) / (x1 - x0) if x1 > x0 else y1
        return pts[-1][1]


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


def document_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries over the flattened micro-batch from reset position ids
    (a document starts where its position is 0; every row starts a document)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)


def masked_lm_loss(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the tokens the mask keeps, times the LM-loss weight."""
    mask = loss_mask.float()
    return RUNTIME.lm_loss_weight * (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)


class SSARuntime:
    """What SSACoreAttention reads at each forward; set by the trainer per micro-batch."""

    def __init__(self):
        self.mode: Optional[str] = None  # branch for the current training micro-batch
        self.align_backward_scale: float = 1.0  # main loss's backward scale (1/GAS, fp16 scale)
        self.tracker = AlignLossTracker()
        # When set, layers append their weighted alignment loss (with graph) here instead of
        # injecting its gradient; tests use it to compare against direct autograd.
        self.collect_graph: Optional[List[torch.Tensor]] = None
        # Packed-document boundaries of the current micro-batch (cu_seqlens over b*s tokens).
        self.cu_seqlens: Optional[torch.Tensor] = None
        self.lm_loss_weight: float = 1.0  # 0 trains the alignment loss alone (tests, ablations)
        self.reset_attention: bool = False  # derive cu_seqlens from reset position ids


RUNTIME = SSARuntime()
