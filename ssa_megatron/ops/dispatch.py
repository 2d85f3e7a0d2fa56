"""One dispatch point for SSA attention math: Triton kernels on CUDA, the reference elsewhere.

``select_blocks``, ``sparse_attention``, ``sparse_decode_attention``, ``full_attention`` and
``alignment_loss`` take the arguments of their namesakes in :mod:`ssa_megatron.ops.reference`.

Backend switch: environment variable ``SSA_ATTENTION_BACKEND`` = ``auto`` (default: Triton for
CUDA tensors, reference otherwise), ``triton`` (always Triton; on CPU it needs
``TRITON_INTERPRET=1``) or ``reference``; or run the code inside ``with attention_backend(name):``
(which wins over the variable inside the block). The Triton modules are imported only when first
used.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ssa_megatron.ops import reference

_BACKENDS = ("auto", "triton", "reference")
# Process-wide, not a ContextVar: backward (and recomputed forwards) run on autograd's own
# threads, which must see the backend the forward saw. Set only through attention_backend.
_forced_backend = {"name": None}


@contextlib.contextmanager
def attention_backend(name: Optional[str]) -> Iterator[None]:
    """Inside the block, force ``"triton"`` or ``"reference"``; ``"auto"`` or None use the
    environment variable / default. The previous choice comes back on exit, also after an error."""
    if name is not None and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    previous = _forced_backend["name"]
    _forced_backend["name"] = None if name in (None, "auto") else name
    try:
        yield
    finally:
        _forced_backend["name"] = previous


def get_backend() -> str:
    """The configured backend name: auto, triton or reference."""
    forced = _forced_backend["name"]
    if forced is not None:
        return forced
    env = os.environ.get("SSA_ATTENTION_BACKEND", "auto").strip().lower() or "auto"
    if env not in _BACKENDS:
        raise ValueError(f"SSA_ATTENTION_BACKEND={env!r} is not one of {', '.join(_BACKENDS)}")
    return env


def use_triton(t: torch.Tensor, block_size: Optional[int] = None) -> bool:
    name = get_backend()
    if name == "reference":
        return False
    if name == "triton":
        return True
    if not t.is_cuda:
        return False
    # tensor-core tiles need >= 16 key columns per block and power-of-two block sizes
    return block_size is None or (block_size >= 16 and block_size & (block_size - 1) == 0)


def select_blocks(q: torch.Tensor, k: torch.Tensor, block_size: int, block_counts: int,
                  cu_seqlens: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None, score: str = "mean") -> torch.Tensor:
    reference.check_score(score)
    if use_triton(q, block_size):
        from ssa_megatron.ops import triton_selection
        return triton_selection.select_blocks(q, k, block_size, block_counts, cu_seqlens, scale,
                                              score)
    return reference.select_blocks(q, k, block_size, block_counts, cu_seqlens, scale, score)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor,
                     block_size: int, cu_seqlens: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    if use_triton(q, block_size):
        from ssa_megatron.ops import triton_block_major
        if triton_block_major.use_block_major(q.shape[2] // max(1, k.shape[2])):
            return triton_block_major.sparse_attention(q, k, v, indices, block_size, cu_seqlens,
                                                       scale)
        from ssa_megatron.ops import triton_sparse_attention
        return triton_sparse_attention.sparse_attention(q, k, v, indices, block_size, cu_seqlens,
                                                        scale)
    return reference.sparse_attention(q, k, v, indices, block_size, cu_seqlens, scale)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            pooled: torch.Tensor, past: int, block_size: int, block_counts: int,
                            scale: Optional[float] = None,
                            q_select: Optional[torch.Tensor] = None, parts: int = 1) -> torch.Tensor:
    """One new token per sequence (q [B, 1, HQ, D]) takes the three Triton decode kernels where
    they apply (``triton_sparse_decode.supports``); more new tokens (a chunk appended to the
    cache), other shapes and the reference backend take the reference math. ``q_select``: the
    queries the selection scores with, ``parts`` the sub-block means per block of ``pooled``
    (``reference.sparse_decode_attention``)."""
    if use_triton(q, block_size):
        from ssa_megatron.ops import triton_sparse_decode
        if triton_sparse_decode.supports(q, k_cache, block_size, q_select):
            return triton_sparse_decode.sparse_decode_attention(
                q, k_cache, v_cache, pooled, past, block_size, block_counts, scale,
                q_select=q_select, parts=parts)
    return reference.sparse_decode_attention(q, k_cache, v_cache, pooled, past, block_size,
                                             block_counts, scale, q_select=q_select, parts=parts)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cu_seqlens: Optional[torch.Tensor] = None,
                   scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention through torch SDPA; packed docs one by one.

    SDPA picks its backend (on an H200: cuDNN, faster than its flash backend; docs/KERNEL_NOTES.md
    v6); ``torch.nn.attention.sdpa_kernel`` around the call forces one."""
    if not use_triton(q):
        return reference.full_attention(q, k, v, cu_seqlens, scale)
    reference._check_shapes(q, k, v)
    g = q.shape[2] // k.shape[2]

    def run(qs, ks, vs):
        qh, kh, vh = qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)
        if g > 1:
            try:  # torch >= 2.5: GQA inside the kernel, no expanded kv copy
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                                      enable_gqa=True).transpose(1, 2)
            except TypeError:
                kh = kh.repeat_interleave(g, dim=1)
                vh = vh.repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale).transpose(1, 2)

    if cu_seqlens is None:
        return run(q, k, v)
    segs = reference.segments(q.shape[1], cu_seqlens, q.shape[0])
    return torch.cat([run(q[:, a:b], k[:, a:b], v[:, a:b]) for a, b in segs], dim=1)


def alignment_loss(o_full: torch.Tensor, o_sparse: torch.Tensor) -> torch.Tensor:
    """SmoothL1(O_full, sg(O_sparse)) + SmoothL1(sg(O_full), O_sparse); fused Triton on CUDA."""
    if not use_triton(o_full):
        return reference.alignment_loss(o_full, o_sparse)
    from ssa_megatron.ops import triton_alignment_loss
    return triton_alignment_loss.alignment_loss(o_full, o_sparse)


__all__ = ["attention_backend", "get_backend", "select_blocks", "sparse_attention",
           "sparse_decode_attention", "full_attention", "alignment_loss"]
