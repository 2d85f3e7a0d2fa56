"""Sparse SSA decoding in three Triton launches per layer (spec: ``reference.select_blocks_from_pooled``
followed by causal attention over the selected blocks).

One new token per sequence attends over a KV cache that keeps the fp32 means of its complete
blocks (``hf/ssa_cache.SSACacheLayer``). The block means are split into pieces of ``CONFIG["split"]``
blocks, so that many programs share the scoring of a long cache:

1. ``decode_stats_kernel``, grid (B * H, splits): per query head of the group, the max and the sum of
   ``exp(q . Kbar * scale)`` over the piece's complete blocks;
2. ``decode_select_kernel``, same grid: the global softmax statistics from every piece's, the
   group-summed probability of each block of the piece, and the piece's best (K - 1) blocks
   other than the current one, as packed int64 keys ``(float bits of score) << 20 |
   (2^20 - 1 - block)`` (larger score first, then the smaller block: the reference's stable
   sort);
3. ``decode_attend_kernel``, grid (B * H,): the best (K - 1) keys over all pieces, the current
   block in slot 0, then attention of the group's query heads over those blocks' tokens up to
   the new token (online softmax, fp32 accumulation).

The position of each sequence's new token is read from a device tensor and the number of pieces
depends only on the cache's allocated blocks, so a step can be captured in a CUDA graph when
the cache's buffers stay in place.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ssa_megatron.ops.triton_selection import CONFIG as SELECT_CONFIG
from ssa_megatron.ops.triton_selection import DOT_PRECISIONS, next_pow2, score_dot

_IDX_BITS = 20  # block index bits in a packed key (as in the selection kernel)
# "split": block means per program of the two scoring kernels (one tile: the whole piece);
# "chunk": selected blocks per attention tile (power of two); "warps": warps per program of all
# three kernels. The scoring precision follows the prefill
# selection's CONFIG["dot_precision"] so decoding picks what the uncached pass picks.
CONFIG = {"split": 64, "chunk": 4, "warps": 4}


@triton.jit
def _piece_logits(Q, P, b, h, pos, piece, scale,
                  stride_qb, stride_qh, stride_pb, stride_pn, stride_ph,
                  G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                  SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Scaled logits [GP, SPLIT] of the group's query heads against the piece's block means
    (-inf for padding heads and for blocks that are not complete at ``pos``), and the block ids."""
    rows = tl.arange(0, GP)
    dd = tl.arange(0, D)
    cols = piece * SPLIT + tl.arange(0, SPLIT)
    complete = (pos + 1) // BLOCK
    q = tl.load(Q + b * stride_qb + (h * G + rows[:, None]) * stride_qh + dd[None, :],
                mask=rows[:, None] < G, other=0.0).to(tl.float32)
    kbar = tl.load(P + b * stride_pb + cols[:, None] * stride_pn + h * stride_ph + dd[None, :],
                   mask=cols[:, None] < complete, other=0.0)
    logits = score_dot(q, kbar, DOT_PRECISION) * scale
    visible = (rows[:, None] < G) & (cols[None, :] < complete)
    return tl.where(visible, logits, float("-inf")), cols


