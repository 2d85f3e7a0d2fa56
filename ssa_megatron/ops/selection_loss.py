"""The selection alignment loss: teach SSA's block scores where full attention puts its mass.

SSA picks blocks by ``s(b) = sum over the group's heads of softmax_b(q . mean(K_b))``, a score
no loss ever trains (the selection is not differentiated). With the blocks that hold the most
full-attention mass (ops/selection_variants.py "oracle") sparse mode matches full mode at a
budget where SSA's own selection is several percent worse (docs/RESULTS.md), so the scores, not
the budget, are what sparse mode lacks. This loss trains them: for sampled query rows,

    KL( sg(mass) || s / G )

where ``mass`` is full attention's probability per complete past block, averaged over the G
query heads of a kv head and renormalised over the blocks SSA scores (those complete at the
token, b < (t + 1) // block_size), and ``s / G`` is SSA's score as a distribution over the same
blocks. The target is under stop-gradient; the gradient reaches the rows' queries and, through
the block means, the keys. Mean over rows, kv heads and sequences; rows with fewer than two
complete blocks are left out, and :func:`sample_rows` draws only rows whose past does not fit
in the budget (at the others every block is selected: nothing to learn).

Plain PyTorch (fp32) for the training path and the CPU alike: with R rows per sequence it costs
an [R, T] attention slice per head, small beside the layer's own attention.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ssa_megatron.ops import reference


def sample_rows(num_tokens: int, rows: int, block_size: int, block_counts: int = 1,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``rows`` query positions (a CPU tensor: filtering them needs no device sync) drawn
    uniformly, with replacement, from those of a ``num_tokens`` axis whose past holds more than
    ``block_counts`` blocks and at least two complete ones (empty if none does)."""
    first = max(2 * block_size - 1, block_counts * block_size)
    if num_tokens <= first or rows < 1:
        return torch.zeros(0, dtype=torch.long)
    return torch.randint(first, num_tokens, (rows,), generator=generator)


def _document_kl(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, last: int,
                 block_size: int, scale: float, q_select: Optional[torch.Tensor]) -> torch.Tensor:
    """KL per (sequence, row, kv head) [B, R, H] for rows (positions in this document, on q's
    device; ``last`` = the latest + 1) of one document's q [B, L, HQ, D], k [B, L, H, D] and
    selection queries q_select (None: q)."""
    b, _, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    nb = last // block_size  # complete blocks of the latest row
    support = torch.arange(nb, device=q.device)[None, :] < ((rows + 1) // block_size)[:, None]
    dtype = torch.promote_types(q.dtype, torch.float32)
    qs = (q if q_select is None else q_select)[:, rows].to(dtype).reshape(b, rows.numel(), h, g, d)
    kf = k[:, :last].to(dtype)
    with torch.no_grad():
        mass = reference.block_attention_mass(q[:, rows], kf, rows, block_size, scale)[..., :nb]
        mass = mass.mean(3).masked_fill(~support[None, :, None], 0.0)  # [B, R, H, nb]
        target = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
        target_log = target.clamp_min(1e-30).log()
    pooled = kf[:, : nb * block_size].reshape(b, nb, block_size, h, d).mean(2)  # [B, nb, H, D]
    scores = torch.einsum("brhgd,bnhd->brhgn", qs, pooled) * scale
    # a finite fill: -inf rows would make logsumexp's backward NaN
    logp = torch.log_softmax(scores.masked_fill(~support[None, :, None, None], -1e9), -1)
    log_s = torch.logsumexp(logp, dim=3) - math.log(g)  # log of s / G, [B, R, H, nb]
    log_s = log_s.masked_fill(~support[None, :, None], 0.0)
    return (target * (target_log - log_s)).sum(-1)


def selection_alignment_loss(q: torch.Tensor, k: torch.Tensor, block_size: int,
                             rows: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None,
                             q_select: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean KL (module docstring) over the query positions ``rows`` (long [R], positions along the
    token axis, the same for every sequence of the batch; with ``cu_seqlens`` each row belongs to
    its document) of q [B, T, HQ, D] and k [B, T, H, D]. ``q_select`` (shape of q): the queries
    the selection scores with, when they are not q (a learned selection map); the target is
    always q's attention. A zero that keeps the graph when no row has two complete blocks."""
    reference._check_shapes(q, k)
    b, t, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    rows = rows.to(device="cpu", dtype=torch.long)  # filtered on the host: no device sync
    parts = []
    for start, end in reference.segments(t, cu_seqlens, b):
        local = rows[(rows >= start) & (rows < end)] - start
        local = local[(local + 1) // block_size >= 2]
        if local.numel():
            last = int(local.max()) + 1
            local = local.to(q.device)
            qs = None if q_select is None else q_select[:, start:end]
            parts.append(_document_kl(q[:, start:end], k[:, start:end], local, last, block_size,
                                      scale, qs).flatten())
    if not parts:
        zero = (q.sum() + k.sum()) * 0.0
        return zero if q_select is None else zero + q_select.sum() * 0.0
    return torch.cat(parts).mean()


__all__ = ["sample_rows", "selection_alignment_loss"]
