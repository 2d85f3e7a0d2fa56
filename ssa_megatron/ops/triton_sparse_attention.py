"""Block-sparse SSA attention in Triton, forward and backward (spec: ``reference.sparse_attention``).

Layout: q [B, T, HQ, D], k/v [B, T, H, D], indices int32 [B, T, H, K] (document-relative block
numbers, -1 = empty slot), optional ``cu_seqlens`` (packed, B == 1).

Forward / dq (query-centric): a program holds ``BT`` tokens x ``G`` query heads of one kv head
as tile rows. With G >= 16, BT = 1: the group's heads are the rows and every slot is one
[bs, D] key block. With G < 16, BT = 16 / G tokens share the tile: for slot i the program loads
the BT tokens' own blocks side by side ([BT * bs, D]) and masks the cross-token entries, so the
matmuls keep 16 rows (tensor-core shape) at the price of BT-fold redundant MMA work. On Hopper
and newer, with G a power of two >= 16 (``CONFIG["tma"]``), the forward and dq instead copy each
selected [block, D] K/V tile with one TMA (tensor memory access) copy, two blocks per step, one
warp per (token, kv head): no per-thread address arithmetic, and the cross-warp reductions of a
two-warp tile are gone.

dk / dv (key-centric, no atomics in the sums): the selections are inverted once per backward
(``CONFIG["invert"]``: a sort of (head, block, token) keys, or a counting sort) into, for every
key block, the list of tokens that selected it; one program per (key block, kv head), longest
list first, walks that list, ``BE`` tokens x G heads at a time, and writes dk, dv once. Lists
longer than ``CONFIG["dkv_split"]`` entries (blocks nearly every token selects: sinks) are cut
into segments; an earlier launch writes the later segments' fp32 partials, which the list's own
program adds in order (deterministic, no atomics).

Plain pointer arithmetic only (Triton 3.6 on GPU, 3.9 CPU interpreter).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ssa_megatron.ops.triton_selection import (LOG2E, next_pow2, compile_options, doc_offsets,
                                                tiles)

# launch parameters, keyed by head dim <= 64 / > 64 (swept with tools/bench_kernel_variants.py;
# the measurements behind each value are in docs/KERNEL_NOTES.md).
CONFIG = {
    "small_d": {"cols": 64, "fwd_warps": 2, "dq_warps": 2, "dkv_warps": 4, "stages": 2,
                "dkv_stages": 3, "dkv_rows": 128,
                "fwd_maxnreg": 0, "dq_maxnreg": 0, "dkv_maxnreg": 0,
                "tma": 1, "tma_warps": 1, "tma_stages": 2, "tma_step": 2,
                "tma_pair": 1},
    "large_d": {"cols": 128, "fwd_warps": 4, "dq_warps": 4, "dkv_warps": 4, "stages": 2,
                "dkv_rows": 64,
                "fwd_maxnreg": 0, "dq_maxnreg": 0, "dkv_maxnreg": 0,
                "tma": 1, "tma_warps": 1, "tma_stages": 2, "tma_step": 2,
                "tma_pair": 1},
    # *_maxnreg: registers per thread the compiler may use (0: its own choice)
    # tma: forward and dq load each selected [block, D] K/V tile with one tensor-memory-access
    #   copy (Hopper+, G a power of two >= 16, D a power of two) instead of per-thread gathers,
    #   tma_step blocks per loop step (the forward's softmax update per block, or per two blocks
    #   with tma_pair and an even step), tma_warps warps, tma_stages pipelining stages.
    #   Faster than the gathers for forward and dq at D 64 and 128 (docs/KERNEL_NOTES.md v7);
    #   dk/dv keeps its gathers (copying each listed token's q / dO rows by TMA was slower).
    # How the backward inverts the selection into per-key-block token lists:
    #   "sort64": stable torch.sort of int64 (head, block) keys (v2);
    #   "sort32": torch.sort of unique int32 (head, block, token) keys where they fit in 31 bits,
    #             else sort64 (same lists, token order ascending: bit-identical dk/dv);
    #   "atomic": Triton counting sort (atomic counters); the order inside a list, and so the
    #             fp32 summation order of dk/dv, varies from run to run (as flash attention's
    #             dq does). Used only while torch.are_deterministic_algorithms_enabled() is
    #             False; under torch.use_deterministic_algorithms(True) sort32 runs instead.
    "invert": "atomic",
    # Entries of a key block's token list one dk/dv program walks at most (0: the whole list);
    # longer lists (attention sinks: every later token selects them) are cut into segments
    # whose fp32 partials the list's first program adds in order. Peak memory: a scratch of
    # (selection entries / dkv_split) fp32 [2, block, head dim] tiles, sized without a host
    # sync; a larger split needs less.
    "dkv_split": 512,
    # Launch order of the key-centric dk/dv programs: "longest" (longest token list first, so the
    # few very long lists - early blocks, attention sinks - do not run alone at the end) or
    # "index" (block order).
    "dkv_order": "longest",
    # On CUDA, build the dk/dv lists (inversion, launch order) on a side stream while the dq
    # pass runs: they need only the selection.
    "overlap_invert": True,
}


def head_dim_config(bd: int) -> dict:
    return CONFIG["small_d" if bd <= 64 else "large_d"]


def launch_options(bd: int, which: str) -> dict:
    c = head_dim_config(bd)
    return dict(num_warps=c[which + "_warps"],
                **compile_options(c.get(which + "_stages", c["stages"]), c.get(which + "_maxnreg")))


@lru_cache(maxsize=64)
def _blocks_cpu(offs: Tuple[int, ...], bs: int):
    """Global key blocks (partial ones included): first token, length; per-doc block offset."""
    start, length, doc_boff = [], [], []
    nb = 0
    for a, b in zip(offs, offs[1:]):
        n = b - a
        doc_boff.append(nb)
        if n > 0:
            s = torch.arange(a, b, bs, dtype=torch.int32)
            start.append(s)
            length.append(torch.clamp(b - s, max=bs).to(torch.int32))
            nb += s.numel()
    if not start:
        e = torch.zeros(0, dtype=torch.int32)
        return e, e, nb
    return torch.cat(start), torch.cat(length), nb


def key_blocks(offs, bs, device):
    """(block starts, block lengths, block count, each token's document block offset) of the
    documents ``offs`` on ``device``; kept for the next call with the same documents."""
    return _key_blocks(tuple(offs), bs, str(device))


@lru_cache(maxsize=64)
def _key_blocks(offs, bs, device: str):
    s, ln, nb = _blocks_cpu(offs, bs)
    tok_boff = torch.empty(offs[-1], dtype=torch.int32)
    boff = 0
    for a, b in zip(offs, offs[1:]):
        tok_boff[a:b] = boff
        boff += (b - a + bs - 1) // bs
    return s.to(device), ln.to(device), nb, tok_boff.to(device)




# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def gather_blocks(IDX, Kt, V, tok_c, col_tok_ok, cs, cj, ds, h, i0, dd, dmask,
                  H: tl.constexpr, D: tl.constexpr, K: tl.constexpr, BS: tl.constexpr):
    """K and V rows of slots i0 + cs ([C, BD] each, zero where masked) and the column mask."""
    slot = i0 + cs
    blk = tl.load(IDX + (tok_c.to(tl.int64) * H + h) * K + slot, mask=col_tok_ok & (slot < K),
                  other=-1)
    kpos = ds + blk * BS + cj
    col_ok = col_tok_ok & (blk >= 0) & (kpos <= tok_c)
    kv_off = (kpos.to(tl.int64) * H + h) * D
    kvmask = col_ok[:, None] & dmask[None, :]
    kt = tl.load(Kt + kv_off[:, None] + dd[None, :], mask=kvmask, other=0.0)
    vt = tl.load(V + kv_off[:, None] + dd[None, :], mask=kvmask, other=0.0)
    return kt, vt, col_ok


@triton.jit
def _fwd_kernel(
    Q, Kt, V, IDX, O, LSE, TILE_TOK, TILE_DS, TILE_DL,
    scale_log2,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
    BS: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr, NS: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    tok0 = tl.load(TILE_TOK + pid)
    ds = tl.load(TILE_DS + pid)
    dl = tl.load(TILE_DL + pid)

    R: tl.constexpr = BT * GP
    C: tl.constexpr = NS * BT * BS  # columns: NS slots x BT tokens x BS keys
    r = tl.arange(0, R)
    rt = r // GP
    rg = r % GP
    tok_r = tok0 + rt
    row_ok = (tok_r - ds < dl) & (rg < G)
    dd = tl.arange(0, BD)
    dmask = dd < D
    qrow = (tok_r.to(tl.int64) * HQ + h * G + rg) * D
    q = tl.load(Q + qrow[:, None] + dd[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0)

    c = tl.arange(0, C)
    cs = c // (BT * BS)
    ct = (c // BS) % BT
    cj = c % BS
    tok_c = tok0 + ct
    col_tok_ok = tok_c - ds < dl
    same = rt[:, None] == ct[None, :]

    m = tl.full([R], -1.0e30, tl.float32)
    lsum = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, BD], tl.float32)
    for i0 in range(0, K, NS):
        kt, vt, col_ok = gather_blocks(IDX, Kt, V, tok_c, col_tok_ok, cs, cj, ds, h, i0, dd,
                                       dmask, H, D, K, BS)
        s = tl.dot(q, tl.trans(kt)) * scale_log2
        s = tl.where(same & col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m = m_new
    lsafe = tl.maximum(lsum, 1.0e-30)
    o = acc / lsafe[:, None]
    tl.store(O + qrow[:, None] + dd[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None] & dmask[None, :])
    lrow = tok_r.to(tl.int64) * HQ + h * G + rg
    tl.store(LSE + lrow, m + tl.log2(lsafe), mask=row_ok)


@triton.jit
def tma_block(k_desc, v_desc, idx_row, i, ds, tok, h, D: tl.constexpr, K: tl.constexpr,
              BS: tl.constexpr):
    """Slot i's K and V tiles [BS, D] (one TMA copy each; an empty slot loads block 0) and the
    mask of its keys the token may see.

    The copy takes whole blocks: rows the token must not see (later tokens of its block, or the
    next document's first tokens where a document ends inside a block) are masked in the scores
    but still meet a zero in the MMAs, so a NaN or Inf there reaches the token (0 x NaN).
    Zeroing them costs much of the forward (docs/KERNEL_NOTES.md: the tiles then go through
    registers before the MMAs), and a batch with non-finite keys or values has a non-finite
    loss anyway; the gather kernels (CONFIG tma off) keep such values out."""
    blk = tl.load(idx_row + i, mask=i < K, other=-1)
    row0 = ds + tl.maximum(blk, 0) * BS
    kt = k_desc.load([row0, h * D])
    vt = v_desc.load([row0, h * D])
    ok = (blk >= 0) & (row0 + tl.arange(0, BS) <= tok)
    return kt, vt, ok


@triton.jit
def _fwd_tma_update(q, m, lsum, acc, k_desc, v_desc, idx_row, i, ds, tok, h, scale_log2,
                    D: tl.constexpr, K: tl.constexpr, BS: tl.constexpr, PAIR: tl.constexpr):
    """Online-softmax update with slot i (PAIR: slots i and i + 1 under one shared max)."""
    kt, vt, ok = tma_block(k_desc, v_desc, idx_row, i, ds, tok, h, D, K, BS)
    s = tl.where(ok[None, :], tl.dot(q, tl.trans(kt)) * scale_log2, float("-inf"))
    if PAIR:
        kt1, vt1, ok1 = tma_block(k_desc, v_desc, idx_row, i + 1, ds, tok, h, D, K, BS)
        s1 = tl.where(ok1[None, :], tl.dot(q, tl.trans(kt1)) * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.maximum(tl.max(s, axis=1), tl.max(s1, axis=1)))
    else:
        m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    lsum = lsum * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
    if PAIR:
        p1 = tl.exp2(s1 - m_new[:, None])
        lsum += tl.sum(p1, axis=1)
        acc += tl.dot(p1.to(vt1.dtype), vt1)
    return m_new, lsum, acc


@triton.jit
def _fwd_tma_kernel(q_desc, k_desc, v_desc, IDX, O, LSE, TILE_DS, scale_log2,
                    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                    K: tl.constexpr, BS: tl.constexpr, STEP: tl.constexpr, PAIR: tl.constexpr):
    """Forward for G >= 16 (a power of two): the token's G heads are the rows; each loop step
    takes STEP selected blocks, each copied whole by TMA (no per-thread address arithmetic),
    and updates the softmax per block (PAIR: per two blocks)."""
    tok = tl.program_id(0)
    h = tl.program_id(1)
    ds = tl.load(TILE_DS + tok)
    q = q_desc.load([tok * HQ + h * G, 0])
    idx_row = IDX + (tok.to(tl.int64) * H + h) * K
    m = tl.full([G], -1.0e30, tl.float32)
    lsum = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, D], tl.float32)
    for i in range(0, K, STEP):
        for j in tl.static_range(0, STEP, 1 + PAIR):
            m, lsum, acc = _fwd_tma_update(q, m, lsum, acc, k_desc, v_desc, idx_row, i + j, ds,
                                           tok, h, scale_log2, D, K, BS, PAIR)
    lsafe = tl.maximum(lsum, 1.0e-30)
    lrow = tok.to(tl.int64) * HQ + h * G + tl.arange(0, G)
    dd = tl.arange(0, D)
    tl.store(O + lrow[:, None] * D + dd[None, :], (acc / lsafe[:, None]).to(O.dtype.element_ty))
    tl.store(LSE + lrow, m + tl.log2(lsafe))


# --------------------------------------------------------------------------------------------
# Backward: dq (query-centric; also writes delta = rowsum(dO * O))
# --------------------------------------------------------------------------------------------

@triton.jit
def _bwd_dq_kernel(
    Q, Kt, V, IDX, O, DO, LSE, DELTA, DQ, TILE_TOK, TILE_DS, TILE_DL,
    scale_log2, scale,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
    BS: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr, NS: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    tok0 = tl.load(TILE_TOK + pid)
    ds = tl.load(TILE_DS + pid)
    dl = tl.load(TILE_DL + pid)

    R: tl.constexpr = BT * GP
    C: tl.constexpr = NS * BT * BS  # columns: NS slots x BT tokens x BS keys
    r = tl.arange(0, R)
    rt = r // GP
    rg = r % GP
    tok_r = tok0 + rt
    row_ok = (tok_r - ds < dl) & (rg < G)
    dd = tl.arange(0, BD)
    dmask = dd < D
    rmask = row_ok[:, None] & dmask[None, :]
    lrow = tok_r.to(tl.int64) * HQ + h * G + rg
    qrow = lrow * D
    q = tl.load(Q + qrow[:, None] + dd[None, :], mask=rmask, other=0.0)
    do = tl.load(DO + qrow[:, None] + dd[None, :], mask=rmask, other=0.0)
    o = tl.load(O + qrow[:, None] + dd[None, :], mask=rmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + lrow, delta, mask=row_ok)
    lse = tl.load(LSE + lrow, mask=row_ok, other=0.0)

    c = tl.arange(0, C)
    cs = c // (BT * BS)
    ct = (c // BS) % BT
    cj = c % BS
    tok_c = tok0 + ct
    col_tok_ok = tok_c - ds < dl
    same = rt[:, None] == ct[None, :]

    dq = tl.zeros([R, BD], tl.float32)
    for i0 in range(0, K, NS):
        kt, vt, col_ok = gather_blocks(IDX, Kt, V, tok_c, col_tok_ok, cs, cj, ds, h, i0, dd,
                                       dmask, H, D, K, BS)
        s = tl.dot(q, tl.trans(kt)) * scale_log2
        ok = same & col_ok[None, :] & row_ok[:, None]
        p = tl.where(ok, tl.exp2(tl.minimum(s - lse[:, None], 0.0)), 0.0)
        dp = tl.dot(do, tl.trans(vt))
        dsc = p * (dp - delta[:, None])
        dq += tl.dot(dsc.to(kt.dtype), kt)
    tl.store(DQ + qrow[:, None] + dd[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=rmask)


@triton.jit
def _bwd_dq_tma_kernel(q_desc, k_desc, v_desc, do_desc, IDX, O, LSE, DELTA, DQ, TILE_DS,
                       scale_log2, scale,
                       HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                       K: tl.constexpr, BS: tl.constexpr, STEP: tl.constexpr,
                       PAIR: tl.constexpr):
    """dq (and delta) for G >= 16 with TMA block copies, STEP blocks per loop step, as
    ``_fwd_tma_kernel`` (PAIR is the forward's and unused here)."""
    tok = tl.program_id(0)
    h = tl.program_id(1)
    ds = tl.load(TILE_DS + tok)
    r0 = tok * HQ + h * G
    q = q_desc.load([r0, 0])
    do = do_desc.load([r0, 0])
    lrow = tok.to(tl.int64) * HQ + h * G + tl.arange(0, G)
    dd = tl.arange(0, D)
    o = tl.load(O + lrow[:, None] * D + dd[None, :])
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + lrow, delta)
    lse = tl.load(LSE + lrow)
    idx_row = IDX + (tok.to(tl.int64) * H + h) * K
    dq = tl.zeros([G, D], tl.float32)
    for i in range(0, K, STEP):
        for j in tl.static_range(STEP):
            kt, vt, ok = tma_block(k_desc, v_desc, idx_row, i + j, ds, tok, h, D, K, BS)
            s = tl.dot(q, tl.trans(kt)) * scale_log2
            p = tl.where(ok[None, :], tl.exp2(tl.minimum(s - lse[:, None], 0.0)), 0.0)
            dsc = p * (tl.dot(do, tl.trans(vt)) - delta[:, None])
            dq += tl.dot(dsc.to(kt.dtype), kt)
    tl.store(DQ + lrow[:, None] * D + dd[None, :], (dq * scale).to(DQ.dtype.element_ty))


# --------------------------------------------------------------------------------------------
# Backward: dk, dv (key-centric over the inverted selection lists)
# --------------------------------------------------------------------------------------------

@triton.jit
def _dkv_segment(Q, DO, LSE, DELTA, LIST_TOK, kt, vt, kpos, kok, h, lo, hi, scale_log2,
                 HQ: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BS: tl.constexpr,
                 BE: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr):
    """dk / scale and dv of one key block from the list entries lo .. hi-1 (fp32 [BS, BD])."""
    dd = tl.arange(0, BD)
    dmask = dd < D
    R: tl.constexpr = BE * GP
    r = tl.arange(0, R)
    re = r // GP
    rg = r % GP
    dk = tl.zeros([BS, BD], tl.float32)
    dv = tl.zeros([BS, BD], tl.float32)
    for e0 in range(lo, hi, BE):
        e = e0 + re
        e_ok = (e < hi) & (rg < G)
        tok = tl.load(LIST_TOK + e, mask=e_ok, other=0)
        lrow = tok.to(tl.int64) * HQ + h * G + rg
        rmask = e_ok[:, None] & dmask[None, :]
        q = tl.load(Q + lrow[:, None] * D + dd[None, :], mask=rmask, other=0.0)
        do = tl.load(DO + lrow[:, None] * D + dd[None, :], mask=rmask, other=0.0)
        lse = tl.load(LSE + lrow, mask=e_ok, other=0.0)
        delta = tl.load(DELTA + lrow, mask=e_ok, other=0.0)
        s = tl.dot(q, tl.trans(kt)) * scale_log2
        ok = e_ok[:, None] & kok[None, :] & (kpos[None, :] <= tok[:, None])
        p = tl.where(ok, tl.exp2(tl.minimum(s - lse[:, None], 0.0)), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(vt))
        dsc = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(dsc.to(q.dtype)), q)
    return dk, dv


@triton.jit
def owning_list(END, pid, n, steps):
    """The first w in [0, n) with END[w] > pid (END: inclusive cumulative program counts per
    list): the list whose segment or tile the pid-th program works on (steps >= log2(n) + 1)."""
    a = pid * 0
    b = a + n
    for _ in range(steps):
        mid = (a + b) // 2
        right = tl.load(END + mid) > pid
        b = tl.where(right, mid, b)
        a = tl.where(right, a, mid + 1)
    return a


@triton.jit
def load_key_block(Kt, V, BLK_START, BLK_LEN, gb, h, dd, dmask,
                   H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
    """Key block gb of kv head h: its K and V rows ([BS, BD], zero past the block's end), their
    positions, which of them exist (a document's last block may be short), and the row offsets and
    mask to store the block's dk/dv with."""
    k0 = tl.load(BLK_START + gb)
    kl = tl.load(BLK_LEN + gb)
    j = tl.arange(0, BS)
    kpos = k0 + j
    kok = j < kl
    kv_off = (kpos.to(tl.int64) * H + h) * D
    kmask = kok[:, None] & dmask[None, :]
    kt = tl.load(Kt + kv_off[:, None] + dd[None, :], mask=kmask, other=0.0)
    vt = tl.load(V + kv_off[:, None] + dd[None, :], mask=kmask, other=0.0)
    return kt, vt, kpos, kok, kv_off, kmask


@triton.jit
def _bwd_dkv_kernel(
    Q, Kt, V, DO, LSE, DELTA, DK, DV, BLK_START, BLK_LEN, LIST_OFF, LIST_TOK, ORDER,
    EXTRA_END, PARTIAL, scale_log2, scale, NB, NW, SEARCH_STEPS,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    BS: tl.constexpr, BE: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr,
    SPLIT: tl.constexpr, EXTRAS: tl.constexpr,
):
    """One key block's dk, dv over (part of) its token list.

    SPLIT == 0: a program per list (launch order ORDER) walks it all. SPLIT > 0: lists longer
    than SPLIT entries are cut into SPLIT-entry segments so that a block every token selects
    (an attention sink) does not walk tens of thousands of entries alone. EXTRAS: a program per
    segment after a list's first (EXTRA_END: inclusive count of such segments in launch order)
    writes its fp32 partial to PARTIAL; then the owner launch, a program per list, does the
    first segment and adds its list's partials in order (deterministic), and writes dk, dv."""
    pid = tl.program_id(0)
    if EXTRAS:
        if pid >= tl.load(EXTRA_END + NW - 1):
            return
        pos = owning_list(EXTRA_END, pid, NW, SEARCH_STEPS)  # launch position of its list
        first = tl.load(EXTRA_END + pos - 1, mask=pos > 0, other=0)
        seg = pid - first + 1
    else:
        pos = pid
        seg = 0
    w = tl.load(ORDER + pos)  # (head, key block) of this program
    h = w // NB
    gb = w % NB
    dd = tl.arange(0, BD)
    dmask = dd < D
    kt, vt, kpos, kok, kv_off, kmask = load_key_block(Kt, V, BLK_START, BLK_LEN, gb, h, dd, dmask,
                                                      H, D, BS)

    lo = tl.load(LIST_OFF + w)
    hi = tl.load(LIST_OFF + w + 1)
    if SPLIT > 0:
        lo = lo + seg * SPLIT
        hi = tl.minimum(hi, lo + SPLIT)
    dk, dv = _dkv_segment(Q, DO, LSE, DELTA, LIST_TOK, kt, vt, kpos, kok, h, lo, hi, scale_log2,
                          HQ, D, G, BS, BE, GP, BD)
    tile = tl.arange(0, BS)[:, None] * BD + dd[None, :]
    if EXTRAS:
        part = PARTIAL + pid.to(tl.int64) * (2 * BS * BD)
        tl.store(part + tile, dk)
        tl.store(part + BS * BD + tile, dv)
        return
    if SPLIT > 0:
        e_hi = tl.load(EXTRA_END + pos)
        e_lo = tl.load(EXTRA_END + pos - 1, mask=pos > 0, other=0)
        part = PARTIAL + e_lo.to(tl.int64) * (2 * BS * BD)
        for _ in range(e_lo, e_hi):
            dk += tl.load(part + tile)
            dv += tl.load(part + BS * BD + tile)
            part += 2 * BS * BD
    tl.store(DK + kv_off[:, None] + dd[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + kv_off[:, None] + dd[None, :], dv.to(DV.dtype.element_ty), mask=kmask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def tile_tokens(g: int, bs: int) -> int:
    gp = next_pow2(g)
    return max(1, min(16 // gp, bs)) if gp < 16 else 1


def _slots(bt: int, bs: int, kc: int, bd: int) -> int:
    """Selected blocks handled per loop step (enough for CONFIG's key columns per step)."""
    return max(1, min(head_dim_config(bd)["cols"] // (bt * bs), next_pow2(kc)))


SORT32_MAX_KEY = 2 ** 31 - 1  # sort32's largest key (the empty-slot key h * nb * n)


def invert_selection(idx: torch.Tensor, tok_boff: torch.Tensor, nb: int,
                     method: Optional[str] = None):
    """(head, global key block) -> tokens that selected it: CSR offsets [H * nb + 1], tokens.

    ``method``: CONFIG["invert"] (see there). Every method gives the same lists; "sort64" and
    "sort32" also the same order inside each list (ascending token).
    """
    method = method or CONFIG["invert"]
    if method not in ("sort64", "sort32", "atomic"):
        raise ValueError(f"CONFIG['invert'] = {method!r}: expected sort64, sort32 or atomic")
    if method == "atomic" and torch.are_deterministic_algorithms_enabled():
        method = "sort32"
    n, h, kc = idx.shape
    if method == "atomic":
        return invert_atomic(idx, tok_boff, nb)
    if method == "sort32" and h * nb * n <= SORT32_MAX_KEY:
        return invert_sort32(idx, tok_boff, nb)
    gblk = idx.long() + tok_boff.long()[:, None, None]
    head = torch.arange(h, device=idx.device).view(1, h, 1)
    key = torch.where(idx >= 0, head * nb + gblk, torch.full_like(gblk, h * nb))
    key = key.permute(1, 0, 2).reshape(-1)  # [H * N * K], ordered (head, token, slot)
    skey, perm = torch.sort(key, stable=True)
    toks = (perm % (n * kc)) // kc
    # list boundaries by binary search (bincount was slow on int keys on the H200)
    off = torch.searchsorted(skey, torch.arange(h * nb + 1, device=idx.device)).to(torch.int32)
    return off, toks.to(torch.int32)


def invert_sort32(idx: torch.Tensor, tok_boff: torch.Tensor, nb: int):
    """Unique int32 keys ((head * nb + block) * n + token): one unstable sort, no payload."""
    n, h, kc = idx.shape
    dev = idx.device
    head_blk = torch.arange(h, device=dev, dtype=torch.int32).view(1, h, 1) * nb + idx \
        + tok_boff[:, None, None]
    tok = torch.arange(n, device=dev, dtype=torch.int32).view(n, 1, 1)
    key = torch.where(idx >= 0, head_blk * n + tok, h * nb * n)  # h * nb * n: empty slot
    skey = torch.sort(key.view(-1)).values
    bounds = torch.arange(h * nb + 1, device=dev, dtype=torch.int32) * n
    off = torch.searchsorted(skey, bounds, out_int32=True)
    return off, skey % n


@triton.jit
def _list_entries(IDX, TOK_BOFF, total, NB, H: tl.constexpr, K: tl.constexpr,
                  BLOCK: tl.constexpr):
    """This program's flat [N, H, K] selection entries: index, valid, token, list id."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < total
    blk = tl.load(IDX + e, mask=ok, other=-1)
    valid = ok & (blk >= 0)
    tok = e // (H * K)
    head = (e // K) % H
    key = head * NB + tl.load(TOK_BOFF + tok, mask=valid, other=0) + blk
    return e, valid, tok, key


@triton.jit
def _count_kernel(IDX, TOK_BOFF, CNT, POS, total, NB,
                  H: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    e, valid, tok, key = _list_entries(IDX, TOK_BOFF, total, NB, H, K, BLOCK)
    pos = tl.atomic_add(CNT + key, tl.full([BLOCK], 1, tl.int32), mask=valid)
    tl.store(POS + e, pos, mask=valid)


@triton.jit
def _scatter_kernel(IDX, TOK_BOFF, OFF, POS, TOKS, total, NB,
                    H: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
    e, valid, tok, key = _list_entries(IDX, TOK_BOFF, total, NB, H, K, BLOCK)
    dst = tl.load(OFF + key, mask=valid, other=0) + tl.load(POS + e, mask=valid, other=0)
    tl.store(TOKS + dst, tok.to(tl.int32), mask=valid)


def invert_atomic(idx: torch.Tensor, tok_boff: torch.Tensor, nb: int):
    """Counting sort: atomic counters give each entry its place in its list, then a scatter."""
    n, h, kc = idx.shape
    total = n * h * kc
    dev = idx.device
    cnt = torch.zeros(h * nb, dtype=torch.int32, device=dev)
    pos = torch.empty(total, dtype=torch.int32, device=dev)
    block = 1024
    grid = (triton.cdiv(total, block),)
    _count_kernel[grid](idx, tok_boff, cnt, pos, total, nb, H=h, K=kc, BLOCK=block)
    off = torch.zeros(h * nb + 1, dtype=torch.int32, device=dev)
    torch.cumsum(cnt, 0, out=off[1:])
    toks = torch.empty(total, dtype=torch.int32, device=dev)  # tail past off[-1] unused
    _scatter_kernel[grid](idx, tok_boff, off, pos, toks, total, nb, H=h, K=kc, BLOCK=block)
    return off, toks


def dkv_schedule(off: torch.Tensor, split: int, method: Optional[str] = None):
    """Launch order of the dk/dv programs (flat head * nb + block ids, CONFIG["dkv_order"]) and,
    with ``split``, the inclusive count of each list's segments after its first, in that order
    (None without a split)."""
    method = method or CONFIG["dkv_order"]
    lens = off[1:] - off[:-1]
    if method == "index":
        order = torch.arange(lens.numel(), device=off.device, dtype=torch.int32)
    elif method == "longest":
        lens, order = torch.sort(lens, descending=True)
        order = order.to(torch.int32)
    else:
        raise ValueError(f"CONFIG['dkv_order'] = {method!r}: expected longest or index")
    if not split:
        return order, None
    return order, torch.cumsum((lens - 1).clamp_(min=0) // split, 0, dtype=torch.int32)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, block_size, cu_seqlens, scale):
        b, t, hq, d = q.shape
        h = k.shape[2]
        g = hq // h
        kc = indices.shape[-1]
        offs = doc_offsets(b, t, cu_seqlens)
        qf = q.reshape(b * t, hq, d).contiguous()
        kf = k.reshape(b * t, h, d).contiguous()
        vf = v.reshape(b * t, h, d).contiguous()
        idx = indices.reshape(b * t, h, kc).to(torch.int32).contiguous()
        o, lse = forward(qf, kf, vf, idx, offs, block_size, scale)
        ctx.save_for_backward(qf, kf, vf, idx, o, lse)
        ctx.meta = (b, t, hq, h, d, g, kc, offs, block_size, scale)
        return o.view(b, t, hq, d)

    @staticmethod
    def backward(ctx, do):
        qf, kf, vf, idx, o, lse = ctx.saved_tensors
        b, t, hq, h, d, g, kc, offs, bs, scale = ctx.meta
        dof = do.reshape(b * t, hq, d).contiguous()
        plan, join = False, None  # False: backward_dkv makes the plan itself
        if qf.is_cuda and CONFIG["overlap_invert"]:
            plan, join = _dkv_plan_beside(idx, offs, bs)
        dq, delta = backward_dq(qf, kf, vf, idx, o, dof, lse, offs, bs, scale)
        if join is not None:
            join()
        dk, dv = backward_dkv(qf, kf, vf, idx, dof, lse, delta, offs, bs, scale, plan)
        return (dq.view(b, t, hq, d), dk.view(b, t, h, d), dv.view(b, t, h, d),
                None, None, None, None)


def query_launch(qf, idx, offs, bs):
    """Grid, tile tensors and constexprs shared by the query-centric kernels (forward, dq)."""
    n, hq, d = qf.shape
    h, kc = idx.shape[1], idx.shape[2]
    g = hq // h
    bt = tile_tokens(g, bs)
    bd = max(16, next_pow2(d))
    tok, dstart, dlen, _ = tiles(offs, bt, bs, qf.device)
    consts = dict(HQ=hq, H=h, D=d, G=g, K=kc, BS=bs, BT=bt, GP=next_pow2(g), BD=bd,
                  NS=_slots(bt, bs, kc, bd))
    return (tok.shape[0], h), (tok, dstart, dlen), consts, bd


def tma_ok(h, bs, *tensors):
    """CONFIG "tma" is on and the TMA kernels apply to ``tensors`` (q first, then k, v, dO as
    [N, heads, D]): an NVIDIA GPU of compute capability 9 or newer (or the interpreter), G a
    power of two >= 16, D and the block size powers of two in [16, 256] (tensor-core and TMA
    box sizes), contiguous tensors on 16-byte aligned addresses (TMA descriptors), some tokens.
    Anything else keeps the gather kernels."""
    qf = tensors[0]
    n, hq, d = qf.shape
    g = hq // h
    pow2 = lambda x: 16 <= x <= 256 and x == next_pow2(x)  # noqa: E731
    if not head_dim_config(d).get("tma") or g < 16 or g != next_pow2(g) or not pow2(d) \
            or not pow2(bs) or n == 0:
        return False
    if any(not x.is_contiguous() or x.data_ptr() % 16 for x in tensors):
        return False
    if qf.is_cuda:
        return torch.version.hip is None and torch.cuda.get_device_capability(qf.device)[0] >= 9
    return True


def tma_launch(idx, offs, bs, *tensors):
    """(grid, doc start per token, constexprs, launch keywords) where the TMA forward / dq
    apply to ``tensors`` (``tma_ok``), else None."""
    n, hq, d = tensors[0].shape
    h, kc = idx.shape[1], idx.shape[2]
    g = hq // h
    c = head_dim_config(d)
    if not tma_ok(h, bs, *tensors):
        return None
    _, dstart, _, _ = tiles(offs, 1, bs, tensors[0].device)
    step = max(1, int(c["tma_step"]))
    pair = int(bool(c["tma_pair"])) if step % 2 == 0 else 0
    consts = dict(HQ=hq, H=h, D=d, G=g, K=kc, BS=bs, STEP=step, PAIR=pair)
    opts = dict(num_warps=c["tma_warps"], **compile_options(c["tma_stages"], 0))
    return (n, h), dstart, consts, opts


def tma_descriptors(bs, g, d, **tensors):
    """TMA descriptors: K/V-like [N, H, D] tensors as [N, H * D] with [bs, D] boxes, Q-like
    [N, HQ, D] ones as [N * HQ, D] with [G, D] boxes."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    out = {}
    for name, x in tensors.items():
        if name in ("k", "v"):
            out[name] = TensorDescriptor.from_tensor(x.view(x.shape[0], -1), [bs, d])
        else:
            out[name] = TensorDescriptor.from_tensor(x.view(-1, d), [g, d])
    return out


def forward(qf, kf, vf, idx, offs, bs, scale):
    """Output [N, HQ, D] and log2-sum-exp [N, HQ] (fp32) over each row's selected keys."""
    o = torch.empty_like(qf)
    lse = torch.empty(qf.shape[:2], dtype=torch.float32, device=qf.device)
    tma = tma_launch(idx, offs, bs, qf, kf, vf)
    if tma is not None:
        grid, dstart, consts, opts = tma
        desc = tma_descriptors(bs, consts["G"], consts["D"], q=qf, k=kf, v=vf)
        _fwd_tma_kernel[grid](desc["q"], desc["k"], desc["v"], idx, o, lse, dstart,
                              scale * LOG2E, **consts, **opts)
        return o, lse
    grid, tile_args, consts, bd = query_launch(qf, idx, offs, bs)
    if grid[0]:
        _fwd_kernel[grid](qf, kf, vf, idx, o, lse, *tile_args, scale * LOG2E, **consts,
                          **launch_options(bd, "fwd"))
    return o, lse




def backward_dq(qf, kf, vf, idx, o, dof, lse, offs, bs, scale):
    """dq and delta = rowsum(dO * O) (query-centric, one pass over the selected blocks)."""
    dq = torch.empty_like(qf)
    delta = torch.empty(qf.shape[:2], dtype=torch.float32, device=qf.device)
    tma = tma_launch(idx, offs, bs, qf, kf, vf, dof)
    if tma is not None:
        grid, dstart, consts, opts = tma
        desc = tma_descriptors(bs, consts["G"], consts["D"], q=qf, k=kf, v=vf, do=dof)
        _bwd_dq_tma_kernel[grid](desc["q"], desc["k"], desc["v"], desc["do"], idx, o, lse,
                                 delta, dq, dstart, scale * LOG2E, scale, **consts, **opts)
        return dq, delta
    grid, tile_args, consts, bd = query_launch(qf, idx, offs, bs)
    if grid[0]:
        _bwd_dq_kernel[grid](qf, kf, vf, idx, o, dof, lse, delta, dq, *tile_args, scale * LOG2E,
                             scale, **consts, **launch_options(bd, "dq"))
    return dq, delta


def _dkv_plan(idx, offs, bs, device, blocks=None):
    """What the dk/dv pass needs from the selection alone: key blocks (``key_blocks``, unless
    given), the inverted lists, the launch order and the list split (None when there is no key
    block)."""
    bstart, blen, nb, tok_boff = blocks or key_blocks(offs, bs, device)
    if not nb:
        return None
    split = int(CONFIG["dkv_split"] or 0)
    if split < 0:
        raise ValueError(f"CONFIG['dkv_split'] = {split}: expected 0 (never split) or the most "
                         "list entries per dk/dv program, e.g. 512")
    if split and max(b - a for a, b in zip(offs, offs[1:])) <= split:
        # a token selects a block once, so a list has at most its document's length: speed
        # only (a repeated index would make a longer list, still summed correctly)
        split = 0
    off, ltok = invert_selection(idx, tok_boff, nb)
    order, extra_end = dkv_schedule(off, split)
    return bstart, blen, nb, off, ltok, order, extra_end, split


@lru_cache(maxsize=None)
def _side_stream(device) -> "torch.cuda.Stream":
    # high priority: its few blocks go ahead of the dq pass's queued ones, not after them
    return torch.cuda.Stream(device, priority=-1)


def _dkv_plan_beside(idx, offs, bs):
    """``_dkv_plan`` queued on a side CUDA stream, so the list inversion runs while the dq pass
    does; returns (plan, join): call join() after queueing dq, before using the plan."""
    main = torch.cuda.current_stream(idx.device)
    side = _side_stream(idx.device)
    blocks = key_blocks(offs, bs, idx.device)  # cached across calls: made on the main stream
    side.wait_stream(main)
    with torch.cuda.stream(side):
        plan = _dkv_plan(idx, offs, bs, idx.device, blocks)

    def join():
        main.wait_stream(side)
        for x in plan or ():
            if isinstance(x, torch.Tensor):  # made on the side stream, used on this one
                x.record_stream(main)
    return plan, join


def backward_dkv(qf, kf, vf, idx, dof, lse, delta, offs, bs, scale, plan=False):
    """dk, dv (key-centric over the inverted selection lists; ``plan``: ``_dkv_plan``'s result
    when it was made beforehand)."""
    n, hq, d = qf.shape
    h = idx.shape[1]
    g = hq // h
    gp = next_pow2(g)
    bd = max(16, next_pow2(d))
    dk = torch.empty_like(kf)
    dv = torch.empty_like(vf)
    if plan is False:
        plan = _dkv_plan(idx, offs, bs, qf.device)
    if plan is None:
        return dk.zero_(), dv.zero_()
    bstart, blen, nb, off, ltok, order, extra_end, split = plan
    be = max(1, head_dim_config(bd)["dkv_rows"] // gp)
    nw = nb * h
    args = (qf, kf, vf, dof, lse, delta, dk, dv, bstart, blen, off, ltok, order)
    consts = dict(HQ=hq, H=h, D=d, G=g, BS=bs, BE=be, GP=gp, BD=bd, SPLIT=split,
                  **launch_options(bd, "dkv"))
    if split:
        most = idx.numel() // split  # segments after the first ones: at most entries / split
        partial = torch.empty(max(most, 1), 2, bs, bd, dtype=torch.float32, device=qf.device)
        if most:
            _bwd_dkv_kernel[(most,)](*args, extra_end, partial, scale * LOG2E, scale, nb, nw,
                                     max(1, nw.bit_length()), EXTRAS=True, **consts)
    else:
        extra_end = partial = off  # placeholders: the kernel reads neither without a split
    _bwd_dkv_kernel[(nw,)](*args, extra_end, partial, scale * LOG2E, scale, nb, nw, 1,
                           EXTRAS=False, **consts)
    return dk, dv


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     block_size: int, cu_seqlens: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Triton twin of ``reference.sparse_attention`` (differentiable in q, k, v)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2] \
            or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "expected q [B, T, G*H, D] and k, v [B, T, H, D]")
    if indices.shape[:3] != k.shape[:3]:
        raise ValueError(f"indices {tuple(indices.shape)} must be [B, T, H, K] for k {tuple(k.shape)}")
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _SparseAttention.apply(q, k, v, indices, int(block_size), cu_seqlens, scale)