@triton.jit
def decode_stats_kernel(Q, P, POS, M_OUT, L_OUT, scale,
                        stride_qb, stride_qh, stride_pb, stride_pn, stride_ph,
                        H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                        BLOCK: tl.constexpr, SPLIT: tl.constexpr, SP: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    piece = tl.program_id(1)
    b = bh // H
    h = bh % H
    pos = tl.load(POS + b)
    logits, _ = _piece_logits(Q, P, b, h, pos, piece, scale, stride_qb, stride_qh, stride_pb,
                              stride_pn, stride_ph, G, GP, D, BLOCK, SPLIT, DOT_PRECISION)
    m = tl.max(logits, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.exp(logits - m_safe[:, None]), 1)
    rows = tl.arange(0, GP)
    tl.store(M_OUT + (bh * SP + piece) * GP + rows, m)
    tl.store(L_OUT + (bh * SP + piece) * GP + rows, l)


@triton.jit
def decode_select_kernel(Q, P, POS, M_IN, L_IN, KEYS_OUT, scale, pieces,
                         stride_qb, stride_qh, stride_pb, stride_pn, stride_ph,
                         H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                         BLOCK: tl.constexpr, SPLIT: tl.constexpr, SP: tl.constexpr,
                         KEEP: tl.constexpr, KP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    piece = tl.program_id(1)
    b = bh // H
    h = bh % H
    pos = tl.load(POS + b)
    rows = tl.arange(0, GP)
    sp = tl.arange(0, SP)
    stat = (bh * SP + sp[:, None]) * GP + rows[None, :]
    m_all = tl.load(M_IN + stat, mask=sp[:, None] < pieces, other=float("-inf"))  # [SP, GP]
    l_all = tl.load(L_IN + stat, mask=sp[:, None] < pieces, other=0.0)
    m = tl.max(m_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    z = tl.sum(l_all * tl.exp(m_all - m_safe[None, :]), 0)
    inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 0.0)  # heads with no visible block add 0
    logits, cols = _piece_logits(Q, P, b, h, pos, piece, scale, stride_qb, stride_qh, stride_pb,
                                 stride_pn, stride_ph, G, GP, D, BLOCK, SPLIT, DOT_PRECISION)
    probs = tl.exp(logits - m_safe[:, None]) * inv_z[:, None]
    score = tl.sum(probs, 0)  # [SPLIT] group sum, >= 0
    candidate = (cols < (pos + 1) // BLOCK) & (cols != pos // BLOCK)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    keys = tl.where(candidate, (bits << _IDX_BITS) | ((1 << _IDX_BITS) - 1 - cols), -1)
    slots = tl.arange(0, KP)
    best_keys = tl.full([KP], -1, tl.int64)
    for j in tl.static_range(KEEP):
        best = tl.max(keys, 0)
        best_keys = tl.where(slots == j, best, best_keys)
        keys = tl.where(keys == best, -1, keys)  # keys are unique: one block leaves
    tl.store(KEYS_OUT + (bh * SP + piece) * KP + slots, best_keys)


@triton.jit
def decode_attend_kernel(Q, K, V, POS, KEYS_IN, IDX_OUT, O, scale, pieces,
                         stride_qb, stride_qh, stride_kb, stride_kh, stride_kt,
                         stride_vb, stride_vh, stride_vt, stride_ob, stride_oh,
                         H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                         BLOCK: tl.constexpr, SP: tl.constexpr, KP: tl.constexpr,
                         NSEL: tl.constexpr, CHUNK: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    pos = tl.load(POS + b)
    sp = tl.arange(0, SP)
    slots = tl.arange(0, KP)
    keys = tl.load(KEYS_IN + (bh * SP + sp[:, None]) * KP + slots[None, :],
                   mask=sp[:, None] < pieces, other=-1)  # [SP, KP]
    rows = tl.arange(0, GP)
    dd = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + (h * G + rows[:, None]) * stride_qh + dd[None, :],
                mask=rows[:, None] < G, other=0.0)
    for j in tl.static_range(NSEL):  # the blocks first, so that the loads below do not wait on them
        if j == 0:
            block = pos // BLOCK
        else:
            best = tl.max(tl.max(keys, 1), 0)
            keys = tl.where(keys == best, -1, keys)
            block = tl.where(best >= 0, (1 << _IDX_BITS) - 1 - (best & ((1 << _IDX_BITS) - 1)), -1)
            block = block.to(tl.int32)
        tl.store(IDX_OUT + bh * NSEL + j, block)
    tl.debug_barrier()  # the program reads the blocks back below
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    rr = tl.arange(0, CHUNK * BLOCK)
    for c in tl.static_range((NSEL + CHUNK - 1) // CHUNK):  # CHUNK blocks' tokens per tile
        slot = c * CHUNK + rr // BLOCK
        block = tl.load(IDX_OUT + bh * NSEL + slot, mask=slot < NSEL, other=-1)
        tok = block * BLOCK + rr % BLOCK
        valid = (block >= 0) & (tok <= pos)
        kt = tl.load(K + b * stride_kb + h * stride_kh + tok[:, None] * stride_kt + dd[None, :],
                     mask=valid[:, None], other=0.0)
        vt = tl.load(V + b * stride_vb + h * stride_vh + tok[:, None] * stride_vt + dd[None, :],
                     mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(kt)) * scale  # [GP, CHUNK * BLOCK], fp32 accumulation
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + b * stride_ob + (h * G + rows[:, None]) * stride_oh + dd[None, :],
             out.to(O.dtype.element_ty), mask=rows[:, None] < G)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            pooled: torch.Tensor, positions: Union[int, torch.Tensor],
                            block_size: int, block_counts: int, scale: Optional[float] = None,
                            return_indices: bool = False):
    """Sparse attention of one new token per sequence over its KV cache.

    q [B, HQ, D] (or [B, 1, HQ, D]); k_cache, v_cache [B, H, T, D] (the cache's layout, holding
    the new token at ``positions``); pooled [B, nb, H, D] fp32 means of the cache's complete
    blocks (nb >= (position + 1) // block_size); positions: the new token's position, an int or an
    int tensor [B] on q's device. Returns o shaped like q (and the selected blocks [B, H,
    block_counts] int32, -1 = empty slot, with ``return_indices``)."""
    squeeze = q.dim() == 4
    if squeeze:
        if q.shape[1] != 1:
            raise ValueError(f"sparse_decode_attention takes one new token per sequence, got {q.shape[1]}")
        q = q[:, 0]
    b, hq, d = q.shape
    h = k_cache.shape[1]
    if hq % h or k_cache.shape[-1] != d or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache's keys {tuple(k_cache.shape)} "
                         f"and values {tuple(v_cache.shape)}")
    if block_size < 16 or block_size & (block_size - 1) or d < 16 or d & (d - 1):
        raise ValueError("the decode kernels need a power-of-two block size and head dim >= 16")
    g = hq // h
    scale = d ** -0.5 if scale is None else float(scale)
    if not torch.is_tensor(positions):
        positions = torch.full((b,), int(positions), dtype=torch.int32, device=q.device)
    positions = positions.to(device=q.device, dtype=torch.int32).expand(b).contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_cache, v_cache))
    pooled = pooled.float()
    pooled = pooled if pooled.stride(-1) == 1 else pooled.contiguous()
    split = CONFIG["split"]
    pieces = max(1, triton.cdiv(pooled.shape[1], split))
    sp, gp = next_pow2(pieces), max(16, next_pow2(g))
    keep, kp = max(block_counts - 1, 1), max(next_pow2(max(block_counts - 1, 1)), 2)
    precision = SELECT_CONFIG.get("dot_precision")
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"CONFIG['dot_precision'] = {precision!r}: expected one of {DOT_PRECISIONS}")
    precision = precision or "default"
    if pooled.shape[1] == 0:  # no complete block yet: keep a valid pointer
        pooled = torch.zeros((b, 1, h, d), dtype=torch.float32, device=q.device)
    m_part = torch.empty((b * h, sp, gp), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    keys = torch.empty((b * h, sp, kp), dtype=torch.int64, device=q.device)
    idx = torch.empty((b, h, block_counts), dtype=torch.int32, device=q.device)
    o = torch.empty_like(q)
    common = dict(H=h, G=g, GP=gp, D=d, BLOCK=block_size, num_warps=CONFIG["warps"])
    pool_strides = (pooled.stride(0), pooled.stride(1), pooled.stride(2))
    decode_stats_kernel[(b * h, pieces)](
        q, pooled, positions, m_part, l_part, scale, q.stride(0), q.stride(1), *pool_strides,
        SPLIT=split, SP=sp, DOT_PRECISION=precision, **common)
    decode_select_kernel[(b * h, pieces)](
        q, pooled, positions, m_part, l_part, keys, scale, pieces, q.stride(0), q.stride(1),
        *pool_strides, SPLIT=split, SP=sp, KEEP=keep, KP=kp, DOT_PRECISION=precision, **common)
    decode_attend_kernel[(b * h,)](
        q, k_cache, v_cache, positions, keys, idx, o, scale, pieces, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1),
        SP=sp, KP=kp, NSEL=block_counts, CHUNK=CONFIG["chunk"], **common)
    o = o[:, None] if squeeze else o
    return (o, idx) if return_indices else o
