"""Fused SSA block selection in Triton (spec: ``reference.select_blocks``).

One program scores ``BT`` consecutive tokens of one document against all complete past blocks
of one kv head. The tile's rows are the ``BT x G`` (token, query head) pairs, so the pooled keys
read by a program serve every head of the group and several tokens (G < 16 puts more tokens in a
tile). Two passes over the pooled keys:

1. per-row online max / sum of ``exp(q . Kbar * scale)`` over blocks b < (t + 1) // bs;
2. probabilities, summed over the G heads of each token, merged into an exact running top-(K-1)
   kept in registers as packed int64 keys ``(float bits of score) << 20 | (2^20 - 1 - block)``
   (or int32 keys, ``CONFIG["keys"]``): larger score first, then the smaller block index (the
   reference's stable-sort tie rule). Merge strategies: ``CONFIG["merge"]`` (see there).

Slot 0 is the current block. Nothing of size [T, T / bs] is ever written to memory; the only
extra buffer is the mean-pooled keys [blocks, H, D] (fp32).

The ``subN`` scores (``reference.sub_block_logits``) run the same two passes over the means of N
equal sub-blocks of each complete block ([blocks * N, H, D]): pass 1's softmax is over the
sub-blocks, and pass 2 sums each block's N probabilities before the group sum and the merge.

Plain pointer arithmetic only (runs under Triton 3.6 on GPU and 3.9's CPU interpreter).
"""
from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ssa_megatron.ops import reference

LOG2E = 1.4426950408889634  # the kernels use exp2
_IDX_BITS = 20  # block index bits in a packed int64 key: up to ~1M blocks per document
_IDX_BITS_32 = 12  # int32 keys up to 4096 blocks per document: >= 11 significant score bits

# launch parameters (swept with tools/bench_kernel_variants.py; the measurements behind each value
# are in docs/KERNEL_NOTES.md)
# "merge": how pass 2 keeps the exact running top-(K-1):
#   "insert": data-dependent while loop, one max-extraction + replacement per inserted block,
#             then a (K-1)-step extraction sort at the end (v2);
#   "sort":   the running list kept sorted in a [BT, KB] register tensor. Per chunk, n = most
#             keys any token of the tile has above its (K-1)-th kept key (a uniform branch):
#             n == 0 skips the chunk; n <= "sort_fast" extracts that many best keys per token
#             into an ascending segment; else tl.sort sorts the chunk (ascending KB-segments).
#             Each segment joins the list by a half-cleaner max(list, segment) + log2(KB)
#             compare-exchange stages (bitonic merge). No while loop, no final sort.
#   "extract": as "sort", but the small-n branch extracts exactly min(n, K-1) keys (a run-time
#             loop) and the chunk sort runs only when n > "sort_fast" (>= bn: never).
# All give bit-identical indices; "sort" is faster than "insert" and "extract" faster than "sort"
# (docs/KERNEL_NOTES.md v3-v5).
# "bn_stats": pass 1's entries per step (0: "bn"); pass 1 has no merge, so it may step wider
# (64: 4-8 % faster than "bn" with fp16 operands, 128 slower; docs/KERNEL_NOTES.md, session 23).
# "maxnreg" / "maxnreg_large_d": registers per thread the compiler may use for head dims <= 64 /
# > 64 (0: its own choice). The scoring loop is latency-bound, so more programs per SM pay: at
# D 64 a cap of 96 fits 5 programs of 4 warps per SM instead of 4, without spills (lower caps
# spill at G 8); at D 128 a cap of 128 fit 4 instead of 3 with fp32 operands (v6), and with
# fp16 operands (half the q tile's registers) 96 fits 5 (docs/KERNEL_NOTES.md, session 23).
# "dot_precision": tl.dot's input_precision for the q . Kbar scores of both passes. None is
# Triton's default, TF32 on NVIDIA tensor cores: scores carry ~1e-3 relative error, so rows whose
# K-th and (K+1)-th fp32 scores are that close may pick the other block (docs/KERNEL_NOTES.md).
# "tf32x3" (three TF32 products, about fp32 accuracy) or "ieee" (no tensor cores) narrow that to
# fp32 rounding; the CPU interpreter is fp32 whatever this says (tests/test_selection_precision.py).
# Cost and agreement on a GPU:
# tools/bench_kernel_variants.py --select "default;x3:dot_precision=tf32x3;ieee:dot_precision=ieee".
# "operands": "fp32" scores fp32 q and pooled keys through tl.dot at "dot_precision"; "fp16"
# scales each tile's q and all pooled keys by powers of two into fp16's range and multiplies
# them in fp16 (fp32 accumulation). bf16 q is exact in fp16 and the pooled keys keep 11
# significant bits, as TF32 keeps them, so the scores are as exact as the TF32 default's at
# half the operand bytes and twice the tensor-core rate (docs/KERNEL_NOTES.md, "fp16
# scoring"), except for elements below ~2^-28 of their tile's (q) or the tensor's (keys)
# largest magnitude, which become fp16 subnormals and keep fewer bits (their products are
# that much smaller than the row's largest, so the ranking hardly sees them).
# "auto" (the default): fp16 on a GPU, fp32 under the CPU interpreter or with "dot_precision"
# tf32x3 / ieee.
# "bn_sub": sub-block entries per pass-2 step of the subN scores (0: "bn"'s width; a value set
# here is used at every head dim); more entries per step means fewer, wider merges (64: sub4
# 12-20 % faster than 32, 128 slower at D 128; docs/KERNEL_NOTES.md, session 23).
# "tokens_max": most tokens per tile (0: the block size); a tile holds rows // G tokens up to it.
# "keys": the merge's packed keys. "int64": the score's 32 bits, then 20 bits of block index.
# "int32": the block index in as many bits as the longest document's block count needs (at
# least 8; "key_index_bits" sets it, for tests), the score's bits above them truncated (at most
# 4096 blocks, so >= 11 significant bits: scores closer than that tie and the smaller block
# wins, a near-tie as TF32 scoring makes them); longer documents keep int64. Half the
# registers and compare work in the merge. (A NaN score may equal the list's padding sentinel;
# NaN inputs select garbage with either key width.) "auto" (the default): int32 with fp16
# operands, int64 with fp32 ones (the interpreter's exact tests, tf32x3 / ieee scoring).
CONFIG = {"rows": 64, "bn": 32, "warps": 4, "stages": 2, "merge": "extract", "sort_fast": 8,
          "bn_stats": {"fp16": 64, "fp32": 0}, "maxnreg": 96,
          "maxnreg_large_d": {"fp16": 96, "fp32": 128}, "dot_precision": None,
          "operands": "auto", "bn_sub": {"fp16": 64, "fp32": 0}, "keys": "auto", "tokens_max": 0,
          "key_index_bits": 0}
