"""Plain-PyTorch SSA attention: the specification the Triton kernels must match.

Layout everywhere in ``ssa_megatron.ops``: ``q`` is [B, T, HQ, D], ``k`` and ``v`` are
[B, T, H, D] with HQ = G * H (query head h belongs to kv head h // G).

Packed sequences: pass ``cu_seqlens`` (int tensor [N + 1], offsets of N documents along the
token axis) with B == 1. Each document is an independent causal sequence whose blocks start at
the document's first token; nothing crosses a document boundary (selection, sparse and full
attention alike).

Block selection (as in the SSA paper): for token t of block c = t // bs, the scores of the complete blocks
b < (t + 1) // bs are softmax_b(q_{t,h} . mean(K_b) * scale) per query head, summed over the G
heads of a kv group; the current block is always selected, future blocks never; the top
``block_counts`` blocks are kept (ties: the smaller block index wins); unused slots hold -1.

Selection scores (``score``): "mean" is the paper's logit ``scale q . mean(K_b)``; "moment2"
adds half the per-channel variance term, ``scale^2 / 2 sum_d q_d^2 var_b(k_d)`` (the diagonal
of the second-order estimate of ``log mean_j exp(scale q . k_j)``, the block's share of full
attention). Both are one dot product: moment2 is "mean" of ``[q, scale / 2 * q * q]`` against
the block statistics ``[mean, var]`` (:func:`moment2_operands`), so every kernel that scores
pooled keys scores it at head dim 2 D, and a KV cache keeps ``[mean, var]`` per block as it
keeps the means (the scale is on the query's side). "sub2" / "sub4" score a block by the
log-mean-exp of ``scale q . mean(K_bj)`` over its N sub-blocks (:func:`sub_block_logits`): N
pooled keys per block, which the selection kernel and a KV cache keep block-major.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

# Tokens processed at once by the reference selection / sparse attention; bounds memory.
_CHUNK = 1024
# also in model/shape.py, which cannot import this file (copied alone into HF exports as
# ssa_ops.py); tests/test_selection_variants.py holds the two equal
SELECTION_SCORES = ("mean", "moment2", "sub2", "sub4")


def segments(total: int, cu_seqlens: Optional[torch.Tensor], batch: int) -> List[Tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, total)]
    if batch != 1:
        raise ValueError("cu_seqlens needs a packed batch of size 1; flatten the batch first")
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens {offsets} must rise from 0 to the token count {total}")
    return [(a, b) for a, b in zip(offsets, offsets[1:]) if b > a]


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor] = None) -> int:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("q and k must be [B, T, heads, D]")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, T or D")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    return q.shape[2] // k.shape[2]


def query_chunk_rows(batch: int, heads: int, keys: int, budget_bytes: int = 1 << 28,
                     most: int = _CHUNK) -> int:
    """Query rows per chunk so that fp32 logits [batch, rows, heads, keys] and two temporaries of
    that size fit ``budget_bytes``: at least 16, at most ``most``."""
    rows = budget_bytes // max(1, batch * heads * keys * 4 * 3)
    return int(max(16, min(most, rows)))


def mean_pool_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of each complete block of ``block_size`` tokens: [B, T, H, D] -> [B, T // bs, H, D]."""
    b, t, h, d = x.shape
    nb = t // block_size
    return x[:, : nb * block_size].reshape(b, nb, block_size, h, d).float().mean(dim=2)


def check_score(score: str) -> None:
    if score not in SELECTION_SCORES:
        raise ValueError(f"unknown selection score {score!r}; use one of {', '.join(SELECTION_SCORES)}")


def sub_parts(score: str) -> int:
    """N of a ``subN`` score (N sub-block means per block); 0 for the scores of one pooled key."""
    return int(score[3:]) if score.startswith("sub") else 0


def sub_parts_error(parts: int, block_size: int) -> Optional[str]:
    """Why ``sub<parts>`` cannot split blocks of ``block_size`` tokens (None: it can)."""
    if parts > block_size or block_size % parts:
        return f"sub{parts}: N must divide the block size {block_size}"
    return None


