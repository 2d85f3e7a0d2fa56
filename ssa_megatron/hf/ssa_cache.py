"""KV cache layer for sparse SSA decoding (part of the model code the converter copies next to
the weights).

:class:`SSACacheLayer` is a transformers ``DynamicLayer`` that also keeps the pooled block keys:
the fp32 mean of the keys of each complete block of ``block_size`` tokens per kv head
([B, nb, H, D], the layout of ``ssa_ops.mean_pool_blocks``), one new mean appended whenever an
update completes a block. A decoding step then selects its blocks from nb = T // block_size means
(O(T / block_size)) instead of pooling all T cached keys again. With ``squares`` (a model that
selects with the moment2 score) it keeps each block's fp32 ``[mean, var]`` of its keys instead
(``pooled_moment2``: the key side of the moment2 score, ``ssa_ops.moment2_keys``), so a step
reads the scoring operand as it is. With ``parts`` = N (a model that selects with the subN
score) it keeps the means of each complete block's N sub-blocks instead ([B, nb * N, H, D],
block-major: ``ssa_ops.sub_block_logits_from_means`` reads them).

Keys and values live in buffers with spare room (grown by a quarter, at least 256 tokens), so an
appended token costs a copy of itself rather than of the whole cache as ``DynamicLayer``'s
``torch.cat`` does; ``keys`` / ``values`` are views of the filled part. Cropping, beam reordering
and batch selection/repetition keep the pooled keys in step (a crop drops the means of blocks it
cuts into).

:func:`install_pooled_key_layers` swaps the plain ``DynamicLayer`` slots of a ``DynamicCache``
(the cache ``generate`` builds) for ``SSACacheLayer`` ones, pooling whatever they already hold.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer

try:  # the copy of ssa_megatron/ops/reference.py the converter writes next to this file
    from .ssa_ops import mean_pool_blocks, moment2_keys
except ImportError:  # imported from the ssa_megatron source tree
    from ssa_megatron.ops.reference import mean_pool_blocks, moment2_keys

_MIN_GROWTH = 256


def _grown(buf: Optional[torch.Tensor], used: int, needed: int, dim: int, like: torch.Tensor,
           dtype=None) -> torch.Tensor:
    """``buf`` when it holds ``needed`` entries along ``dim``, else a larger copy of its first
    ``used`` entries (room for a quarter more, at least _MIN_GROWTH)."""
    if buf is not None and buf.shape[dim] >= needed:
        return buf
    shape = list(like.shape)
    shape[dim] = needed + max(needed // 4, _MIN_GROWTH)
    new = torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    if buf is not None and used:
        new.narrow(dim, 0, used).copy_(buf.narrow(dim, 0, used))
    return new


class SSACacheLayer(DynamicLayer):
    """A DynamicLayer ([B, H, T, D] keys/values) that also keeps the pooled keys of the complete
    blocks (``pooled_keys``: [B, T // block_size, H, D], fp32), and with ``squares`` also their
    per-channel variances (``pooled_moment2``: [B, T // block_size, H, 2 D], means then
    variances)."""

    def __init__(self, block_size: int, squares: bool = False, parts: int = 1, **kwargs):
        super().__init__()
        self.block_size = int(block_size)
        self.squares = bool(squares)
        self.parts = int(parts)
        if self.parts < 1 or self.block_size % self.parts:
            raise ValueError(f"parts={parts}: the sub-blocks kept per block must divide the block "
                             f"size {block_size}")
        if self.squares and self.parts > 1:
            raise ValueError("a cache keeps either key variances (moment2) or sub-block means "
                             "(subN), not both")
        self._length = 0
        self._key_buf = self._value_buf = None
        self._pooled_buf = None
        self._num_pooled = 0

    @classmethod
    def from_layer(cls, layer: DynamicLayer, block_size: int, squares: bool = False,
                   parts: int = 1) -> "SSACacheLayer":
        """An SSACacheLayer holding what ``layer`` holds (its complete blocks pooled)."""
        new = cls(block_size, squares, parts)
        if layer.is_initialized and layer.get_seq_length() > 0:
            new.update(layer.keys, layer.values)
        return new

    @property
    def pooled_keys(self) -> Optional[torch.Tensor]:
        """[B, nb, H, D] fp32 means of the complete blocks, [B, nb * parts, H, D] those of their
        sub-blocks (None before the first update)."""
        pooled = self._pooled()
        return None if pooled is None else pooled[..., : self.keys.shape[-1]]

    @property
    def pooled_moment2(self) -> Optional[torch.Tensor]:
        """[B, nb, H, 2 D] fp32 ``[mean, var]`` of the complete blocks' keys (None before the
        first update or without ``squares``)."""
        return self._pooled() if self.squares else None

    def _pooled(self) -> Optional[torch.Tensor]:
        """The filled part of the pooled buffer: [B, nb, H, D], or [B, nb, H, 2 D] with squares
        (the means, then the variances)."""
        if not self.is_initialized:
            return None
        if self._pooled_buf is None:
            b, h, _, d = self.keys.shape
            return self.keys.new_zeros(b, 0, h, 2 * d if self.squares else d, dtype=torch.float32)
        return self._pooled_buf[:, : self._num_pooled * self.parts]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True
        self._set(key_states[..., :0, :], value_states[..., :0, :])

    def _set(self, keys: torch.Tensor, values: torch.Tensor,
             pooled: Optional[torch.Tensor] = None) -> None:
        """Hold exactly these tensors (no spare room); pooled keys as given or kept/cut to fit."""
        self._key_buf, self._value_buf = keys, values
        self._length = keys.shape[-2]
        self.keys, self.values = keys, values
        if pooled is not None:
            self._pooled_buf, self._num_pooled = pooled, pooled.shape[1] // self.parts
        self._num_pooled = min(self._num_pooled, self._length // self.block_size)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        end = self._length + new
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            # autograd must see fresh tensors, not writes into a shared buffer
            self._key_buf = torch.cat([self.keys, key_states], dim=-2)
            self._value_buf = torch.cat([self.values, value_states], dim=-2)
        else:
            self._key_buf = _grown(self._key_buf, self._length, end, 2, key_states)
            self._value_buf = _grown(self._value_buf, self._length, end, 2, value_states)
            self._key_buf[:, :, self._length:end].copy_(key_states)
            self._value_buf[:, :, self._length:end].copy_(value_states)
        self._length = end
        self.keys = self._key_buf[:, :, :end]
        self.values = self._value_buf[:, :, :end]
        self._pool_complete_blocks()
        return self.keys, self.values

    def _pool_complete_blocks(self) -> None:
        bs = self.block_size
        complete = self._length // bs
        if complete <= self._num_pooled:
            return
        first = self._num_pooled
        # [B, H, n * bs, D] -> [B, n * bs, H, D]: the layout (and arithmetic) of the no-cache pass
        tokens = self.keys[:, :, first * bs: complete * bs].transpose(1, 2)
        # selection is not differentiated; sub-blocks of complete blocks only (block-major)
        means = mean_pool_blocks(tokens, bs // self.parts).detach()
        if self.squares:  # the arithmetic of reference.pooled_selection_keys and moment2_keys
            means = moment2_keys(means, mean_pool_blocks(tokens.float() * tokens.float(), bs).detach())
        n = self.parts
        self._pooled_buf = _grown(self._pooled_buf, first * n, complete * n, 1, means, torch.float32)
        self._pooled_buf[:, first * n:complete * n].copy_(means)
        self._num_pooled = complete

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._length = max(0, self._length + tokens_to_remove)
        self.keys = self._key_buf[:, :, : self._length]
        self.values = self._value_buf[:, :, : self._length]
        self._num_pooled = min(self._num_pooled, self._length // self.block_size)

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        pooled = self._pooled()
        self._set(fn(self.keys), fn(self.values), None if pooled is None else fn(pooled))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def offload(self):
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        super().reset()
        self._length = self._num_pooled = 0
        self._key_buf = self._value_buf = self._pooled_buf = None


def install_pooled_key_layers(cache, num_layers: int, block_size: int, squares: bool = False,
                              parts: int = 1) -> None:
    """Make every plain ``DynamicLayer`` slot of ``cache`` (up to ``num_layers``) an
    :class:`SSACacheLayer` (``squares``: also pooling the squared keys; ``parts``: keeping that
    many sub-block means per block); other layer kinds (static, quantized, ...) are left as
    they are."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        while len(layers) < num_layers:
            layers.append(SSACacheLayer(block_size, squares, parts))
    for i, layer in enumerate(layers[:num_layers]):
        if type(layer) is DynamicLayer:
            layers[i] = SSACacheLayer.from_layer(layer, block_size, squares, parts)
        elif isinstance(layer, SSACacheLayer) and layer.block_size != block_size:
            raise ValueError(f"the cache pools blocks of {layer.block_size} tokens but the model's "
                             f"block_size is {block_size}; start generation with a fresh cache")
        elif isinstance(layer, SSACacheLayer) and squares and not layer.squares:
            raise ValueError("the cache keeps no key variances, which this model's moment2 "
                             "selection needs; start generation with a fresh cache")
        elif isinstance(layer, SSACacheLayer) and layer.parts != parts:
            raise ValueError(f"the cache keeps {layer.parts} mean(s) per block but this model's "
                             f"selection reads {parts}; start generation with a fresh cache")