# "bn_stats", "bn_sub" and "maxnreg_large_d" hold one value per operand type ({"fp16": ...,
# "fp32": ...}: fp16 halves the tiles' registers and shared memory, so it takes wider steps and
# a lower register cap), or one value for both (what a variant sweep sets).
OPERANDS = ("auto", "fp32", "fp16")
KEYS = ("auto", "int64", "int32")
DOT_PRECISIONS = (None, "tf32", "tf32x3", "ieee")
_MERGES = {"insert": 0, "sort": 1, "extract": 2}


def by_operands(name: str, f16: bool):
    """``CONFIG[name]``, or its entry for fp16 / fp32 operands where it holds one per type."""
    value = CONFIG.get(name)
    return value["fp16" if f16 else "fp32"] if isinstance(value, dict) else value


def register_cap(const: dict) -> int:
    """The register cap for a ``launch_constants`` result (0: the compiler's choice)."""
    return CONFIG["maxnreg"] if const["BD"] <= 64 else by_operands("maxnreg_large_d", const["F16"])


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compile_options(stages: int, maxnreg: int) -> dict:
    """Launch keywords for pipelining stages and a register cap (0 or None: the compiler's
    choice); none under the CPU interpreter, which takes neither."""
    if _interpret():
        return {}
    opts = {"num_stages": stages} if stages else {}
    if maxnreg:  # a register cap lets more programs share an SM
        opts["maxnreg"] = maxnreg
    return opts


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())




# --------------------------------------------------------------------------------------------
# Layout helpers shared with the sparse-attention kernels
# --------------------------------------------------------------------------------------------

def doc_offsets(batch: int, seqlen: int, cu_seqlens: Optional[torch.Tensor]) -> Tuple[int, ...]:
    """Document offsets along the flattened token axis [B * T]."""
    if cu_seqlens is None:
        return tuple(i * seqlen for i in range(batch + 1))
    if batch != 1:
        raise ValueError("cu_seqlens needs a packed batch of size 1; flatten the batch first")
    offs = tuple(int(x) for x in cu_seqlens.tolist())
    if offs[0] != 0 or offs[-1] != seqlen or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"cu_seqlens {list(offs)} must rise from 0 to the token count {seqlen}")
    return offs


