"""Block-major SSA sparse attention for small query groups (spec: ``reference.sparse_attention``).

The gather kernels of :mod:`ssa_megatron.ops.triton_sparse_attention` are query-major: a program
holds a token's G query heads and loads that token's 16 selected K/V blocks. With G < 16 every
selected block is read once per (token, kv head) for only G rows, and a 16-row tensor-core tile
holds 16 / G tokens whose blocks differ (masked, redundant MMA work). Here the loop is turned
around:

1. **Lists** (inverted selection). Each valid selection entry e = (token, kv head, slot) is
   filed under its (kv head, key block); a counting sort gives, per list, the entry ids
   (CSR: ``off`` [H * nb + 1], ``ent``). Entries of empty slots (-1) and of blocks that start
   after the token are dropped (they hold no key the token may see).
2. **Partials.** A program takes one (kv head, key block) and up to ``BE`` entries of its list:
   rows = BE tokens x G query heads, the block's [bs, D] keys and values loaded once. It writes,
   per row, the block-local softmax output ``o_e`` (normalised by its own sum) and its
   log2-sum-exp ``l_e``. Causality inside the current block and document ends are masked as
   the gather kernels do (keys of the block with position <= token, block cut at its document's
   end). Long lists (sink blocks) are simply more programs.
3. **Merge.** A program per (tokens, kv head) combines the <= K partials of each (token, q head)
   row: LSE = log2 sum_e 2^l_e, o = sum_e 2^(l_e - LSE) o_e, written in the gather forward's
   layout (o [N, HQ, D], LSE [N, HQ], log2 units of scale * log2(e)), so the existing dq and
   dk/dv kernels are the backward.

Partials are kept in the input dtype (``CONFIG["partial_dtype"]``): each is a convex
combination of value rows, so bf16 adds one rounding of the final output's size.

Plain pointer arithmetic only (Triton 3.6 on GPU, 3.9 CPU interpreter).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ssa_megatron.ops import triton_sparse_attention as gather_kernels
from ssa_megatron.ops.triton_sparse_attention import load_key_block, owning_list
from ssa_megatron.ops.triton_selection import (LOG2E, next_pow2, compile_options, doc_offsets,
                                                tiles)

# Launch parameters (not yet swept on a GPU).
#   rows: tile rows of the partial kernel (entries per program = rows // next_pow2(G), >= 1);
#   merge_rows: rows (tokens x padded G) of the merge kernel;
#   partial_dtype: None = the input's dtype, or "float32";
#   evict: cache hints: q rows kept in L2 (evict_last), partials streamed (evict_first);
#   sparse_forward: which forward ``dispatch.sparse_attention`` runs on the Triton backend:
#     "gather" (the query-major kernels), "block_major" (this module) or "auto" (block-major
#     when G < 16). Stays "gather" until GPU timings exist.
CONFIG = {"rows": 64, "warps": 4, "stages": 2, "merge_rows": 64, "merge_warps": 4,
          "partial_dtype": None, "evict": False, "sparse_forward": "gather"}
SPARSE_FORWARDS = ("gather", "block_major", "auto")


def use_block_major(group: int) -> bool:
    """Whether ``dispatch.sparse_attention`` should run this module's forward for G = group."""
    mode = CONFIG["sparse_forward"]
    if mode not in SPARSE_FORWARDS:
        raise ValueError(f"triton_block_major.CONFIG['sparse_forward'] = {mode!r}: expected one "
                         f"of {', '.join(SPARSE_FORWARDS)}")
    return mode == "block_major" or (mode == "auto" and group < 16)


# --------------------------------------------------------------------------------------------
# 1. Lists: (kv head, key block) -> selection entries, by counting sort
# --------------------------------------------------------------------------------------------