def sub_block_logits(q_chunk: torch.Tensor, k_prefix: torch.Tensor, block_size: int, parts: int,
                     scale: Optional[float]) -> torch.Tensor:
    """[B, Tq, H, G, nb] per-head ``log mean_j exp(s q.mean(K_bj))`` over the ``parts`` sub-blocks
    of each complete block (the ``subN`` score): under SSA's softmax over blocks, each block gets
    the summed probability of its sub-blocks' means. N = 1 is the mean score; N = block_size is
    each head's exact attention share of the complete past blocks."""
    sub_means = pooled_selection_keys(k_prefix, block_size, f"sub{parts}")[0]
    return sub_block_logits_from_means(q_chunk, sub_means, parts, scale)


def sub_block_logits_from_means(q_chunk: torch.Tensor, sub_means: torch.Tensor, parts: int,
                                scale: Optional[float]) -> torch.Tensor:
    """:func:`sub_block_logits` from the sub-block means [B, nb * parts, H, D] (fp32, block-major:
    what a KV cache keeps for a ``subN`` score) instead of the keys."""
    b, tc, hq, d = q_chunk.shape
    h = sub_means.shape[2]
    nb = sub_means.shape[1] // parts
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q_chunk.float().reshape(b, tc, h, hq // h, d) * scale
    logits = torch.einsum("bthgd,bnhd->bthgn", qg, sub_means).reshape(b, tc, h, hq // h, nb, parts)
    return torch.logsumexp(logits, dim=-1) - math.log(parts)


def moment2_query(q: torch.Tensor, scale: float) -> torch.Tensor:
    """q' = [q, scale / 2 * q * q] (fp32, [..., 2 D]): the query side of the moment2 logit."""
    qf = q.float()
    return torch.cat([qf, qf * qf * (0.5 * scale)], -1)


def moment2_keys(pooled_mean: torch.Tensor, pooled_square: torch.Tensor) -> torch.Tensor:
    """pooled' = [mean, var] ([..., 2 D]) from the block means of the keys and of their squares
    (var = E[k^2] - mean^2, clamped at 0): the key side of the moment2 logit."""
    var = (pooled_square - pooled_mean * pooled_mean).clamp_min(0.0)
    return torch.cat([pooled_mean, var], -1)


def moment2_operands(q: torch.Tensor, pooled_mean: torch.Tensor, pooled_square: torch.Tensor,
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q', pooled') with ``scale * q' . pooled'`` = the moment2 logit ``scale q . mean +
    scale^2 / 2 sum_d q_d^2 var_d``: :func:`moment2_query` and :func:`moment2_keys`."""
    return moment2_query(q, scale), moment2_keys(pooled_mean, pooled_square)


def pooled_selection_keys(k: torch.Tensor, block_size: int, score: str = "mean"):
    """The per-block key statistics a score needs: (mean,) or (mean, mean of squares), each
    [B, T // bs, H, D] fp32 (:func:`mean_pool_blocks`); for ``subN`` (the means of the N
    sub-blocks of each complete block,) [B, T // bs * N, H, D], block-major (any N that divides
    the block size: evaluation's subN selections are not limited to the trainer's scores)."""
    parts = sub_parts(score)
    if parts:
        unfit = sub_parts_error(parts, block_size)
        if unfit:
            raise ValueError(unfit)
        nb = k.shape[1] // block_size
        return (mean_pool_blocks(k[:, : nb * block_size], block_size // parts),)
    check_score(score)
    mean = mean_pool_blocks(k, block_size)
    if score == "mean":
        return (mean,)
    return mean, mean_pool_blocks(k.float() * k.float(), block_size)


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int,
                 scale: Optional[float] = None, score: str = "mean") -> torch.Tensor:
    """Group-summed block importance [B, T, H, ceil(T / bs)] of one sequence (fp32).

    Complete past blocks get the summed per-head softmax probability; the current block +inf;
    blocks not yet complete and future blocks -inf.
    """
    _check_shapes(q, k)
    return chunk_scores(q, k, 0, block_size, scale, score)


def _topk_stable(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim; ties resolved towards the smaller index (stable sort)."""
    k = min(k, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    return order.values[..., :k], order.indices[..., :k]


def top_blocks(scores: torch.Tensor, block_counts: int) -> torch.Tensor:
    """The ``block_counts`` best-scored blocks of ``scores`` [..., nb] (ties: the smaller index),
    int32 [..., block_counts]; -1 for slots left empty (-inf scores, or fewer blocks)."""
    vals, idx = _topk_stable(scores, block_counts)
    idx = torch.where(vals > float("-inf"), idx, torch.full_like(idx, -1)).to(torch.int32)
    if idx.shape[-1] < block_counts:
        idx = F.pad(idx, (0, block_counts - idx.shape[-1]), value=-1)
    return idx


def block_attention_mass(q_rows: torch.Tensor, k_prefix: torch.Tensor, positions: torch.Tensor,
                         block_size: int, scale: Optional[float] = None) -> torch.Tensor:
    """Full causal attention's probability per key block: queries q_rows [B, R, HQ, D] at
    ``positions`` [R] (on q's device) of a document whose keys are k_prefix [B, L, H, D] (every
    position < L) -> [B, R, H, G, ceil(L / bs)] (query head h * G + g), in fp32 or wider."""
    b, r, hq, d = q_rows.shape
    keys, h = k_prefix.shape[1], k_prefix.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nb = (keys + block_size - 1) // block_size
    dtype = torch.promote_types(q_rows.dtype, torch.float32)
    qg = q_rows.to(dtype).reshape(b, r, h, hq // h, d)
    logits = torch.einsum("brhgd,bkhd->brhgk", qg, k_prefix.to(dtype)) * scale
    causal = torch.arange(keys, device=q_rows.device)[None, :] <= positions[:, None]  # [R, L]
    probs = torch.softmax(logits.masked_fill(~causal[None, :, None, None], float("-inf")), -1)
    probs = F.pad(probs, (0, nb * block_size - keys))
    return probs.reshape(b, r, h, hq // h, nb, block_size).sum(-1)


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, block_counts: int,
                  cu_seqlens: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None, score: str = "mean") -> torch.Tensor:
    """Top-``block_counts`` block indices [B, T, H, block_counts] (int32, -1 = empty slot).

    Indices count blocks from the start of each token's document. Slot 0 holds the current block;
    the others follow in decreasing score.
    """
    _check_shapes(q, k)
    check_score(score)
    b, t, hq, d = q.shape
    h = k.shape[2]
    out = torch.full((b, t, h, block_counts), -1, dtype=torch.int32, device=q.device)
    parts = sub_parts(score)
    for start, end in segments(t, cu_seqlens, b):
        # subN logits hold N entries per block for every query head: bound them by memory
        rows = query_chunk_rows(b, hq, (end - start) // block_size * parts) if parts else _CHUNK
        for c0 in range(start, end, rows):
            c1 = min(c0 + rows, end)
            # Scores need the whole prefix of keys but only this chunk's queries.
            scores = chunk_scores(q[:, c0:c1], k[:, start:c1], c0 - start, block_size, scale,
                                  score)
            out[:, c0:c1] = top_blocks(scores, block_counts)
    return out


def chunk_scores(q_chunk: torch.Tensor, k_prefix: torch.Tensor, first_pos: int, block_size: int,
                 scale: Optional[float], score: str = "mean") -> torch.Tensor:
    """block_scores for queries at positions first_pos.. of a sequence whose keys are k_prefix."""
    nb_all = (k_prefix.shape[1] + block_size - 1) // block_size
    stats = pooled_selection_keys(k_prefix, block_size, score)
    if score != "moment2":
        return pooled_block_scores(q_chunk, stats[0], first_pos, block_size, nb_all, scale,
                                   sub_parts(score) or 1)
    scale = 1.0 / math.sqrt(q_chunk.shape[-1]) if scale is None else scale
    q2, pooled2 = moment2_operands(q_chunk, *stats, scale)
    return pooled_block_scores(q2, pooled2, first_pos, block_size, nb_all, scale)


def pooled_block_scores(q_chunk: torch.Tensor, pooled: torch.Tensor, first_pos: int,
                        block_size: int, nb_all: int, scale: Optional[float],
                        parts: int = 1) -> torch.Tensor:
    """block_scores [B, Tq, H, nb_all] for queries at positions first_pos.. from the pooled keys
    [B, nb, H, D] (fp32, :func:`mean_pool_blocks`) of the complete blocks of a key range of
    ``nb_all`` blocks, or with ``parts`` = N > 1 their N sub-block means [B, nb * N, H, D] (the
    subN score); a KV cache that keeps them selects in O(nb) per token."""
    if parts > 1:
        return group_block_scores(sub_block_logits_from_means(q_chunk, pooled, parts, scale),
                                  first_pos, block_size, nb_all)
    b, tc, hq, d = q_chunk.shape
    h = pooled.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q_chunk.float().reshape(b, tc, h, hq // h, d)
    logits = torch.einsum("bthgd,bnhd->bthgn", qg, pooled) * scale
    return group_block_scores(logits, first_pos, block_size, nb_all)


def group_block_scores(logits: torch.Tensor, first_pos: int, block_size: int,
                       nb_all: int) -> torch.Tensor:
    """SSA's scores from per-head block logits [B, Tq, H, G, nb] over the complete blocks of a key
    range of ``nb_all`` blocks, for queries at positions first_pos..: each head's softmax over the
    blocks its query has completed, summed over the group, as [B, Tq, H, nb_all]; the current
    block +inf, the others -inf."""
    b, tc, h, _, nb = logits.shape
    pos = torch.arange(first_pos, first_pos + tc, device=logits.device)
    out = torch.full((b, tc, h, nb_all), float("-inf"), device=logits.device)
    if nb > 0:
        complete = torch.arange(nb, device=logits.device)[None, :] < ((pos + 1) // block_size)[:, None]
        logits = logits.masked_fill(~complete[None, :, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out[..., :nb] = probs.sum(dim=3).masked_fill(~complete[None, :, None, :], float("-inf"))
    out.scatter_(3, (pos // block_size).view(1, tc, 1, 1).expand(b, tc, h, 1), float("inf"))
    return out


def select_blocks_from_pooled(q: torch.Tensor, pooled: torch.Tensor, first_pos: int,
                              num_keys: int, block_size: int, block_counts: int,
                              scale: Optional[float] = None, parts: int = 1) -> torch.Tensor:
    """:func:`select_blocks` rows of queries q [B, Tq, HQ, D] at positions first_pos.. of a
    sequence of ``num_keys`` keys (first_pos + Tq <= num_keys), given the pooled keys [B, nb, H, D]
    of its complete blocks (nb = num_keys // block_size; rows a query cannot see are masked), or
    with ``parts`` = N > 1 the means of their N sub-blocks [B, nb * N, H, D] (the subN score).
    Returns [B, Tq, H, block_counts] int32, -1 = empty slot."""
    nb_all = (num_keys + block_size - 1) // block_size
    return top_blocks(pooled_block_scores(q, pooled, first_pos, block_size, nb_all, scale, parts),
                      block_counts)


def sparse_attention_with_past(q, k, v, indices, past: int, block_size: int, scale: float):
    """Attention of queries q [B, Tq, HQ, D] at positions past.. over the tokens (<= their
    position) of their selected blocks ``indices`` [B, Tq, H, K] (-1 = empty) only; k, v are the
    cache's [B, H, Tk, D]. Gathers Tq * K * block_size keys per kv head, whatever Tk is; the
    arithmetic of :func:`sparse_attention` (fp32 softmax over the same slots)."""
    b, tq, hq, d = q.shape
    h = k.shape[1]
    nsel = indices.shape[-1]
    idx = indices.long()
    tok = idx.unsqueeze(-1) * block_size + torch.arange(block_size, device=q.device)
    pos = torch.arange(past, past + tq, device=q.device).view(1, tq, 1, 1, 1)
    valid = (idx.unsqueeze(-1) >= 0) & (tok <= pos)  # [B, Tq, H, K, bs]
    gidx = tok.clamp(0, k.shape[2] - 1).permute(0, 2, 1, 3, 4).reshape(b, h, tq * nsel * block_size)
    gidx = gidx.unsqueeze(-1).expand(-1, -1, -1, d)
    kg = torch.gather(k, 2, gidx).view(b, h, tq, nsel * block_size, d)
    vg = torch.gather(v, 2, gidx).view(b, h, tq, nsel * block_size, d)
    qg = q.reshape(b, tq, h, hq // h, d).permute(0, 2, 1, 3, 4)  # [B, H, Tq, G, D]
    logits = torch.einsum("bhtgd,bhtnd->bhtgn", qg.float(), kg.float()) * scale
    mask = valid.reshape(b, tq, h, nsel * block_size).permute(0, 2, 1, 3).unsqueeze(3)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    o = torch.einsum("bhtgn,bhtnd->bhtgd", probs, vg.float())
    return o.permute(0, 2, 1, 3, 4).reshape(b, tq, hq, d).to(q.dtype)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            pooled: torch.Tensor, past: int, block_size: int, block_counts: int,
                            scale: Optional[float] = None,
                            q_select: Optional[torch.Tensor] = None, parts: int = 1) -> torch.Tensor:
    """Sparse attention of new queries q [B, Tq, HQ, D] at positions past.. over a KV cache
    k_cache, v_cache [B, H, past + Tq, D] whose complete blocks' mean keys are ``pooled``
    [B, nb, H, D] (fp32): :func:`select_blocks_from_pooled`, then
    :func:`sparse_attention_with_past` (the spec of ``triton_sparse_decode``).

    ``q_select`` [B, Tq, HQ, DS]: the selection scores ``q_select . pooled`` instead of
    ``q . pooled`` (``pooled`` then [B, nb, H, DS]): a learned selection map's queries, or
    :func:`moment2_operands`' pair at DS = 2 D; the attention still uses q. ``parts`` = N > 1:
    ``pooled`` holds the N sub-block means of each complete block [B, nb * N, H, D] (subN)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    idx = select_blocks_from_pooled(q if q_select is None else q_select, pooled, past,
                                    past + q.shape[1], block_size, block_counts, scale, parts)
    return sparse_attention_with_past(q, k_cache, v_cache, idx, past, block_size, scale)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     block_size: int, cu_seqlens: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention of each query over the tokens of its selected blocks only.

    ``indices`` [B, T, H, K] as returned by :func:`select_blocks`. Gathers the selected blocks'
    keys/values per (token, kv head) and runs a masked softmax; differentiable in q, k, v.
    Returns [B, T, HQ, D] in q's dtype.
    """
    group = _check_shapes(q, k, v)
    b, t, hq, d = q.shape
    h = k.shape[2]
    nsel = indices.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    outs = []
    offs = torch.arange(block_size, device=q.device)
    for start, end in segments(t, cu_seqlens, b):
        ks, vs = k[:, start:end], v[:, start:end]
        for c0 in range(start, end, _CHUNK):
            c1 = min(c0 + _CHUNK, end)
            tc = c1 - c0
            idx = indices[:, c0:c1].long()  # [B, tc, H, K]
            tok = idx.unsqueeze(-1) * block_size + offs  # [B, tc, H, K, bs] doc-relative
            pos = torch.arange(c0 - start, c1 - start, device=q.device).view(1, tc, 1, 1, 1)
            valid = (idx.unsqueeze(-1) >= 0) & (tok <= pos)
            tok = tok.clamp(0, end - start - 1).reshape(b, tc, h, nsel * block_size)
            # gather keys/values: [B, tc, H, K*bs, D]
            gidx = tok.permute(0, 2, 1, 3).reshape(b, h, tc * nsel * block_size)
            kh = ks.permute(0, 2, 1, 3)  # [B, H, L, D]
            vh = vs.permute(0, 2, 1, 3)
            kg = torch.gather(kh, 2, gidx.unsqueeze(-1).expand(-1, -1, -1, d))
            vg = torch.gather(vh, 2, gidx.unsqueeze(-1).expand(-1, -1, -1, d))
            kg = kg.view(b, h, tc, nsel * block_size, d)
            vg = vg.view(b, h, tc, nsel * block_size, d)
            qc = q[:, c0:c1].reshape(b, tc, h, group, d).permute(0, 2, 1, 3, 4)  # [B,H,tc,G,D]
            logits = torch.einsum("bhtgd,bhtnd->bhtgn", qc.float(), kg.float()) * scale
            mask = valid.reshape(b, tc, h, nsel * block_size).permute(0, 2, 1, 3).unsqueeze(3)
            logits = logits.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            o = torch.einsum("bhtgn,bhtnd->bhtgd", probs, vg.float())
            outs.append(o.permute(0, 2, 1, 3, 4).reshape(b, tc, hq, d).to(q.dtype))
    return torch.cat(outs, dim=1)


def causal_segment_mask(t: int, cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    """Boolean [T, T] mask: True where query i may attend key j (causal, same document)."""
    mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    if cu_seqlens is not None:
        doc = torch.zeros(t, dtype=torch.long, device=device)
        doc[cu_seqlens[1:-1].long()] = 1
        doc = doc.cumsum(0)
        mask &= doc[:, None] == doc[None, :]
    return mask


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cu_seqlens: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Ordinary causal softmax attention with GQA through torch SDPA: [B, T, HQ, D]."""
    group = _check_shapes(q, k, v)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if group > 1:
        kh = kh.repeat_interleave(group, dim=1)
        vh = vh.repeat_interleave(group, dim=1)
    if cu_seqlens is None:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        segments(q.shape[1], cu_seqlens, q.shape[0])  # validates
        mask = causal_segment_mask(q.shape[1], cu_seqlens, q.device)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


def alignment_loss(o_full: torch.Tensor, o_sparse: torch.Tensor) -> torch.Tensor:
    """SmoothL1(O_full, sg(O_sparse)) + SmoothL1(sg(O_full), O_sparse), beta 1, mean (fp32)."""
    of, osp = o_full.float(), o_sparse.float()
    return (F.smooth_l1_loss(of, osp.detach(), beta=1.0)
            + F.smooth_l1_loss(of.detach(), osp, beta=1.0))


def selection_mask(indices: torch.Tensor, block_size: int, t: int,
                   cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense boolean [B, H, T, T] mask equivalent to ``indices`` (for tests and evaluation)."""
    b, _, h, _ = indices.shape
    mask = torch.zeros(b, h, t, t, dtype=torch.bool, device=indices.device)
    for start, end in segments(t, cu_seqlens, b):
        length = end - start
        nb_all = (length + block_size - 1) // block_size
        idx = indices[:, start:end].long()
        chosen = torch.zeros(b, length, h, nb_all + 1, dtype=torch.bool, device=indices.device)
        chosen.scatter_(3, torch.where(idx < 0, nb_all, idx), True)
        chosen = chosen[..., :nb_all]
        key_block = torch.arange(length, device=indices.device) // block_size
        allowed = chosen[..., key_block]  # [B, L, H, L]
        allowed &= torch.ones(length, length, dtype=torch.bool, device=indices.device).tril()[None, :, None, :]
        mask[:, :, start:end, start:end] = allowed.permute(0, 2, 1, 3)
    return mask