@lru_cache(maxsize=64)
def _tiles_cpu(offs: Tuple[int, ...], bt: int, bs: int):
    """Per tile of ``bt`` tokens: (first token, doc start, doc length, pooled-block offset)."""
    tok, dstart, dlen, poff = [], [], [], []
    pool = 0
    for a, b in zip(offs, offs[1:]):
        n = b - a
        if n > 0:
            starts = torch.arange(a, b, bt, dtype=torch.int32)
            tok.append(starts)
            dstart.append(torch.full_like(starts, a))
            dlen.append(torch.full_like(starts, n))
            poff.append(torch.full_like(starts, pool))
        pool += n // bs
    if not tok:
        e = torch.zeros(0, dtype=torch.int32)
        return e, e, e, e
    return torch.cat(tok), torch.cat(dstart), torch.cat(dlen), torch.cat(poff)


def tiles(offs: Tuple[int, ...], bt: int, bs: int, device) -> Tuple[torch.Tensor, ...]:
    """The query tiles of the documents ``offs`` on ``device``; kept for the next call with the
    same documents."""
    return _tiles(tuple(offs), bt, bs, str(device))


@lru_cache(maxsize=64)
def _tiles(offs: Tuple[int, ...], bt: int, bs: int, device: str) -> Tuple[torch.Tensor, ...]:
    return tuple(x.to(device) for x in _tiles_cpu(offs, bt, bs))


