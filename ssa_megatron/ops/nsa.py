"""NSA (Native Sparse Attention) baseline: compression, selection and sliding-window branches.

Same layout and packing rules as :mod:`ssa_megatron.ops.reference`: ``q`` [B, T, HQ, D], ``k``/``v``
[B, T, H, D] (query head h uses kv head h // G), ``cu_seqlens`` packs documents along T with B == 1;
every branch stays inside a document and counts blocks from the document's first token.

1. **Compression.** Block b of a document (tokens [b * bs, (b + 1) * bs), stride bs) is
   represented by the mean of its keys K̄_b and the mean of its values V̄_b. Token t attends,
   causally, over the *complete* past blocks b < (t + 1) // bs:
   ``p_h(b) = softmax_b(q_{t,h} . K̄_b * scale)``, ``O_cmp = Σ_b p_h(b) V̄_b``, differentiable in
   q, k and v (through the pooling). Convention: a token that has no complete block yet
   (the first bs - 1 tokens of each document) gets a **zero** output and all-zero probabilities
   from this branch (and no gradient through it).
2. **Selection.** The block importance is the compression probability summed over the G query
   heads of a kv group: exactly the score of SSA's selection (reference.select_blocks computes
   ``softmax_b(q . K̄_b * scale)`` over the same complete past blocks), so the selection branch
   *is* SSA's sparse branch: top-``block_counts`` blocks, the current block forced, then
   block-sparse causal attention (reference/Triton kernels through ``ops.dispatch``). Indices are
   not differentiated. (The NSA paper additionally pools with an MLP over overlapping blocks and
   always keeps the first block; this baseline uses mean pooling, block = stride.)
3. **Sliding window.** Token t attends causally to the ``window`` most recent tokens of its
   document, itself included: keys j with t - window < j <= t.

Each branch is gated per query head and token by its own sigmoid gate and the three are summed
(``gates`` [B, T, HQ, 3] in the order compression, selection, window).

Two implementations of the dense parts (compression and window), with identical masks:
``impl="reference"`` (fp32 einsum + softmax, returns probabilities; the spec) and ``impl="sdpa"``
(torch SDPA with boolean masks; flash-free but memory-efficient on GPU, used on CUDA). The
window runs in query chunks of ``max(window, 64)`` tokens over a key span of chunk + window - 1,
so its cost is O(T * window), not O(T^2).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ssa_megatron.ops import dispatch
from ssa_megatron.ops import reference as ref

_CHUNK = 1024  # queries per step of the reference compression attention (bounds memory)
BRANCHES = ("compression", "selection", "window")  # gate order per head (paper's g_proj)


def _impl(q: torch.Tensor, impl: Optional[str]) -> str:
    if impl is not None:
        if impl not in ("reference", "sdpa"):
            raise ValueError(f"unknown NSA implementation {impl!r}; use reference or sdpa")
        return impl
    backend = dispatch.get_backend()
    return "sdpa" if backend == "triton" or (backend == "auto" and q.is_cuda) else "reference"


def _doc_ids(t: int, cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    doc = torch.zeros(t, dtype=torch.long, device=device)
    if cu_seqlens is not None and len(cu_seqlens) > 2:
        inner = cu_seqlens[1:-1].long().to(device)
        doc.index_add_(0, inner[inner < t], torch.ones_like(inner[inner < t]))
        doc = doc.cumsum(0)
    return doc


def _attend(q, k, v, mask, scale, impl, want_probs=False):
    """Masked softmax attention. q [N, HQ, Lq, D], k/v [N, H, Lk, D] (GQA), mask [N|1, 1, Lq, Lk]
    (every row must allow at least one key). Returns (o [N, HQ, Lq, D] fp32|q dtype, probs|None)."""
    n, hq, lq, d = q.shape
    h = k.shape[1]
    g = hq // h
    if impl == "sdpa":
        kk = k.to(q.dtype).repeat_interleave(g, dim=1) if g > 1 else k.to(q.dtype)
        vv = v.to(q.dtype).repeat_interleave(g, dim=1) if g > 1 else v.to(q.dtype)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale), None
    qg = q.float().reshape(n, h, g, lq, d)
    logits = torch.einsum("nhgqd,nhkd->nhgqk", qg, k.float()) * scale
    logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    o = torch.einsum("nhgqk,nhkd->nhgqd", probs, v.float()).reshape(n, hq, lq, d)
    return o, (probs.reshape(n, hq, lq, -1) if want_probs else None)


def pooled_blocks(k: torch.Tensor, v: torch.Tensor, block_size: int,
                  cu_seqlens: Optional[torch.Tensor] = None):
    """Mean-pooled keys/values of every complete block (per document when packed).

    Returns ``(k̄, v̄, block_doc, block_local)``: k̄/v̄ [B, N, H, D] fp32 (differentiable),
    and for each of the N blocks its document id and its index within that document.
    """
    b, t = k.shape[0], k.shape[1]
    if cu_seqlens is None:
        nb = t // block_size
        idx = torch.arange(nb, device=k.device)
        return (ref.mean_pool_blocks(k, block_size), ref.mean_pool_blocks(v, block_size),
                torch.zeros_like(idx), idx)
    segs = ref.segments(t, cu_seqlens, b)
    pk, pv, docs, local = [], [], [], []
    doc_of = _doc_ids(t, cu_seqlens, k.device)
    for start, end in segs:
        nb = (end - start) // block_size
        if nb:
            pk.append(ref.mean_pool_blocks(k[:, start:end], block_size))
            pv.append(ref.mean_pool_blocks(v[:, start:end], block_size))
            docs.append(doc_of[start].expand(nb))
            local.append(torch.arange(nb, device=k.device))
    if not pk:
        empty = k.new_zeros(b, 0, k.shape[2], k.shape[3], dtype=torch.float32)
        none = torch.zeros(0, dtype=torch.long, device=k.device)
        return empty, empty.clone(), none, none
    return torch.cat(pk, 1), torch.cat(pv, 1), torch.cat(docs), torch.cat(local)


def compression_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                          cu_seqlens: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                          impl: Optional[str] = None, return_probs: bool = False):
    """Branch 1: causal attention over mean-pooled keys/values of complete past blocks.

    Returns O_cmp [B, T, HQ, D] (q's dtype); with ``return_probs`` (reference only) also the
    per-head probabilities [B, T, HQ, max blocks per document], indexed by the block's position
    in its document (zeros where a block is not visible).
    """
    ref._check_shapes(q, k, v)
    impl = _impl(q, impl)
    if return_probs and impl != "reference":
        raise ValueError("compression probabilities come from impl='reference' only")
    b, t, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ref.segments(t, cu_seqlens, b)  # validates
    pk, pv, bdoc, blocal = pooled_blocks(k, v, block_size, cu_seqlens)
    nblocks = pk.shape[1]
    max_local = int(blocal.max()) + 1 if nblocks else 0
    doc = _doc_ids(t, cu_seqlens, q.device)
    starts = torch.zeros(t, dtype=torch.long, device=q.device)
    if cu_seqlens is not None:
        starts = cu_seqlens.long().to(q.device)[doc]
    n_complete = (torch.arange(t, device=q.device) - starts + 1) // block_size  # per token
    probs_out = q.new_zeros(b, t, hq, max_local, dtype=torch.float32) if return_probs else None
    if nblocks == 0:
        out = q.new_zeros(b, t, hq, d)
        return (out, probs_out) if return_probs else out
    kh, vh = pk.transpose(1, 2), pv.transpose(1, 2)  # [B, H, N, D]
    outs = []
    step = t if impl == "sdpa" else _CHUNK
    for c0 in range(0, t, step):
        c1 = min(c0 + step, t)
        visible = (bdoc[None, :] == doc[c0:c1, None]) & (blocal[None, :] < n_complete[c0:c1, None])
        has = visible.any(-1)
        # rows with no complete block: let them see everything, then zero their output (and so
        # their gradient); keeps the softmax finite
        mask = (visible | ~has[:, None])[None, None]
        o, p = _attend(q[:, c0:c1].transpose(1, 2), kh, vh, mask, scale, impl, return_probs)
        o = o.transpose(1, 2) * has[None, :, None, None].to(o.dtype)
        outs.append(o.to(q.dtype))
        if return_probs:
            p = p.transpose(1, 2) * visible[None, :, None, :]  # [B, tc, HQ, N]
            probs_out[:, c0:c1].index_add_(3, blocal, p)  # other documents' blocks add zeros
    out = torch.cat(outs, dim=1)
    return (out, probs_out) if return_probs else out


def selection_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int,
                        block_counts: int, cu_seqlens: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None, impl: Optional[str] = None) -> torch.Tensor:
    """Branch 2: SSA's sparse branch (top-k of the group-summed compression probabilities,
    current block forced, block-sparse attention). ``impl="reference"`` forces the reference
    kernels; otherwise ``ops.dispatch`` picks (Triton on CUDA)."""
    ops = ref if impl == "reference" else dispatch
    with torch.no_grad():
        indices = ops.select_blocks(q.detach(), k.detach(), block_size, block_counts,
                                    cu_seqlens=cu_seqlens, scale=scale)
    return ops.sparse_attention(q, k, v, indices, block_size, cu_seqlens=cu_seqlens, scale=scale)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             cu_seqlens: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None, impl: Optional[str] = None,
                             chunk: Optional[int] = None) -> torch.Tensor:
    """Branch 3: causal attention over keys t - window < j <= t of the same document."""
    ref._check_shapes(q, k, v)
    if window < 1:
        raise ValueError(f"window {window} must be a positive number of tokens")
    impl = _impl(q, impl)
    b, t, hq, d = q.shape
    h = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ref.segments(t, cu_seqlens, b)  # validates
    w = min(window, t)
    c = min(chunk or max(w, 64), t)
    nc = (t + c - 1) // c
    span = c + w - 1
    pad_back = nc * c - t
    # keys/values padded so chunk i sees absolute positions [i*c - (w-1), i*c + c)
    kp = F.pad(k, (0, 0, 0, 0, w - 1, pad_back))
    vp = F.pad(v, (0, 0, 0, 0, w - 1, pad_back))
    kc = kp.unfold(1, span, c)  # [B, nc, H, D, span]
    vc = vp.unfold(1, span, c)
    kc = kc.permute(0, 1, 2, 4, 3).reshape(b * nc, h, span, d)
    vc = vc.permute(0, 1, 2, 4, 3).reshape(b * nc, h, span, d)
    qc = F.pad(q, (0, 0, 0, 0, 0, pad_back)).reshape(b, nc, c, hq, d)
    qc = qc.permute(0, 1, 3, 2, 4).reshape(b * nc, hq, c, d)
    # mask [nc, c, span]
    qpos = torch.arange(nc * c, device=q.device).view(nc, c, 1)
    kpos = (torch.arange(nc, device=q.device).view(nc, 1, 1) * c - (w - 1)
            + torch.arange(span, device=q.device).view(1, 1, span))
    mask = (kpos <= qpos) & (kpos > qpos - w) & (kpos >= 0)
    if cu_seqlens is not None:
        doc = _doc_ids(t, cu_seqlens, q.device)
        doc = F.pad(doc, (0, pad_back), value=-1)  # padded queries see only padded keys
        dk = torch.cat([doc.new_full((w - 1,), -2), doc])  # keys before 0: no document
        dk = dk.unfold(0, span, c)  # [nc, span]
        mask &= doc.view(nc, c, 1) == dk.view(nc, 1, span)
    mask = mask.unsqueeze(0).expand(b, nc, c, span).reshape(b * nc, 1, c, span)
    o, _ = _attend(qc, kc, vc, mask, scale, impl)
    o = o.reshape(b, nc, hq, c, d).permute(0, 1, 3, 2, 4).reshape(b, nc * c, hq, d)
    return o[:, :t].to(q.dtype)


def nsa_branches(q, k, v, block_size: int = 16, block_counts: int = 16, window: int = 128,
                 cu_seqlens=None, scale=None, impl: Optional[str] = None) -> Tuple[torch.Tensor, ...]:
    """The three ungated branch outputs (compression, selection, window), each [B, T, HQ, D]."""
    return (compression_attention(q, k, v, block_size, cu_seqlens, scale, impl),
            selection_attention(q, k, v, block_size, block_counts, cu_seqlens, scale, impl),
            sliding_window_attention(q, k, v, window, cu_seqlens, scale, impl))


def nsa_attention(q, k, v, gates: Optional[torch.Tensor], block_size: int = 16,
                  block_counts: int = 16, window: int = 128, cu_seqlens=None, scale=None,
                  impl: Optional[str] = None) -> torch.Tensor:
    """Σ_i gates[..., i] * branch_i over (compression, selection, window); gates [B, T, HQ, 3]
    (sigmoid already applied) or None for an ungated sum. Returns q's dtype."""
    outs = nsa_branches(q, k, v, block_size, block_counts, window, cu_seqlens, scale, impl)
    if gates is None:
        return outs[0] + outs[1] + outs[2]
    if gates.shape != (*q.shape[:3], 3):
        raise ValueError(f"gates {tuple(gates.shape)} must be [B, T, HQ, 3] for q {tuple(q.shape)}")
    g = gates.to(q.dtype)
    return outs[0] * g[..., 0:1] + outs[1] * g[..., 1:2] + outs[2] * g[..., 2:3]


__all__ = ["BRANCHES", "pooled_blocks", "compression_attention", "selection_attention",
           "sliding_window_attention", "nsa_branches", "nsa_attention"]
