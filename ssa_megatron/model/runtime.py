"""What the trainer computes for each micro-batch: its SSA branch draw, the schedules over
iterations, its document boundaries (as megatron's ``PackedSeqParams``), and the masked LM loss.
None of it is kept here or in the layers: the branch and the boundaries reach the attention
layers as the forward's ``packed_seq_params`` (:class:`SSAForwardParams`)."""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional, Union

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclasses.dataclass
class SSAForwardParams(PackedSeqParams):
    """megatron-core's ``PackedSeqParams`` plus what SSA attention needs for one forward.
    ``packed_seq_params`` is the argument megatron-core hands from ``GPTModel.forward`` through
    every layer to the ``core_attention``, so SSA's per-forward data travels in it, as DSA's
    inputs travel as forward arguments of MLA: nothing is left on the modules between forwards.

    ssa_branch: the branch this micro-batch trains ("full", "sparse", or a bool tensor [b] whose
      True rows train the full branch); needed by SSA in training mode only.
    ssa_gate: this layer's sigmoid gate [sq, b, gates of the local heads]; SSASelfAttention sets
      it on the copy it hands its own core attention.
    ssa_probe: a model/diagnostics.AttentionProbe that records every layer of this forward.
    """
    ssa_branch: Union[str, torch.Tensor, None] = None
    ssa_gate: Optional[torch.Tensor] = None
    ssa_probe: object = None


def forward_params(packed: Optional[PackedSeqParams] = None, seq_length: Optional[int] = None,
                   **ssa_fields) -> Optional[SSAForwardParams]:
    """``packed`` (document boundaries, or None; its own SSA fields kept) with the SSA fields
    given here that are not None (``ssa_branch=``, ``ssa_gate=``, ``ssa_probe=``); ``packed`` itself
    when none is given. Without ``packed``, params for a whole model's forward need the rows'
    ``seq_length`` (megatron sizes the rotary table from max_seqlen when params are given)."""
    ssa_fields = {name: value for name, value in ssa_fields.items() if value is not None}
    branch = ssa_fields.get("ssa_branch")
    if branch is not None and not isinstance(branch, torch.Tensor) and branch not in ("full", "sparse"):
        raise ValueError(f"unknown SSA branch {branch!r}; use 'full', 'sparse' or a bool tensor")
    if not ssa_fields:
        return packed
    if packed is None:
        base = dict(qkv_format="sbhd", max_seqlen_q=seq_length, max_seqlen_kv=seq_length)
    else:
        base = {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)}
    return SSAForwardParams(**{**base, **ssa_fields})


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


def document_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries over the flattened micro-batch from reset position ids
    (a document starts where its position is 0; every row starts a document)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    return torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)


def packed_documents(cu_seqlens: torch.Tensor, seq_length: int) -> PackedSeqParams:
    """Documents packed across a [b, s] micro-batch as megatron's ``PackedSeqParams``: the layout
    stays sbhd and ``cu_seqlens`` run over the flattened b * s tokens. max_seqlen is the row length
    ``s`` because megatron sizes the rotary table from it."""
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=seq_length, max_seqlen_kv=seq_length)


def document_packed_seq_params(position_ids: torch.Tensor) -> PackedSeqParams:
    """The packed documents of a micro-batch whose positions restart at each document."""
    return packed_documents(document_cu_seqlens(position_ids), position_ids.shape[-1])


def masked_lm_loss(per_token: torch.Tensor, loss_mask: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Mean cross entropy over the tokens the mask keeps, times the LM-loss weight
    (``SSAConfig.lm_loss_weight``)."""
    mask = loss_mask.float()
    return weight * (per_token.float() * mask).sum() / mask.sum().clamp(min=1.0)
