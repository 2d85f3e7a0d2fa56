"""Fused SSA alignment loss in Triton (spec: ``reference.alignment_loss``).

SmoothL1(f, sg(s)) + SmoothL1(sg(f), s) = 2 * mean(h(f - s)) with h the Huber term: the forward
reads each output once, sums per-block partials and keeps the clipped difference, from which the
backward writes both gradients (+c for the full output, -c for the sparse one).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _align_fwd_kernel(A, B, C, PART, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    a = tl.load(A + offs, mask=msk, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=msk, other=0.0).to(tl.float32)
    d = a - b
    ad = tl.abs(d)
    hub = tl.where(ad < 1.0, 0.5 * d * d, ad - 0.5)
    tl.store(PART + pid, tl.sum(tl.where(msk, hub, 0.0), axis=0))
    tl.store(C + offs, tl.minimum(tl.maximum(d, -1.0), 1.0).to(C.dtype.element_ty), mask=msk)


@triton.jit
def _align_bwd_kernel(C, GA, GB, GL, inv_n, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < n
    s = tl.load(GL).to(tl.float32) * inv_n
    c = tl.load(C + offs, mask=msk, other=0.0).to(tl.float32) * s
    tl.store(GA + offs, c.to(GA.dtype.element_ty), mask=msk)
    tl.store(GB + offs, (-c).to(GB.dtype.element_ty), mask=msk)


class _AlignmentLoss(torch.autograd.Function):
    BLOCK = 4096

    @staticmethod
    def forward(ctx, of, osp):
        a = of.contiguous().view(-1)
        b = osp.contiguous().view(-1)
        n = a.numel()
        nblk = triton.cdiv(n, _AlignmentLoss.BLOCK)
        cdt = of.dtype if of.dtype in (torch.bfloat16, torch.float16) else torch.float32
        c = torch.empty(n, dtype=cdt, device=of.device)
        part = torch.empty(max(nblk, 1), dtype=torch.float32, device=of.device)
        if n:
            _align_fwd_kernel[(nblk,)](a, b, c, part, n, BLOCK=_AlignmentLoss.BLOCK)
        ctx.save_for_backward(c)
        ctx.meta = (of.shape, of.dtype, osp.dtype, n)
        return part.sum() * (2.0 / max(n, 1))

    @staticmethod
    def backward(ctx, gl):
        (c,) = ctx.saved_tensors
        shape, da, db, n = ctx.meta
        ga = torch.empty(n, dtype=da, device=c.device)
        gb = torch.empty(n, dtype=db, device=c.device)
        if n:
            _align_bwd_kernel[(triton.cdiv(n, _AlignmentLoss.BLOCK),)](
                c, ga, gb, gl.float().contiguous(), 1.0 / n, n, BLOCK=_AlignmentLoss.BLOCK)
        return ga.view(shape), gb.view(shape)


def alignment_loss(o_full: torch.Tensor, o_sparse: torch.Tensor) -> torch.Tensor:
    """Triton twin of ``reference.alignment_loss`` (fp32 scalar, one read of each output)."""
    if o_full.shape != o_sparse.shape:
        raise ValueError(f"o_full {tuple(o_full.shape)} and o_sparse {tuple(o_sparse.shape)} differ")
    return _AlignmentLoss.apply(o_full, o_sparse)
