"""Block selections other than SSA's, for evaluation: how much of sparse mode's loss is the
selection's fault and how much the budget's.

* ``pooled`` (the model's own, :func:`ssa_megatron.ops.dispatch.select_blocks`): scores from
  the queries against the pooled keys of each block, under the score the model trained with
  (``--ssa-selection-score``: mean, the paper's, moment2, sub2 or sub4).
* ``mean``: the paper's score whatever the model trained with.
* ``oracle``: per (token, kv head) the blocks that hold the most full-attention mass, summed over
  the group's query heads; the current block is always kept. A mass-greedy reference: no
  selection of k blocks (with the current one) keeps more of the group's attention mass. That
  bounds the mass, not the perplexity (a selection may still predict better, and the oracle's
  perplexity need not fall as k grows). It needs the whole attention row: it saves nothing and
  is a measurement only.
* ``recent<N>`` (e.g. ``recent4``): SSA's scores, with the min(N, k) most recent blocks (the
  current one included) always kept, the rest of the budget by score (a sliding window of k
  blocks when k <= N).
* ``moment2``: SSA's scores with each block's logit ``s q.mean(K_b)`` raised by half the
  variance of ``s q.k`` over the block's keys, taken per channel (``s^2/2 sum_d q_d^2
  var_b(k_d)``): the diagonal of the second-order estimate ``s^2/2 q^T Cov_b(k) q`` of ``log
  mean_j exp(s q.k_j)``, i.e. of the block's share of full attention, where the mean alone is the
  first-order one (with a learned selection map both score ``q + q P`` instead). A block of spread-out
  keys can hold one key the query matches well; the mean hides it. Costs a second pooled tensor
  (the per-channel variances) and twice the scoring work; a model can also train with it
  (``--ssa-selection-score moment2``, the selection kernel at head dim 2 D).
* ``quest``: each block's logit is the upper bound ``s sum_d max(q_d max_b(k_d), q_d
  min_b(k_d))`` of ``s q.k_j`` over its keys, from the per-channel extremes (as Quest, Tang et
  al. 2024, ranks KV pages), then SSA's softmax and group sum.
* ``sub<N>`` (e.g. ``sub4``; N divides the block size): each block's logit is ``log mean_j
  exp(s q.mean(K_bj))`` over the means of its N sub-blocks of block_size / N keys, then SSA's
  softmax and group sum. ``sub1`` is the mean score (SSA's, also for a model that trained with
  moment2); at N = block_size it is the block's exact share of the head's attention over the
  complete past blocks (every key its own sub-block), so N measures how much finer the pooled
  keys must be to select as well as the attention itself would. With a learned selection map it
  scores ``q + q P`` as the model's own selection does (N = block_size is then that query's
  share, not the attention's). Costs N pooled keys per block and N times the scoring work.

Every variant has the contract of ``select_blocks``: indices [B, T, H, block_counts] (int32,
-1 = empty slot) counted from the start of each token's document, slot 0 the current block,
ties to the smaller block index. Plain PyTorch in query chunks (the attention matrix is never
held whole), on whatever device the tensors are.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Tuple

import torch

from ssa_megatron.ops import dispatch, reference

POOLED = "pooled"
_NAME = re.compile(r"^(pooled|mean|oracle|moment2|quest|(recent|sub)([1-9][0-9]*))$")


def parse_selection(name: str) -> Tuple[str, int]:
    """("pooled" | "mean" | "oracle" | "moment2" | "quest" | "recent" | "sub", N) of a selection
    name; a clear error otherwise."""
    m = _NAME.match(str(name))
    if not m:
        raise ValueError(f"unknown block selection {name!r}: use pooled, mean, oracle, moment2, "
                         "quest, recentN (N >= 1 most recent blocks always kept, e.g. recent4) or "
                         "subN (N sub-block means per block, e.g. sub4)")
    return (m.group(2), int(m.group(3))) if m.group(2) else (m.group(1), 0)


def selection_names_error(names, block_size: Optional[int] = None) -> Optional[str]:
    """The error of the first unknown selection name in ``names`` (None when all are known; with
    ``block_size``, also a ``subN`` whose N does not divide it), for a command line to raise in
    its own way."""
    for name in names:
        try:
            kind, n = parse_selection(name)
        except ValueError as e:
            return str(e)
        if kind == "sub" and block_size is not None and reference.sub_parts_error(n, block_size):
            return reference.sub_parts_error(n, block_size)
    return None


def oracle_scores(q_chunk: torch.Tensor, k_prefix: torch.Tensor, first_pos: int, block_size: int,
                  scale: Optional[float]) -> torch.Tensor:
    """[B, Tq, H, nb] full-attention mass per past block, summed over each kv head's query heads,
    for queries at positions first_pos.. of a document whose keys are ``k_prefix``; the current
    block +inf, later blocks -inf."""
    dev = q_chunk.device
    pos = torch.arange(first_pos, first_pos + q_chunk.shape[1], device=dev)
    mass = reference.block_attention_mass(q_chunk, k_prefix, pos, block_size, scale).sum(3)
    nb = mass.shape[-1]
    current = (pos // block_size)[:, None]
    blocks = torch.arange(nb, device=dev)[None, :]
    mass = mass.masked_fill((blocks > current)[None, :, None, :], float("-inf"))
    return mass.masked_fill((blocks == current)[None, :, None, :], float("inf"))


def recent_scores(q_chunk: torch.Tensor, k_prefix: torch.Tensor, first_pos: int,
                  block_size: int, scale: Optional[float], recent: int,
                  score: str = "mean") -> torch.Tensor:
    """SSA's block scores with the ``recent`` - 1 blocks before the current one lifted above every
    scored block (a group's scores sum G softmax rows, so they never exceed G); their order among
    themselves stays SSA's. Pass recent <= the budget, or the budget keeps the best of them."""
    scores = reference.chunk_scores(q_chunk, k_prefix, first_pos, block_size, scale, score)
    group = q_chunk.shape[2] // k_prefix.shape[2]
    pos = torch.arange(first_pos, first_pos + q_chunk.shape[1], device=q_chunk.device)
    current = (pos // block_size)[:, None]
    blocks = torch.arange(scores.shape[-1], device=q_chunk.device)[None, :]
    lifted = (blocks < current) & (blocks > current - recent)
    return scores + lifted[None, :, None, :].to(scores.dtype) * (group + 1)


def quest_logits(q_chunk: torch.Tensor, k_prefix: torch.Tensor, block_size: int,
                 scale: Optional[float]) -> torch.Tensor:
    """[B, Tq, H, G, nb] per-head bound ``s sum_d max(q_d max_b k_d, q_d min_b k_d)`` of each
    complete block's key logits (``quest``)."""
    b, tc, hq, d = q_chunk.shape
    h = k_prefix.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nb = k_prefix.shape[1] // block_size
    blocks = k_prefix[:, : nb * block_size].float().reshape(b, nb, block_size, h, d)
    qg = q_chunk.float().reshape(b, tc, h, hq // h, d) * scale
    # max(q_d hi_d, q_d lo_d) is q_d hi_d where q_d >= 0, q_d lo_d elsewhere
    return (torch.einsum("bthgd,bnhd->bthgn", qg.clamp(min=0), blocks.amax(dim=2))
            + torch.einsum("bthgd,bnhd->bthgn", qg.clamp(max=0), blocks.amin(dim=2)))


def quest_scores(q_chunk: torch.Tensor, k_prefix: torch.Tensor, first_pos: int,
                 block_size: int, scale: Optional[float]) -> torch.Tensor:
    """Scores of the ``quest`` selection (module docstring) for queries at positions first_pos..
    of a document whose keys are ``k_prefix``, as :func:`reference.chunk_scores` gives SSA's."""
    nb_all = (k_prefix.shape[1] + block_size - 1) // block_size
    return reference.group_block_scores(quest_logits(q_chunk, k_prefix, block_size, scale),
                                        first_pos, block_size, nb_all)


def select_blocks_with(selection: str, q: torch.Tensor, k: torch.Tensor, block_size: int,
                       block_counts: int, cu_seqlens: Optional[torch.Tensor] = None,
                       scale: Optional[float] = None,
                       q_select: Optional[torch.Tensor] = None, score: str = "mean") -> torch.Tensor:
    """``select_blocks`` under the named selection (module docstring). ``q_select``: the queries
    SSA's scores use when they are not q (a learned selection map); the oracle reads q's own
    attention. ``score``: the model's own selection score (what ``pooled`` and ``recentN`` use)."""
    kind, n = parse_selection(selection)
    q_select = q if q_select is None else q_select
    if kind in (POOLED, "mean", "moment2"):
        own = {POOLED: score}.get(kind, kind)
        return dispatch.select_blocks(q_select, k, block_size, block_counts, cu_seqlens, scale, own)
    reference._check_shapes(q, k)
    b, t, hq, _ = q.shape
    out = torch.full((b, t, k.shape[2], block_counts), -1, dtype=torch.int32, device=q.device)
    for start, end in reference.segments(t, cu_seqlens, b):
        rows = reference.query_chunk_rows(b, hq, end - start)
        for c0 in range(start, end, rows):
            c1 = min(c0 + rows, end)
            qc, kp = q[:, c0:c1], k[:, start:c1]
            if kind == "oracle":
                scores = oracle_scores(qc, kp, c0 - start, block_size, scale)
            elif kind == "quest":
                scores = quest_scores(q_select[:, c0:c1], kp, c0 - start, block_size, scale)
            elif kind == "sub":
                scores = reference.chunk_scores(q_select[:, c0:c1], kp, c0 - start, block_size,
                                                scale, f"sub{n}")
            else:
                scores = recent_scores(q_select[:, c0:c1], kp, c0 - start, block_size, scale,
                                       min(n, block_counts), score)
            out[:, c0:c1] = reference.top_blocks(scores, block_counts)
    return out


__all__ = ["POOLED", "parse_selection", "selection_names_error", "select_blocks_with", "oracle_scores", "recent_scores",
           "quest_logits", "quest_scores"]
