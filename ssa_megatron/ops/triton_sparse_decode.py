"""Sparse SSA decoding in three Triton launches per layer (spec: ``reference.select_blocks_from_pooled``
followed by causal attention over the selected blocks).

One new token per sequence attends over a KV cache that keeps the fp32 means of its complete
blocks (``hf/ssa_cache.SSACacheLayer``). The block means are split into pieces of ``CONFIG["split"]``
blocks, so that many programs share the scoring of a long cache:

1. ``decode_stats_kernel``, grid (B * H, splits): per query head of the group, the max and the sum of
   ``exp(q . Kbar * scale)`` over the piece's complete blocks, and the logits themselves (G floats
   per mean, so that the next kernel reads them instead of the D-float means a second time);
2. ``decode_select_kernel``, same grid: the global softmax statistics from every piece's, the
   group-summed probability of each block of the piece, and the piece's best (K - 1) blocks
   other than the current one, as packed int64 keys ``(float bits of score) << 20 |
   (2^20 - 1 - block)`` (larger score first, then the smaller block: the reference's stable
   sort);
3. ``decode_attend_kernel``, grid (B * H,): the best (K - 1) keys over all pieces, the current
   block in slot 0, then attention of the group's query heads over those blocks' tokens up to
   the new token (online softmax, fp32 accumulation).

Each sequence's position is read from a device tensor, and the grid depends only on the
number of pooled blocks passed in: a caller that passes a device position tensor and a pooled
buffer of fixed capacity (blocks past a position are never read) launches the same grid every
step, so it can capture the step in a CUDA graph. (The HF model passes its cache's filled part
and an int position: fine eagerly, a new grid as blocks fill.)

The scoring kernels may take other queries than the attention (``q_select``: a learned selection
map's, or the moment2 score's [q, scale / 2 * q * q] against [mean, var] at twice the head dim).

Scores are computed as the prefill selection computes them: block means times
``scale * log2(e)`` in fp32, ``tl.dot`` at the selection's ``CONFIG["dot_precision"]``, exp2.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl

from ssa_megatron.ops.triton_selection import CONFIG as SELECT_CONFIG
from ssa_megatron.ops.triton_selection import DOT_PRECISIONS, LOG2E, next_pow2, score_dot

IDX_BITS = 20  # block index bits in a packed key (as in the selection kernel): 2^20 blocks
# "split": means per program of the two scoring kernels (one tile: the whole piece); a subN
# cache's piece holds split / N blocks, so its tile stays split means wide;
# "tile_tokens": cached tokens per attention tile (whole blocks; at least one block);
# "warps": warps per program of all three kernels.
CONFIG = {"split": 64, "tile_tokens": 64, "warps": 4}


def blocks_per_piece(parts: int) -> int:
    """Blocks per program of the two scoring kernels: ``CONFIG["split"]`` means, ``parts`` per
    block (subN caches hold N sub-block means per block)."""
    return max(1, CONFIG["split"] // parts)


@triton.jit
def _piece_logits(Q, P, POS, scale_log2, stride_qb, stride_qh, stride_pb, stride_pn, stride_ph,
                  H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  BLOCK: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  NSUB: tl.constexpr = 1):
    """For this program of a (B x H, pieces) grid: logits in log2 units [GP, SPLIT * NSUB] of the
    group's query heads against the piece's block means, or with NSUB > 1 its blocks' sub-block
    means (block-major; -inf for padding heads and for blocks not complete at the sequence's
    position), the piece's block ids [SPLIT], the position, and the program's (sequence x kv
    head, piece) index."""
    bh = tl.program_id(0)
    piece = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    pos = tl.load(POS + b)
    rows = tl.arange(0, GP)
    dd = tl.arange(0, D)
    cols = piece * SPLIT + tl.arange(0, SPLIT)
    entries = piece * SPLIT * NSUB + tl.arange(0, SPLIT * NSUB)
    complete = (pos + 1) // BLOCK * NSUB  # entries of complete blocks
    q = tl.load(Q + b * stride_qb + (h * G + rows[:, None]) * stride_qh + dd[None, :],
                mask=rows[:, None] < G, other=0.0).to(tl.float32)
    kbar = tl.load(P + b * stride_pb + entries[:, None] * stride_pn + h * stride_ph + dd[None, :],
                   mask=entries[:, None] < complete, other=0.0).to(tl.float32)
    logits = score_dot(q, kbar * scale_log2, DOT_PRECISION)
    visible = (rows[:, None] < G) & (entries[None, :] < complete)
    return tl.where(visible, logits, float("-inf")), cols, pos, bh, piece


@triton.jit
def decode_stats_kernel(Q, P, POS, M_OUT, L_OUT, LOGITS, scale_log2,
                        stride_qb, stride_qh, stride_pb, stride_pn, stride_ph,
                        H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                        BLOCK: tl.constexpr, SPLIT: tl.constexpr, SP: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, NSUB: tl.constexpr = 1):
    logits, _, _, bh, piece = _piece_logits(Q, P, POS, scale_log2, stride_qb, stride_qh, stride_pb,
                                            stride_pn, stride_ph, H, G, GP, D, BLOCK, SPLIT,
                                            DOT_PRECISION, NSUB)
    m = tl.max(logits, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.exp2(logits - m_safe[:, None]), 1)
    rows = tl.arange(0, GP)
    tl.store(M_OUT + (bh * SP + piece) * GP + rows, m)
    tl.store(L_OUT + (bh * SP + piece) * GP + rows, l)
    # the group's logits for the select kernel: G x 4 bytes per mean instead of its D x 4
    e = tl.arange(0, SPLIT * NSUB)
    tl.store(LOGITS + ((bh * SP + piece) * G + rows[:, None]) * (SPLIT * NSUB) + e[None, :],
             logits, mask=rows[:, None] < G)


@triton.jit
def decode_select_kernel(LOGITS, POS, M_IN, L_IN, KEYS_OUT, pieces,
                         H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                         BLOCK: tl.constexpr, SPLIT: tl.constexpr, SP: tl.constexpr,
                         KEEP: tl.constexpr, KP: tl.constexpr, IDX_BITS: tl.constexpr,
                         NSUB: tl.constexpr = 1):
    bh = tl.program_id(0)
    piece = tl.program_id(1)
    pos = tl.load(POS + bh // H)
    rows = tl.arange(0, GP)
    cols = piece * SPLIT + tl.arange(0, SPLIT)
    e = tl.arange(0, SPLIT * NSUB)
    logits = tl.load(LOGITS + ((bh * SP + piece) * G + rows[:, None]) * (SPLIT * NSUB) + e[None, :],
                     mask=rows[:, None] < G, other=float("-inf"))  # the stats kernel's
    sp = tl.arange(0, SP)
    stat = (bh * SP + sp[:, None]) * GP + rows[None, :]
    m_all = tl.load(M_IN + stat, mask=sp[:, None] < pieces, other=float("-inf"))  # [SP, GP]
    l_all = tl.load(L_IN + stat, mask=sp[:, None] < pieces, other=0.0)
    m = tl.max(m_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    z = tl.sum(l_all * tl.exp2(m_all - m_safe[None, :]), 0)
    # heads with no visible block (and padding heads) add 0 to the group sum
    mlog = tl.where(z > 0, m_safe + tl.log2(tl.where(z > 0, z, 1.0)), float("inf"))
    score = tl.sum(tl.exp2(logits - mlog[:, None]), 0)  # group-summed probability, >= 0
    if NSUB > 1:  # each block's NSUB sub-block probabilities
        score = tl.sum(tl.reshape(score, [SPLIT, NSUB]), 1)
    candidate = (cols < (pos + 1) // BLOCK) & (cols != pos // BLOCK)
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)
    low = ((1 << IDX_BITS) - 1 - cols).to(tl.int64)
    keys = tl.where(candidate, (bits << IDX_BITS) | low, -1)
    slots = tl.arange(0, KP)
    best_keys = tl.full([KP], -1, tl.int64)
    for j in range(KEEP):
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
                         NSEL: tl.constexpr, CHUNK: tl.constexpr, IDX_BITS: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
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
    # the blocks first (slot 0: the current one), so that the loads below do not wait on them
    tl.store(IDX_OUT + bh * NSEL, pos // BLOCK)
    for j in range(1, NSEL):
        best = tl.max(tl.max(keys, 1), 0)
        keys = tl.where(keys == best, -1, keys)
        block = tl.where(best >= 0, (1 << IDX_BITS) - 1 - (best & ((1 << IDX_BITS) - 1)), -1)
        tl.store(IDX_OUT + bh * NSEL + j, block.to(tl.int32))
    tl.debug_barrier()  # the program reads the blocks back below
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    rr = tl.arange(0, CHUNK * BLOCK)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for c in range(0, (NSEL + CHUNK - 1) // CHUNK):  # CHUNK blocks' tokens per tile
        slot = c * CHUNK + rr // BLOCK
        block = tl.load(IDX_OUT + bh * NSEL + slot, mask=slot < NSEL, other=-1)
        tok = block * BLOCK + rr % BLOCK
        valid = (block >= 0) & (tok <= pos)
        kt = tl.load(k_base + tok[:, None].to(tl.int64) * stride_kt + dd[None, :],
                     mask=valid[:, None], other=0.0)
        vt = tl.load(v_base + tok[:, None].to(tl.int64) * stride_vt + dd[None, :],
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


def _tile_sizes_ok(block_size: int, head_dim: int) -> bool:
    """Tensor-core tiles: block size and head dim powers of two, at least 16."""
    return all(n >= 16 and not n & (n - 1) for n in (block_size, head_dim))


def supports(q: torch.Tensor, k_cache: torch.Tensor, block_size: int,
             q_select: Optional[torch.Tensor] = None) -> bool:
    """Whether the kernels take this step: one new token, power-of-two block size, head dim and
    selection-query width >= 16 (tensor-core tiles), q and cache of one dtype."""
    width = q.shape[-1] if q_select is None else q_select.shape[-1]
    return (q.dim() == 3 or q.shape[1] == 1) and _tile_sizes_ok(block_size, q.shape[-1]) \
        and _tile_sizes_ok(block_size, width) and q.dtype == k_cache.dtype


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            pooled: torch.Tensor, positions: Union[int, torch.Tensor],
                            block_size: int, block_counts: int, scale: Optional[float] = None,
                            return_indices: bool = False, q_select: Optional[torch.Tensor] = None,
                            parts: int = 1):
    """Sparse attention of one new token per sequence over its KV cache.

    q [B, HQ, D] (or [B, 1, HQ, D]); k_cache, v_cache [B, H, T, D] (the cache's layout, holding
    the new token at ``positions``); pooled [B, nb, H, D] fp32 means of the cache's complete
    blocks (nb >= (position + 1) // block_size); positions: the new token's position, an int or an
    int tensor [B] on q's device. ``q_select`` (shaped like q but DS channels, DS a power of two
    >= 16): the two scoring kernels score ``q_select . pooled`` (pooled then [B, nb, H, DS]; a
    selection map's queries, or ``reference.moment2_operands`` at DS = 2 D) and the attention
    uses q. ``parts`` = N > 1 (the subN score): pooled holds the means of each complete block's N
    sub-blocks [B, nb * N, H, D] (``SSACacheLayer(parts=N)``) and a block scores the sum of their
    probabilities. Returns o shaped like q (and the selected blocks [B, H, block_counts] int32,
    -1 = empty slot, with ``return_indices``)."""
    squeeze = q.dim() == 4
    if squeeze:
        if q.shape[1] != 1:
            raise ValueError(f"sparse_decode_attention takes one new token per sequence, got {q.shape[1]}")
        q = q[:, 0]
    b, hq, d = q.shape
    if q_select is not None and q_select.dim() == 4 and q_select.shape[1] != 1:
        raise ValueError(f"selection queries {tuple(q_select.shape)}: one new token per sequence")
    qs = q if q_select is None else (q_select[:, 0] if q_select.dim() == 4 else q_select)
    ds = qs.shape[-1]
    if qs.shape[:2] != (b, hq) or pooled.shape[-1] != ds:
        raise ValueError(f"selection queries {tuple(qs.shape)} and pooled keys {tuple(pooled.shape)} "
                         f"do not fit q {tuple(q.shape)}")
    if not _tile_sizes_ok(block_size, ds):
        raise ValueError("the decode kernels need selection queries of a power-of-two width >= 16")
    h = k_cache.shape[1]
    if hq % h or k_cache.shape[-1] != d or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache's keys {tuple(k_cache.shape)} "
                         f"and values {tuple(v_cache.shape)}")
    if not _tile_sizes_ok(block_size, d):
        raise ValueError("the decode kernels need a power-of-two block size and head dim >= 16")
    if q.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"q ({q.dtype}) and the cache ({k_cache.dtype}, {v_cache.dtype}) must share a dtype")
    parts = int(parts)
    if parts < 1 or parts & (parts - 1) or block_size % parts or pooled.shape[1] % parts:
        raise ValueError(f"parts={parts}: a power of two dividing the block size {block_size} and "
                         f"the {pooled.shape[1]} pooled entries")
    blocks = pooled.shape[1] // parts
    if blocks >= 1 << IDX_BITS:
        raise ValueError(f"{blocks} pooled blocks: the decode kernels index at most {1 << IDX_BITS}")
    if not torch.is_tensor(positions):
        if blocks < (int(positions) + 1) // block_size:
            raise ValueError(f"pooled keys of {blocks} blocks, but position {int(positions)} "
                             f"has completed {(int(positions) + 1) // block_size}")
        positions = torch.full((b,), int(positions), dtype=torch.int32, device=q.device)
    positions = positions.to(device=q.device, dtype=torch.int32).expand(b).contiguous()
    g = hq // h
    scale = d ** -0.5 if scale is None else float(scale)
    q = q if q.stride(-1) == 1 else q.contiguous()
    qs = q if q_select is None else (qs if qs.stride(-1) == 1 else qs.contiguous())
    k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_cache, v_cache))
    pooled = pooled.float()
    pooled = pooled if pooled.stride(-1) == 1 else pooled.contiguous()
    if blocks == 0:  # no complete block yet: keep a valid pointer
        pooled = torch.zeros((b, parts, h, ds), dtype=torch.float32, device=q.device)
    precision = SELECT_CONFIG.get("dot_precision")
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"CONFIG['dot_precision'] = {precision!r}: expected one of {DOT_PRECISIONS}")
    split = blocks_per_piece(parts)
    pieces = triton.cdiv(pooled.shape[1] // parts, split)
    sp, gp = next_pow2(pieces), max(16, next_pow2(g))
    keep, kp = max(block_counts - 1, 1), max(next_pow2(max(block_counts - 1, 1)), 2)
    chunk = max(1, CONFIG["tile_tokens"] // block_size)
    m_part = torch.empty((b * h, sp, gp), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    keys = torch.empty((b * h, sp, kp), dtype=torch.int64, device=q.device)
    logits = torch.empty((b * h, sp, g, split * parts), dtype=torch.float32, device=q.device)
    idx = torch.empty((b, h, block_counts), dtype=torch.int32, device=q.device)
    o = torch.empty_like(q)
    common = dict(H=h, G=g, GP=gp, D=d, BLOCK=block_size, num_warps=CONFIG["warps"])
    scoring = dict(common, D=ds, SPLIT=split, SP=sp, DOT_PRECISION=precision or "default",
                   NSUB=parts)
    pool_strides = (pooled.stride(0), pooled.stride(1), pooled.stride(2))
    scale_log2 = scale * LOG2E
    decode_stats_kernel[(b * h, pieces)](
        qs, pooled, positions, m_part, l_part, logits, scale_log2, qs.stride(0), qs.stride(1),
        *pool_strides, **scoring)
    decode_select_kernel[(b * h, pieces)](
        logits, positions, m_part, l_part, keys, pieces, H=h, G=g, GP=gp, BLOCK=block_size,
        SPLIT=split, SP=sp, KEEP=keep, KP=kp, IDX_BITS=IDX_BITS, NSUB=parts,
        num_warps=CONFIG["warps"])
    decode_attend_kernel[(b * h,)](
        q, k_cache, v_cache, positions, keys, idx, o, scale, pieces, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1),
        SP=sp, KP=kp, NSEL=block_counts, CHUNK=chunk, IDX_BITS=IDX_BITS, **common)
    o = o[:, None] if squeeze else o
    return (o, idx) if return_indices else o