@triton.jit
def _entry_keys(IDX, TOK_DS, TOK_BOFF, total, NB, H: tl.constexpr, K: tl.constexpr,
                BS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's flat [N, H, K] entries: id, whether they name a block the token may see
    (not empty, not starting after the token), and their list (head * NB + global block)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = e < total
    blk = tl.load(IDX + e, mask=in_range, other=-1)
    tok = e // (H * K)
    ds = tl.load(TOK_DS + tok, mask=in_range, other=0)
    valid = in_range & (blk >= 0) & (blk * BS <= tok - ds)
    head = (e // K) % H
    key = head * NB + tl.load(TOK_BOFF + tok, mask=valid, other=0) + blk
    return e, valid, key


@triton.jit
def _count_kernel(IDX, TOK_DS, TOK_BOFF, CNT, POS, total, NB, H: tl.constexpr,
                  K: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr):
    e, valid, key = _entry_keys(IDX, TOK_DS, TOK_BOFF, total, NB, H, K, BS, BLOCK)
    pos = tl.atomic_add(CNT + key, tl.full([BLOCK], 1, tl.int32), mask=valid)
    tl.store(POS + e, pos, mask=valid)


@triton.jit
def _scatter_kernel(IDX, TOK_DS, TOK_BOFF, OFF, POS, ENT, total, NB, H: tl.constexpr,
                    K: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr):
    e, valid, key = _entry_keys(IDX, TOK_DS, TOK_BOFF, total, NB, H, K, BS, BLOCK)
    dst = tl.load(OFF + key, mask=valid, other=0) + tl.load(POS + e, mask=valid, other=0)
    tl.store(ENT + dst, e.to(tl.int32), mask=valid)


def entry_lists(idx: torch.Tensor, offs: Tuple[int, ...], bs: int):
    """Inverted selection of idx [N, H, K] (int32, document-relative blocks, -1 empty):
    (off [H * nb + 1] int32, ent int32 entry ids (token * H + head) * K + slot, listed by
    (head, global key block); the order inside a list varies from run to run and does not
    change any result), plus the key blocks (start [nb], length [nb], nb) and each token's
    document start [N]."""
    n, h, kc = idx.shape
    if n * h * kc >= 2 ** 31:
        raise ValueError(f"{n} tokens x {h} kv heads x {kc} slots do not fit int32 entry ids; "
                         "split the batch")
    bstart, blen, nb, tok_boff = gather_kernels.key_blocks(offs, bs, idx.device)
    _, tok_ds, _, _ = tiles(offs, 1, bs, idx.device)
    cnt = torch.zeros(h * nb, dtype=torch.int32, device=idx.device)
    pos = torch.empty(max(n * h * kc, 1), dtype=torch.int32, device=idx.device)
    ent = torch.empty(max(n * h * kc, 1), dtype=torch.int32, device=idx.device)
    off = torch.zeros(h * nb + 1, dtype=torch.int32, device=idx.device)
    total = n * h * kc
    if total and nb:
        block = 1024
        grid = (triton.cdiv(total, block),)
        _count_kernel[grid](idx, tok_ds, tok_boff, cnt, pos, total, nb, H=h, K=kc, BS=bs,
                            BLOCK=block)
        torch.cumsum(cnt, 0, out=off[1:])
        _scatter_kernel[grid](idx, tok_ds, tok_boff, off, pos, ent, total, nb, H=h, K=kc,
                              BS=bs, BLOCK=block)
    return off, ent, (bstart, blen, nb), tok_ds


# --------------------------------------------------------------------------------------------
# 2. Partials: one (kv head, key block) against up to BE listed (token, slot) entries
# --------------------------------------------------------------------------------------------

@triton.jit
def _partial_kernel(Q, Kt, V, ENT, LIST_OFF, TILE_END, BLK_START, BLK_LEN, PART, PLSE,
                    scale_log2, NB, NL, SEARCH_STEPS,
                    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                    K: tl.constexpr, BS: tl.constexpr, BE: tl.constexpr, GP: tl.constexpr,
                    BD: tl.constexpr, EVICT: tl.constexpr):
    pid = tl.program_id(0)
    if pid >= tl.load(TILE_END + NL - 1):  # the grid is an upper bound on the tile count
        return
    w = owning_list(TILE_END, pid, NL, SEARCH_STEPS)  # the list of this tile
    first = tl.load(TILE_END + w - 1, mask=w > 0, other=0)
    lo = tl.load(LIST_OFF + w) + (pid - first) * BE
    hi = tl.minimum(tl.load(LIST_OFF + w + 1), lo + BE)
    h = w // NB
    gb = w % NB
    dd = tl.arange(0, BD)
    dmask = dd < D
    kt, vt, kpos, kok, _, _ = load_key_block(Kt, V, BLK_START, BLK_LEN, gb, h, dd, dmask, H, D, BS)

    R: tl.constexpr = BE * GP
    r = tl.arange(0, R)
    re = r // GP
    rg = r % GP
    row_ok = (lo + re < hi) & (rg < G)
    ent = tl.load(ENT + lo + re, mask=row_ok, other=0)
    tok = ent // (H * K)
    qrow = (tok.to(tl.int64) * HQ + h * G + rg) * D
    rmask = row_ok[:, None] & dmask[None, :]
    if EVICT:
        q = tl.load(Q + qrow[:, None] + dd[None, :], mask=rmask, other=0.0,
                    eviction_policy="evict_last")
    else:
        q = tl.load(Q + qrow[:, None] + dd[None, :], mask=rmask, other=0.0)

    s = tl.dot(q, tl.trans(kt)) * scale_log2
    ok = row_ok[:, None] & kok[None, :] & (kpos[None, :] <= tok[:, None])
    s = tl.where(ok, s, float("-inf"))
    m = tl.max(s, axis=1)
    m = tl.where(m > float("-inf"), m, 0.0)  # rows without a visible key
    p = tl.exp2(s - m[:, None])
    lsum = tl.sum(p, axis=1)
    o = tl.dot(p.to(vt.dtype), vt) / tl.maximum(lsum, 1.0e-30)[:, None]
    plse = tl.where(lsum > 0.0, m + tl.log2(tl.maximum(lsum, 1.0e-30)), float("-inf"))
    prow = ent.to(tl.int64) * G + rg
    if EVICT:
        tl.store(PART + prow[:, None] * D + dd[None, :], o.to(PART.dtype.element_ty), mask=rmask,
                 eviction_policy="evict_first")
    else:
        tl.store(PART + prow[:, None] * D + dd[None, :], o.to(PART.dtype.element_ty), mask=rmask)
    tl.store(PLSE + prow, plse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# 3. Merge: the <= K partials of each (token, q head) row
# --------------------------------------------------------------------------------------------

@triton.jit
def _merge_kernel(IDX, TOK_DS, PART, PLSE, O, LSE, N,
                  HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                  K: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr,
                  BD: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    R: tl.constexpr = BT * GP
    r = tl.arange(0, R)
    rt = r // GP
    rg = r % GP
    tok = pid * BT + rt
    row_ok = (tok < N) & (rg < G)
    ds = tl.load(TOK_DS + tok, mask=row_ok, other=0)
    dd = tl.arange(0, BD)
    dmask = dd < D
    m = tl.full([R], -1.0e30, tl.float32)
    lsum = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, BD], tl.float32)
    for i in range(K):
        ent = (tok.to(tl.int64) * H + h) * K + i
        blk = tl.load(IDX + ent, mask=row_ok, other=-1)
        ok = row_ok & (blk >= 0) & (blk * BS <= tok - ds)  # as _entry_keys: a listed entry
        prow = ent * G + rg
        x = tl.load(PLSE + prow, mask=ok, other=float("-inf"))
        part = tl.load(PART + prow[:, None] * D + dd[None, :], mask=ok[:, None] & dmask[None, :],
                       other=0.0)
        m_new = tl.maximum(m, x)
        alpha = tl.exp2(m - m_new)
        wgt = tl.exp2(x - m_new)
        lsum = lsum * alpha + wgt
        acc = acc * alpha[:, None] + wgt[:, None] * part.to(tl.float32)
        m = m_new
    lsafe = tl.maximum(lsum, 1.0e-30)
    orow = tok.to(tl.int64) * HQ + h * G + rg
    tl.store(O + orow[:, None] * D + dd[None, :], (acc / lsafe[:, None]).to(O.dtype.element_ty),
             mask=row_ok[:, None] & dmask[None, :])
    tl.store(LSE + orow, m + tl.log2(lsafe), mask=row_ok)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def _partial_dtype(qf: torch.Tensor) -> torch.dtype:
    name = CONFIG["partial_dtype"]
    if name is None:
        return qf.dtype
    if name == "float32":
        return torch.float32
    raise ValueError(f"triton_block_major.CONFIG['partial_dtype'] = {name!r}: expected None "
                     "(the input's dtype) or 'float32'")


def forward_flat(qf: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, idx: torch.Tensor,
                 offs: Tuple[int, ...], bs: int, scale: float):
    """Block-major forward on flat tensors: q [N, HQ, D], k/v [N, H, D], idx [N, H, K] int32,
    document offsets ``offs`` (``doc_offsets``). Returns o [N, HQ, D] and the log2-sum-exp
    [N, HQ] (fp32) in the gather forward's convention (``triton_sparse_attention.forward``)."""
    n, hq, d = qf.shape
    h, kc = idx.shape[1], idx.shape[2]
    g = hq // h
    gp = next_pow2(g)
    bd = max(16, next_pow2(d))
    o = torch.empty_like(qf)
    lse = torch.empty((n, hq), dtype=torch.float32, device=qf.device)
    if n == 0:
        return o, lse
    off, ent, (bstart, blen, nb), tok_ds = entry_lists(idx, offs, bs)
    part = torch.empty((max(n * h * kc, 1), g, d), dtype=_partial_dtype(qf), device=qf.device)
    plse = torch.empty((max(n * h * kc, 1), g), dtype=torch.float32, device=qf.device)
    be = max(1, int(CONFIG["rows"]) // gp)
    nl = h * nb
    if nl:
        tile_end = torch.cumsum((off[1:] - off[:-1] + be - 1) // be, 0, dtype=torch.int32)
        # an upper bound, so no host sync: a list of len entries needs ceil(len / BE) tiles
        grid = (n * h * kc + nl * (be - 1)) // be
        if grid:
            _partial_kernel[(grid,)](
                qf, kf, vf, ent, off, tile_end, bstart, blen, part, plse, scale * LOG2E, nb, nl,
                max(1, nl.bit_length()), HQ=hq, H=h, D=d, G=g, K=kc, BS=bs, BE=be, GP=gp, BD=bd,
                EVICT=bool(CONFIG["evict"]), num_warps=CONFIG["warps"], **compile_options(CONFIG["stages"], 0))
    bt = max(1, int(CONFIG["merge_rows"]) // gp)
    _merge_kernel[(triton.cdiv(n, bt), h)](
        idx, tok_ds, part, plse, o, lse, n, HQ=hq, H=h, D=d, G=g, K=kc, BS=bs, BT=bt, GP=gp,
        BD=bd, num_warps=CONFIG["merge_warps"])
    return o, lse


class _BlockMajorAttention(gather_kernels._SparseAttention):
    """Block-major forward; the backward is the gather kernels' (dq query-major, dk/dv over
    their own per-key-block token lists), which reads the same o and LSE."""

    @staticmethod
    def forward(ctx, q, k, v, indices, block_size, cu_seqlens, scale):
        b, t, hq, d = q.shape
        h = k.shape[2]
        kc = indices.shape[-1]
        offs = doc_offsets(b, t, cu_seqlens)
        qf = q.reshape(b * t, hq, d).contiguous()
        kf = k.reshape(b * t, h, d).contiguous()
        vf = v.reshape(b * t, h, d).contiguous()
        idx = indices.reshape(b * t, h, kc).to(torch.int32).contiguous()
        o, lse = forward_flat(qf, kf, vf, idx, offs, block_size, scale)
        ctx.save_for_backward(qf, kf, vf, idx, o, lse)
        ctx.meta = (b, t, hq, h, d, hq // h, kc, offs, block_size, scale)
        return o.view(b, t, hq, d)


def _check(q, k, v, indices):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2] \
            or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "expected q [B, T, G*H, D] and k, v [B, T, H, D]")
    if indices.shape[:3] != k.shape[:3]:
        raise ValueError(f"indices {tuple(indices.shape)} must be [B, T, H, K] for k {tuple(k.shape)}")


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     block_size: int, cu_seqlens: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Twin of ``reference.sparse_attention`` with the block-major forward (differentiable in
    q, k, v through the gather kernels' backward)."""
    _check(q, k, v, indices)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _BlockMajorAttention.apply(q, k, v, indices, int(block_size), cu_seqlens, scale)


def sparse_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             indices: torch.Tensor, block_size: int,
                             cu_seqlens: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None):
    """Forward only (for benchmarks and prefill): o [B, T, HQ, D] and the log2-sum-exp
    [B, T, HQ] (fp32, log2 units of scale * log2(e) scores) of each row's selected keys."""
    _check(q, k, v, indices)
    b, t, hq, d = q.shape
    h, kc = k.shape[2], indices.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    o, lse = forward_flat(q.reshape(b * t, hq, d).contiguous(), k.reshape(b * t, h, d).contiguous(),
                          v.reshape(b * t, h, d).contiguous(),
                          indices.reshape(b * t, h, kc).to(torch.int32).contiguous(),
                          doc_offsets(b, t, cu_seqlens), int(block_size), scale)
    return o.view(b, t, hq, d), lse.view(b, t, hq)


__all__ = ["CONFIG", "SPARSE_FORWARDS", "use_block_major", "entry_lists", "forward_flat",
           "sparse_attention", "sparse_attention_forward"]