@lru_cache(maxsize=64)
def _block_starts(offs: Tuple[int, ...], bs: int, device: str) -> torch.Tensor:
    """The first token of each complete block of each document."""
    starts = [torch.arange(a, a + ((b - a) // bs) * bs, bs) for a, b in zip(offs, offs[1:])]
    return (torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)).to(device)


def pooled_keys(kf: torch.Tensor, offs: Tuple[int, ...], bs: int, parts: int = 1) -> torch.Tensor:
    """Mean of each complete block of each document: [sum_d len_d // bs, H, D] fp32; with
    ``parts`` > 1 the means of each complete block's ``parts`` equal sub-blocks, block-major:
    [sum_d len_d // bs * parts, H, D] (a sub-block of an incomplete block has no entry)."""
    n, h, d = kf.shape
    docs = [(a, b) for a, b in zip(offs, offs[1:])]
    lens = {b - a for a, b in docs}
    if len(lens) == 1 and all(a == i * (b - a) for i, (a, b) in enumerate(docs)):
        ln = lens.pop()
        nb = ln // bs
        nd = len(docs)
        x = kf.view(nd, ln, h, d)[:, : nb * bs].reshape(nd, nb * parts, bs // parts, h, d)
        return x.float().mean(dim=2).reshape(nd * nb * parts, h, d)
    starts = _block_starts(tuple(offs), bs, str(kf.device))
    gi = starts[:, None] + torch.arange(bs, device=kf.device)[None, :]
    x = kf[gi].reshape(-1, parts, bs // parts, h, d)
    return x.float().mean(dim=2).reshape(-1, h, d)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _merge_bitonic_desc(x, BT: tl.constexpr, W: tl.constexpr, LOGW: tl.constexpr):
    """[BT, W] rows that are bitonic -> sorted descending (Batcher's merger, log2(W) stages)."""
    j = tl.arange(0, 2)[None, None, :, None]
    for i in tl.static_range(LOGW):
        y = tl.reshape(x, [BT, W // (2 << (LOGW - 1 - i)), 2, 1 << (LOGW - 1 - i)])
        hi = tl.max(y, axis=2)
        lo = tl.min(y, axis=2)
        x = tl.reshape(tl.where(j == 0, hi[:, :, None, :], lo[:, :, None, :]), [BT, W])
    return x


@triton.jit
def _merge_sorted_topk(top, seg, BT: tl.constexpr, KB: tl.constexpr, LOGKB: tl.constexpr):
    """Top KB of ``top`` (sorted descending) and ``seg`` (sorted ascending), sorted descending.

    Half-cleaner: max(top[i], seg[i]) holds exactly the KB largest of the union and is bitonic.
    """
    return _merge_bitonic_desc(tl.maximum(top, seg), BT, KB, LOGKB)


@triton.jit
def _merge_chunk(top, key, NEG: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr,
                 KB: tl.constexpr, LOGKB: tl.constexpr):
    """Running top-KB list ``top`` [BT, KB] (sorted descending) merged with a chunk [BT, BN]."""
    if KB == 1:
        top = tl.maximum(top, tl.max(key, axis=1)[:, None])
    elif BN == 2 * KB:
        # sort both KB-halves ascending (one tl.sort on [BT, 2, KB]), merge them in one by one
        segs = tl.sort(tl.reshape(key, [BT, 2, KB]), dim=2)
        s0, s1 = tl.split(tl.permute(segs, (0, 2, 1)))
        top = _merge_sorted_topk(top, s0, BT, KB, LOGKB)
        top = _merge_sorted_topk(top, s1, BT, KB, LOGKB)
    elif BN >= KB:
        # the chunk's KB largest, ascending: the last KB-segment of the ascending sort
        cs = tl.sort(key, dim=1)
        top = _merge_sorted_topk(top, tl.max(tl.reshape(cs, [BT, BN // KB, KB]), axis=1),
                                 BT, KB, LOGKB)
    else:
        # BN < KB: pad the chunk with empty keys to KB columns
        sub = tl.arange(0, KB // BN)[None, :, None]
        pad = tl.reshape(tl.where(sub == 0, key[:, None, :], NEG), [BT, KB])
        top = _merge_sorted_topk(top, tl.sort(pad, dim=1), BT, KB, LOGKB)
    return top


@triton.jit
def _merge_few(top, key, NEG: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr,
               LOGKB: tl.constexpr, F: tl.constexpr):
    """Merge the chunk's F best keys per token (enough when no token has more than F keys above
    its (K-1)-th kept one): F max-extractions into an ascending [BT, KB] segment, then one
    half-cleaner + bitonic merge."""
    kk = tl.arange(0, KB)[None, :]
    seg = tl.full([BT, KB], NEG, top.dtype)
    for i in tl.static_range(F):
        c = tl.max(key, axis=1)
        seg = tl.where(kk == KB - 1 - i, c[:, None], seg)
        if i < F - 1:
            key = tl.where(key == c[:, None], NEG, key)
    return _merge_sorted_topk(top, seg, BT, KB, LOGKB)


@triton.jit
def _merge_extract(top, key, n, NEG: tl.constexpr, BT: tl.constexpr, KB: tl.constexpr,
                   LOGKB: tl.constexpr):
    """Like ``_merge_few`` with a run-time count: the chunk's ``n`` best keys per token into an
    ascending segment (n max-extractions), then one half-cleaner + bitonic merge."""
    kk = tl.arange(0, KB)[None, :]
    seg = tl.full([BT, KB], NEG, top.dtype)
    for i in range(n):
        c = tl.max(key, axis=1)
        seg = tl.where(kk == KB - 1 - i, c[:, None], seg)
        key = tl.where(key == c[:, None], NEG, key)
    return _merge_sorted_topk(top, seg, BT, KB, LOGKB)


@triton.jit
def score_dot(q, kp, PREC: tl.constexpr):
    """q [R, BD] . kp [BN, BD]^T in fp32; PREC "default" leaves tl.dot its default (TF32 on
    NVIDIA), else it is tl.dot's input_precision."""
    if PREC == "default":
        s = tl.dot(q, tl.trans(kp))
    else:
        s = tl.dot(q, tl.trans(kp), input_precision=PREC)
    return s


@triton.jit
def scaled_score(q, kp, smul, PREC: tl.constexpr, F16: tl.constexpr):
    """The tile's scores in fp32: fp16 operands (F16, both scaled by powers of two) are scaled
    back by ``smul``; fp32 operands go through ``score_dot``."""
    if F16:
        s = tl.dot(q, tl.trans(kp)) * smul
    else:
        s = score_dot(q, kp, PREC)
    return s


@triton.jit
def fp16_operand(x):
    """``x`` (fp32) times the power of two that brings its largest magnitude into
    [2^14, 2^15), in fp16, and that power of two's inverse (exact: only the rounding to fp16's
    11 significant bits is lost, as TF32 loses it)."""
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent of the largest
    e = tl.minimum(tl.maximum(e, 15), 254)  # both powers of two stay normal
    up = ((268 - e) << 23).to(tl.float32, bitcast=True)
    down = ((e - 14) << 23).to(tl.float32, bitcast=True)
    return (x * up).to(tl.float16), down


@triton.jit
def _stats_chunk(q, KP, poff, h, b0, m, lsum, nc_r, nc_max, MASKED: tl.constexpr,
                 H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                 PREC: tl.constexpr = "default", smul=1.0, F16: tl.constexpr = False):
    """One pass-1 step over blocks b0 .. b0+BN-1: the running row max and sum, updated."""
    dd = tl.arange(0, BD)
    b = b0 + tl.arange(0, BN)
    kp_ptr = KP + ((poff + b) * H + h)[:, None] * D + dd[None, :]
    if MASKED:
        kp = tl.load(kp_ptr, mask=(b < nc_max)[:, None] & (dd[None, :] < D), other=0.0)
    elif BD == D:
        kp = tl.load(kp_ptr)
    else:
        kp = tl.load(kp_ptr, mask=dd[None, :] < D, other=0.0)
    s = scaled_score(q, kp, smul, PREC, F16)
    if MASKED:
        s = tl.where(b[None, :] < nc_r[:, None], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    lsum = lsum * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
    return m_new, lsum


@triton.jit
def _row_stats(q, KP, poff, h, nc_r, nc_max, nc_lo, H: tl.constexpr, D: tl.constexpr,
               BD: tl.constexpr, BN: tl.constexpr, R: tl.constexpr, PREC: tl.constexpr = "default",
               smul=1.0, F16: tl.constexpr = False):
    """Pass 1: per row, running max and sum of exp2(q . Kbar') over its blocks (Kbar' = pooled
    keys times scale * log2(e)). Chunks below ``nc_lo`` (every valid row's block count) need
    no masks; the tail does."""
    m = tl.full([R], -1.0e30, tl.float32)
    lsum = tl.zeros([R], tl.float32)
    nc_int = (nc_lo // BN) * BN
    for b0 in range(0, nc_int, BN):
        m, lsum = _stats_chunk(q, KP, poff, h, b0, m, lsum, nc_r, nc_max, False, H, D, BD, BN,
                               PREC, smul, F16)
    for b0 in range(nc_int, nc_max, BN):
        m, lsum = _stats_chunk(q, KP, poff, h, b0, m, lsum, nc_r, nc_max, True, H, D, BD, BN,
                               PREC, smul, F16)
    return m, lsum


@triton.jit
def _select_kernel(
    Q, KP, KSCALE, OUT, TILE_TOK, TILE_DS, TILE_DL, TILE_POFF,
    HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
    BS: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    KB: tl.constexpr, IDX_BITS: tl.constexpr, TOPK: tl.constexpr = True,
    MERGE: tl.constexpr = 0, LOGKB: tl.constexpr = 0, FAST: tl.constexpr = 0,
    BN1: tl.constexpr = 0, PREC: tl.constexpr = "default", NSUB: tl.constexpr = 1,
    F16: tl.constexpr = False, KEY32: tl.constexpr = False,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    tok0 = tl.load(TILE_TOK + pid)
    ds = tl.load(TILE_DS + pid)
    dl = tl.load(TILE_DL + pid)
    poff = tl.load(TILE_POFF + pid).to(tl.int64)

    R: tl.constexpr = BT * GP
    r = tl.arange(0, R)
    rt = r // GP
    rg = r % GP
    tok_r = tok0 + rt
    pos_r = tok_r - ds
    row_ok = (pos_r < dl) & (rg < G)
    nc_r = tl.where(row_ok, (pos_r + 1) // BS, 0)  # blocks in the softmax
    nc_max = tl.max(nc_r, axis=0)

    dd = tl.arange(0, BD)
    q_ptr = Q + (tok_r.to(tl.int64) * HQ + h * G + rg)[:, None] * D + dd[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
    smul = 1.0
    if F16:  # KP holds the pooled keys divided by KSCALE, in fp16
        q, qdown = fp16_operand(q)
        smul = qdown * tl.load(KSCALE)

    # ---- pass 1: running max / sum per row
    bb = tl.arange(0, BN)
    nc_lo = tl.min(tl.where(row_ok, nc_r, nc_max), axis=0)
    # NSUB > 1 (subN scores): KP holds NSUB sub-block means per block, so pass 1 runs over
    # NSUB x the entries and pass 2 sums each block's NSUB probabilities
    m, lsum = _row_stats(q, KP, poff * NSUB, h, nc_r * NSUB, nc_max * NSUB, nc_lo * NSUB, H, D,
                         BD, BN1, R, PREC, smul, F16)
    # p = exp2(s - mlog): mlog = +inf zeroes padding / out-of-document rows, which may share a
    # token's group. Blocks a row must not see (b >= its count) get garbage p, but such blocks
    # are never candidates (b >= (pos + 1) // bs >= pos // bs), so their keys are dropped below.
    mlog = tl.where(row_ok, m + tl.log2(lsum), float("inf"))

    # ---- pass 2: group-summed probabilities, exact running top-(K-1)
    t = tl.arange(0, BT)
    tok_t = tok0 + t
    pos_t = tok_t - ds
    tok_ok = pos_t < dl
    cur_t = pos_t // BS  # candidates: complete blocks b < cur (the current block is forced)
    kk = tl.arange(0, KB)
    MASK: tl.constexpr = (1 << IDX_BITS) - 1
    # keys: int64 (all 32 score bits above the block), or int32 (KEY32: the score's bits above
    # IDX_BITS, truncated, then the block)
    KT: tl.constexpr = tl.int32 if KEY32 else tl.int64
    NEG: tl.constexpr = -(1 << 30) if KEY32 else -(1 << 62)
    # running top-(K-1), unsorted; empty slots hold distinct negatives (-1 - slot) so the minimum
    # is unique, padding slots (>= K-1) a huge value so they are never the minimum
    BIG: tl.constexpr = (1 << 31) - 1 if KEY32 else (1 << 62)  # above every key
    kkk = kk.to(KT) + tl.zeros([BT, KB], KT)
    lst = tl.where(kkk < K - 1, -1 - kkk, BIG)
    # MERGE == 1: the running list sorted descending (empty = NEG); thr = its (K-1)-th key
    top = tl.full([BT, KB], NEG, KT)
    thr1 = tl.full([BT], NEG, KT)
    for b0 in range(0, nc_max, BN):
        b = b0 + bb
        if NSUB == 1:
            kp_ptr = KP + ((poff + b) * H + h)[:, None] * D + dd[None, :]
            kp = tl.load(kp_ptr, mask=(b < nc_max)[:, None] & (dd[None, :] < D), other=0.0)
            s = scaled_score(q, kp, smul, PREC, F16)
            p = tl.exp2(s - mlog[:, None])
            score = tl.sum(tl.reshape(p, [BT, GP, BN]), axis=1)  # [BT, BN]
        else:
            e = b0 * NSUB + tl.arange(0, BN * NSUB)  # sub-block entries of blocks b0 .. b0+BN-1
            kp_ptr = KP + ((poff * NSUB + e) * H + h)[:, None] * D + dd[None, :]
            kp = tl.load(kp_ptr, mask=(e < nc_max * NSUB)[:, None] & (dd[None, :] < D),
                         other=0.0)
            s = scaled_score(q, kp, smul, PREC, F16)
            p = tl.exp2(s - mlog[:, None])
            score = tl.sum(tl.sum(tl.reshape(p, [BT, GP, BN, NSUB]), axis=3), axis=1)
        cand = (b[None, :] < cur_t[:, None]) & tok_ok[:, None]
        if KEY32:  # scores are >= 0: bit 31 stays clear
            bits = (score.to(tl.int32, bitcast=True) >> IDX_BITS) << IDX_BITS
            key = tl.where(cand, bits | (MASK - b[None, :]), NEG)
        else:
            bits = score.to(tl.int32, bitcast=True).to(tl.int64)
            key = tl.where(cand, (bits << IDX_BITS) | (MASK - b[None, :]).to(tl.int64), NEG)
        if MERGE >= 1:
            if K > 1:
                # keys above the (K-1)-th kept one, most over the tile's tokens (uniform branch)
                nh = tl.max(tl.sum((key > thr1[:, None]).to(tl.int32), axis=1), axis=0)
                if not TOPK:  # profiling only: keep the scores alive, skip the merge
                    top = tl.maximum(top, tl.max(key, axis=1)[:, None])
                    nh = 0
                if nh > 0:
                    if MERGE == 2:
                        if nh > FAST:
                            top = _merge_chunk(top, key, NEG, BT, BN, KB, LOGKB)
                        else:
                            top = _merge_extract(top, key, tl.minimum(nh, K - 1), NEG, BT, KB,
                                                 LOGKB)
                    elif FAST >= K - 1:  # the chunk's K-1 best always suffice
                        top = _merge_few(top, key, NEG, BT, KB, LOGKB, FAST)
                    elif nh > FAST:
                        top = _merge_chunk(top, key, NEG, BT, BN, KB, LOGKB)
                    else:
                        top = _merge_few(top, key, NEG, BT, KB, LOGKB, FAST)
                    thr1 = tl.min(tl.where(kk[None, :] < K - 1, top, BIG), axis=1)
        else:
            # insert the chunk's best while it beats the token's current worst kept entry
            thr = tl.min(lst, axis=1)
            cmax = tl.max(key, axis=1)
            if not TOPK:  # profiling only: keep the scores alive, skip the merge
                lst = tl.maximum(lst, cmax[:, None])
                cmax = thr
            while tl.max((cmax > thr).to(tl.int32), axis=0) > 0:
                ins = cmax > thr
                lst = tl.where((lst == thr[:, None]) & ins[:, None], cmax[:, None], lst)
                key = tl.where((key == cmax[:, None]) & ins[:, None], NEG, key)
                thr = tl.min(lst, axis=1)
                cmax = tl.max(key, axis=1)

    if MERGE >= 1:
        lst = top  # already sorted, slot 1 = best
    else:
        # order the kept entries by decreasing score (slot 1 = best)
        srt = tl.full([BT, KB], -1, KT)
        lst = tl.where(kk[None, :] < K - 1, lst, NEG)
        for i in tl.static_range(K - 1):
            best = tl.max(lst, axis=1)
            srt = tl.where(kk[None, :] == i, best[:, None], srt)
            lst = tl.where(lst == best[:, None], NEG, lst)
        lst = srt

    out_t = OUT + (tok_t.to(tl.int64) * H + h) * K
    tl.store(out_t, cur_t.to(tl.int32), mask=tok_ok)
    dec = tl.where(lst < 0, -1, MASK - (lst & MASK)).to(tl.int32)
    tl.store(out_t[:, None] + 1 + kk[None, :], dec, mask=tok_ok[:, None] & (kk[None, :] < K - 1))


@lru_cache(maxsize=8)
def _unit_scale(device: str) -> torch.Tensor:
    """The key scale of fp32 operands (unused by the kernel, but a valid pointer)."""
    return torch.ones(1, dtype=torch.float32, device=device)


def fp16_keys(pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pooled keys divided by the power of two that brings their largest magnitude into
    [2^14, 2^15), in fp16, and that power of two as a one-element fp32 tensor (computed on the
    device: no host synchronisation)."""
    amax = pooled.abs().amax().reshape(1).float() if pooled.numel() else pooled.new_zeros(1)
    e = ((amax.view(torch.int32) >> 23) & 0xFF).clamp(15, 254)  # as the kernel's fp16_operand
    down = ((e - 14) << 23).view(torch.float32)
    return (pooled * ((268 - e) << 23).view(torch.float32)).half().contiguous(), down


def _fast(merge: str, kc: int, kb: int, bn: int) -> int:
    """The FAST constexpr: "sort" extracts that many keys statically (at most K-1); "extract"
    sorts the whole chunk only above it (>= bn: never)."""
    fast = int(CONFIG.get("sort_fast", 4))
    if merge == "extract":
        return min(fast, bn)
    return min(fast, kc - 1, kb)


def launch_constants(hq: int, h: int, d: int, kc: int, block_size: int, parts: int,
                     seqlen: int) -> dict:
    """``_select_kernel``'s constexprs for these heads (q heads, kv heads, head dim of the
    scoring operands), K, block size, sub-blocks per block and the longest document's length
    ``seqlen``, under the current CONFIG."""
    operands = CONFIG.get("operands", "fp32")
    if operands not in OPERANDS:
        raise ValueError(f"CONFIG['operands'] = {operands!r}: expected one of {OPERANDS}")
    prec = CONFIG.get("dot_precision")
    if prec not in DOT_PRECISIONS:
        raise ValueError(f"CONFIG['dot_precision'] = {prec!r}: expected one of {DOT_PRECISIONS}")
    if operands == "auto":  # fp32 where a finer dot precision is asked for, and under the
        # interpreter (its exact-fp32 tests; the fp16 path has its own)
        operands = "fp32" if _interpret() or prec not in (None, "tf32") else "fp16"
    if operands == "fp16" and prec not in (None, "tf32"):
        raise ValueError(f"CONFIG['dot_precision'] = {prec!r} applies to fp32 operands; "
                         "set CONFIG['operands'] = 'fp32' with it")
    merge = CONFIG.get("merge", "insert")
    if merge not in _MERGES:
        raise ValueError(f"CONFIG['merge'] = {merge!r}: expected one of {sorted(_MERGES)}")
    f16 = operands == "fp16"
    g = hq // h
    gp = next_pow2(g)
    bt = min(max(1, CONFIG["rows"] // gp), next_pow2(CONFIG.get("tokens_max") or block_size))
    bd = max(16, next_pow2(d))
    # fp32 operands halve the step above head dim 64 (shared memory); fp16 ones are half the
    # bytes and keep the full step, which is faster at D 128 (docs/KERNEL_NOTES.md, v8)
    bn = CONFIG["bn"] if bd <= 64 or f16 else max(16, CONFIG["bn"] // 2)
    bn1 = next_pow2(by_operands("bn_stats", f16) or bn)
    # subN: pass 2 steps over bn_sub sub-block entries (whole blocks, at least 16 for tl.dot)
    if parts > 1:
        bn = max(next_pow2(by_operands("bn_sub", f16) or bn) // parts, -(-16 // parts), 1)
    kb = max(1, next_pow2(kc - 1))
    keys = CONFIG.get("keys", "int64")
    if keys not in KEYS:
        raise ValueError(f"CONFIG['keys'] = {keys!r}: expected one of {KEYS}")
    if keys == "auto":  # the truncated keys go with the scores that are no finer than them
        keys = "int32" if f16 else "int64"
    # int32 keys give the block index the bits of the longest document's block count (at least
    # 8: few compiled variants); the score keeps the rest, >= 11 significant bits where used
    idx32 = CONFIG.get("key_index_bits") or max(8, (max(1, seqlen // block_size) - 1).bit_length())
    if keys == "int32" and (seqlen // block_size) > (1 << idx32):
        raise ValueError(f"CONFIG['key_index_bits'] = {idx32} is too few for "
                         f"{seqlen // block_size} blocks")
    key32 = keys == "int32" and idx32 <= _IDX_BITS_32
    return dict(HQ=hq, H=h, D=d, G=g, K=kc, BS=block_size, BT=bt, GP=gp, BD=bd, BN=bn, KB=kb,
                IDX_BITS=idx32 if key32 else _IDX_BITS, KEY32=key32, TOPK=CONFIG.get("topk", True),
                MERGE=_MERGES[merge], LOGKB=kb.bit_length() - 1, FAST=_fast(merge, kc, kb, bn), BN1=bn1,
                PREC=prec or "default", NSUB=parts, F16=f16)


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, block_counts: int,
                  cu_seqlens: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None, score: str = "mean") -> torch.Tensor:
    """Triton twin of ``reference.select_blocks``: int32 [B, T, H, block_counts], -1 = empty.
    ``score="moment2"`` runs the same kernel at head dim 2 D on ``reference.moment2_operands``."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)}: expected [B, T, heads, D]")
    b, t, hq, d = q.shape
    h = k.shape[2]
    if hq % h:
        raise ValueError(f"{hq} query heads are not a multiple of {h} kv heads")
    kc = int(block_counts)
    if kc < 1:
        raise ValueError("block_counts must be >= 1")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    offs = doc_offsets(b, t, cu_seqlens)
    qf = q.reshape(b * t, hq, d).contiguous()
    kf = k.reshape(b * t, h, d).contiguous()
    reference.check_score(score)
    parts = max(1, reference.sub_parts(score))
    unfit = reference.sub_parts_error(parts, block_size)
    if unfit:
        raise ValueError(unfit)
    pooled = pooled_keys(kf, offs, block_size, parts)
    if score == "moment2":
        qf, pooled = reference.moment2_operands(
            qf, pooled, pooled_keys(kf.float() * kf.float(), offs, block_size), scale)
        qf, d = qf.contiguous(), 2 * d
    const = launch_constants(hq, h, d, kc, block_size, parts,
                             max((e - a for a, e in zip(offs, offs[1:])), default=0))
    # the softmax scale (and log2 e) goes into the pooled keys
    pooled = (pooled * (scale * LOG2E)).contiguous()
    if pooled.shape[0] == 0:  # no complete block anywhere: keep a valid pointer
        pooled = torch.zeros(1, h, d, dtype=torch.float32, device=q.device)
    if const["F16"]:
        pooled, kscale = fp16_keys(pooled)
    else:
        kscale = _unit_scale(str(q.device))
    out = torch.empty(b * t, h, kc, dtype=torch.int32, device=q.device)
    if b * t == 0:
        return out.view(b, t, h, kc)
    tok, dstart, dlen, poff = tiles(offs, const["BT"], block_size, q.device)
    grid = (tok.shape[0], h)
    _select_kernel[grid](
        qf, pooled, kscale, out, tok, dstart, dlen, poff, **const,
        num_warps=CONFIG["warps"],
        **compile_options(CONFIG["stages"], register_cap(const)),
    )
    return out.view(b, t, h, kc)
