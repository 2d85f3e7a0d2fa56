"""SSA (Sparse Sparse Attention) causal LM for Hugging Face transformers.

Llama layout (embed_tokens, q/k/v/o_proj, gate/up/down_proj, RMSNorms, lm_head tied unless
``config.tie_word_embeddings`` is false; q/k/v biases with ``config.add_qkv_bias``; per-head
RMSNorms ``q_norm`` / ``k_norm`` on queries and keys before RoPE with ``config.qk_layernorm``, as
Qwen3; RoPE scaled per ``config.use_rope_scaling``, see :func:`rope_inv_freq`) plus ``g_proj``:
one sigmoid gate per query head and token, computed from the normed layer input, that multiplies
that head's attention output before ``o_proj``.

Attention runs in one of two modes (``config.inference_mode``, changeable at any time):

* ``full``: causal softmax attention;
* ``sparse``: every query attends only the tokens of its top ``config.block_counts`` blocks of
  ``config.block_size`` tokens (its own block always included), blocks ranked by the group-summed
  softmax of q . mean(K_block) over complete past blocks; the first ``config.dense_layers``
  layers (default 0) stay in full attention (a hybrid sparse mode). Two trained variants of the
  ranking: ``config.ssa_select_proj`` (a learned per-head map ``select_proj`` [heads, D, D]:
  blocks are ranked for the query q + q P_h) and ``config.ssa_selection_score`` ``moment2``
  (each block's logit raised by half its per-channel key variance term,
  ``ssa_ops.moment2_operands``; the KV cache then keeps each block's key variances too) or
  ``sub2`` / ``sub4`` (the log-mean-exp over the means of 2 / 4 sub-blocks per block,
  ``ssa_ops.sub_block_logits``; the KV cache then keeps the 2 / 4 sub-block means of each block
  instead of its mean).

Both modes work with a KV cache. The cache's layers are ``SSACacheLayer`` (``ssa_cache.py``): a
``DynamicLayer`` that also keeps the fp32 mean of each complete block's keys. In sparse mode a new
token selects its blocks from those means with the rule of ``ssa_ops.select_blocks`` (the
selection of token t depends only on keys <= t), in O(T / block_size), and attends over the
tokens of its selected blocks only, so cached generation equals uncached generation. Beam search
and cropping keep the means in step; a cache of another kind (static, quantized) falls back to
pooling all cached keys each step (the same result, O(T)).

NSA models (``config.attention_mode == "nsa"``, trained with ``--attention-mode nsa``) have three
gates per head (``g_proj`` [3 * heads, hidden], per head: compression, selection, window) and
always compute the three gated branches of ``ssa_nsa.py`` (a copy of ssa_megatron/ops/nsa.py;
``config.block_size``, ``config.block_counts``, ``config.window_size``); ``inference_mode`` does
not apply to them. With a KV cache the new queries run against all cached keys (each branch's
output for a query depends only on that query and the keys <= it), so cached generation equals
uncached generation; each cached step costs O(cached length) rather than O(1) per branch.

The attention math comes from ``ssa_ops.py`` (a copy of ssa_megatron/ops/reference.py the
converter writes beside this file); on CUDA the Triton kernels of ``ssa_megatron.ops.dispatch``
are used when ssa_megatron is installed.
"""
from __future__ import annotations

import functools
import inspect
import math
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_ssa import SSAConfig
from .ssa_cache import SSACacheLayer, install_pooled_key_layers

try:  # the copy of ssa_megatron/ops/nsa.py the converter writes next to this file
    from .ssa_nsa import nsa_attention as _local_nsa_attention
except ImportError:  # imported from the ssa_megatron source tree
    from ssa_megatron.ops.nsa import nsa_attention as _local_nsa_attention

try:  # the copy written next to this file by the converter
    from .ssa_ops import (SELECTION_SCORES, full_attention, moment2_keys, moment2_query,
                          pooled_selection_keys, select_blocks, sparse_attention,
                          sparse_decode_attention, sub_parts, sub_parts_error)
except ImportError:  # imported from the ssa_megatron source tree
    from ssa_megatron.ops.reference import (SELECTION_SCORES, full_attention, moment2_keys,
                                            moment2_query, pooled_selection_keys, select_blocks,
                                            sparse_attention, sparse_decode_attention, sub_parts,
                                            sub_parts_error)

_REFERENCE = SimpleNamespace(full_attention=full_attention, select_blocks=select_blocks,
                             sparse_attention=sparse_attention,
                             sparse_decode_attention=sparse_decode_attention)
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _ops_for(t: torch.Tensor):
    """Triton kernels (ssa_megatron.ops.dispatch) for CUDA tensors when installed, else reference."""
    if t.is_cuda:
        try:
            from ssa_megatron.ops import dispatch
            return dispatch
        except ImportError:
            pass
    return _REFERENCE


def _nsa_for(t: torch.Tensor):
    """(nsa_attention, impl): ssa_megatron.ops.nsa (its own SDPA/Triton choice) for CUDA tensors
    when installed, else the local copy with the reference kernels."""
    if t.is_cuda:
        try:
            from ssa_megatron.ops import nsa
            return nsa.nsa_attention, None
        except ImportError:
            pass
    return _local_nsa_attention, "reference"


def nsa_attention_with_past(q, k, v, gates, past: int, block_size: int, block_counts: int,
                            window: int, scale: float):
    """NSA output of queries at positions past.. over all (cached + new) keys.

    Runs the branches on the whole key range with zero queries (and gates) in front of the new
    ones and keeps the new rows: every branch's output for a query depends only on that query and
    keys <= its position, so the rows equal those of the no-cache forward pass.
    """
    fn, impl = _nsa_for(q)
    if past:
        q = torch.cat([q.new_zeros(q.shape[0], past, *q.shape[2:]), q], dim=1)
        gates = torch.cat([gates.new_zeros(gates.shape[0], past, *gates.shape[2:]), gates], dim=1)
    out = fn(q, k, v, gates, block_size, block_counts, window, scale=scale, impl=impl)
    return out[:, past:]


class SSARMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


_ROPE_SCALING_FIELDS = ("rope_scaling_type", "rope_scaling_factor", "rope_scaling_low_freq_factor",
                        "rope_scaling_high_freq_factor", "rope_scaling_original_max_position_embeddings")


def rope_inv_freq(config: SSAConfig) -> torch.Tensor:
    """Rotary frequencies [head_dim / 2] (float32), scaled when ``config.use_rope_scaling``:

    * ``linear``: every frequency divided by ``rope_scaling_factor``;
    * ``llama3`` (Llama-3.1/3.2): with L = ``rope_scaling_original_max_position_embeddings``,
      frequencies whose wavelength exceeds L / low_freq_factor are divided by the factor, those
      below L / high_freq_factor kept, and those between blended linearly in L / wavelength.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not getattr(config, "use_rope_scaling", False):
        return inv_freq
    factor = config.rope_scaling_factor
    if config.rope_scaling_type == "linear":
        return inv_freq / factor
    low, high = config.rope_scaling_low_freq_factor, config.rope_scaling_high_freq_factor
    length = config.rope_scaling_original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > length / low, inv_freq / factor, inv_freq)
    smooth = (length / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    between = ~(wavelength < length / high) * ~(wavelength > length / low)
    return torch.where(between, blended, scaled)


def _rope(positions: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple:
    """cos/sin [B, T, 1, dim] for integer positions [B, T] (rotate-half convention)."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def full_attention_with_past(q, k, v, past: int, scale: float):
    """Causal attention of queries q [B, Tq, HQ, D] at positions past.. over all (cached + new)
    keys/values k, v [B, H, Tk, D] (the cache's layout): SDPA, one new query needs no mask."""
    tq, tk = q.shape[1], k.shape[2]
    mask = None
    if tq > 1:
        pos = torch.arange(past, past + tq, device=q.device)
        mask = torch.arange(tk, device=q.device)[None, :] <= pos[:, None]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=q.shape[2] != k.shape[1])
    return o.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _takes(fn, argument: str) -> bool:
    """Whether ``fn`` has a parameter ``argument`` (an installed ssa_megatron may be older than
    this model code); asked once per function, not at every decoding step."""
    try:
        return argument in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _ops_with(q: torch.Tensor, name: str, argument: Optional[str]):
    """``name`` of :func:`_ops_for`, or the local reference's where that one lacks it or lacks
    ``argument``."""
    fn = getattr(_ops_for(q), name, None)
    if fn is None or (argument is not None and not _takes(fn, argument)):
        return getattr(_REFERENCE, name)
    return fn


def select_blocks_for(q, q_select, k, block_size: int, block_counts: int, scale: float,
                      score: str):
    """Blocks [B, T, H, block_counts] of a pass without cache: ranked for the selection queries
    ``q_select`` with ``score``."""
    if score == "mean":
        return _ops_for(q).select_blocks(q_select, k, block_size, block_counts, scale=scale)
    return _ops_with(q, "select_blocks", "score")(q_select, k, block_size, block_counts,
                                                   scale=scale, score=score)


def selection_operands(q, q_select, k, layer, block_size: int, score: str, scale: float):
    """(scoring queries or None for q, pooled keys) that rank a KV cache's blocks for ``q_select``
    (None: q) with ``score``: the cache layer's pooled keys (an SSACacheLayer), else all keys
    k [B, H, T, D] pooled again; for moment2 the pair ``[q, scale / 2 q * q]``, ``[mean, var]``
    (the cache keeps the second as it is: a step builds only the query side); for subN the N
    sub-block means of each block."""
    cached = layer if isinstance(layer, SSACacheLayer) else None
    if score == "moment2":
        pooled = cached.pooled_moment2 if cached is not None else None
        if pooled is None:
            pooled = moment2_keys(*pooled_selection_keys(k.transpose(1, 2), block_size, score))
        return moment2_query(q if q_select is None else q_select, scale), pooled
    parts = sub_parts(score) or 1
    pooled = cached.pooled_keys if cached is not None and cached.parts == parts else None
    if pooled is None:
        pooled = pooled_selection_keys(k.transpose(1, 2), block_size, score)[0]
    return q_select, pooled


def sparse_decode(q, k, v, layer, past: int, block_size: int, block_counts: int, scale: float,
                  q_select=None, score: str = "mean"):
    """Sparse attention of new queries q [B, Tq, HQ, D] at positions past.. with a KV cache
    (k, v [B, H, past + Tq, D]): blocks ranked by :func:`selection_operands`; one new token on
    CUDA takes the three decode kernels (ssa_megatron.ops.triton_sparse_decode). A ``subN`` score
    ranks blocks from the N sub-block means of each block (O(T / block_size) a step with an
    SSACacheLayer, which keeps them). The same blocks and outputs as without a cache (on CUDA up
    to near-ties: the pass without a cache scores in TF32)."""
    q_select, pooled = selection_operands(q, q_select, k, layer, block_size, score, scale)
    parts = sub_parts(score)
    if parts:
        decode = _ops_with(q, "sparse_decode_attention", "parts")
        return decode(q, k, v, pooled, past, block_size, block_counts, scale, q_select=q_select,
                      parts=parts)
    if q_select is None:
        decode = _ops_with(q, "sparse_decode_attention", None)
        return decode(q, k, v, pooled, past, block_size, block_counts, scale)
    decode = _ops_with(q, "sparse_decode_attention", "q_select")
    return decode(q, k, v, pooled, past, block_size, block_counts, scale, q_select=q_select)


class SSAAttention(nn.Module):
    def __init__(self, config: SSAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        bias = bool(getattr(config, "add_qkv_bias", False))
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.nsa = getattr(config, "attention_mode", "ssa") == "nsa"
        self.selection_score = getattr(config, "ssa_selection_score", "mean")
        if self.selection_score not in SELECTION_SCORES:
            raise ValueError(f"config.ssa_selection_score {self.selection_score!r} must be one of "
                             f"{', '.join(SELECTION_SCORES)}")
        parts = sub_parts(self.selection_score)
        unfit = sub_parts_error(parts, config.block_size) if parts else None
        if unfit:
            raise ValueError(f"config.ssa_selection_score: {unfit}")
        # --ssa-select-proj: per-head maps, zero = the paper's selection
        self.select_proj = None
        if getattr(config, "ssa_select_proj", False):
            self.select_proj = nn.Parameter(torch.zeros(self.num_heads, self.head_dim, self.head_dim))
        # NSA: 3 gates per head, rows [head 0: cmp, slc, swa, head 1: ...] (megatron's linear_gate)
        self.g_proj = nn.Linear(hidden, self.num_heads * (3 if self.nsa else 1), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        if getattr(config, "qk_layernorm", False):  # per-head RMSNorm before RoPE (as Qwen3)
            self.q_norm = SSARMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = SSARMSNorm(self.head_dim, config.rms_norm_eps)

    def selection_query(self, q: torch.Tensor) -> torch.Tensor:
        """The queries blocks are ranked for: q, or q + q P_h with a selection map."""
        if self.select_proj is None:
            return q
        return q + torch.einsum("bthd,hde->bthe", q, self.select_proj.to(q.dtype))

    def forward(self, x, cos, sin, cache: Optional[Cache] = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        gate = torch.sigmoid(self.g_proj(x).float()).to(x.dtype)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            k_all, v_all = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            if k_all.shape[2] != past + t:
                raise ValueError(f"the KV cache returned {k_all.shape[2]} keys for {past + t} tokens: "
                                 "SSA attention needs a DynamicCache (generate()'s default), not a "
                                 "static one")
            k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.nsa:
            gates = gate.view(b, t, self.num_heads, 3)
            o = nsa_attention_with_past(q, k, v, gates, past, self.config.block_size,
                                        self.config.block_counts, self.config.window_size, scale)
            return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))
        dense = self.layer_idx < getattr(self.config, "dense_layers", 0)  # hybrid sparse mode
        mode = "full" if dense else self.config.inference_mode
        ops = _ops_for(q)
        if mode == "full":
            o = ops.full_attention(q, k, v, scale=scale) if past == 0 else \
                full_attention_with_past(q, k_all, v_all, past, scale)
        elif mode == "sparse":
            bs, bc = self.config.block_size, self.config.block_counts
            q_select = self.selection_query(q)
            if past == 0:
                idx = select_blocks_for(q, q_select, k, bs, bc, scale, self.selection_score)
                o = ops.sparse_attention(q, k, v, idx, bs, scale=scale)
            else:
                o = sparse_decode(q, k_all, v_all, cache.layers[self.layer_idx], past, bs, bc, scale,
                                  None if self.select_proj is None else q_select,
                                  self.selection_score)
        else:
            raise ValueError(f"config.inference_mode {mode!r} must be 'full' or 'sparse'")
        o = o * gate[..., None]
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim))


class SSAMLP(nn.Module):
    def __init__(self, config: SSAConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SSADecoderLayer(nn.Module):
    def __init__(self, config: SSAConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = SSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SSAAttention(config, layer_idx)
        self.post_attention_layernorm = SSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SSAMLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SSAPreTrainedModel(PreTrainedModel):
    config_class = SSAConfig
    config: SSAConfig
    base_model_prefix = "model"
    _no_split_modules = ["SSADecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, SSARMSNorm):
            nn.init.ones_(module.weight)


class SSAModel(SSAPreTrainedModel):
    def __init__(self, config: SSAConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([SSADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = SSARMSNorm(config.hidden_size, config.rms_norm_eps)
        self._inv_freq = {}  # (device, RoPE settings) -> frequencies (not a buffer: checkpoints stay as they are)
        self.post_init()

    def rotary_frequencies(self, device: torch.device) -> torch.Tensor:
        """:func:`rope_inv_freq` on ``device``, computed once per device and RoPE setting: a
        decoding step then copies nothing from the host, so it can be captured in a CUDA graph."""
        c = self.config
        key = (device, c.head_dim, c.rope_theta, getattr(c, "use_rope_scaling", False),
               *(getattr(c, name, None) for name in _ROPE_SCALING_FIELDS))
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(c).to(device)
        return self._inv_freq[key]

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError("SSA attention blocks count from each sequence's first token: padded "
                             "batches (attention_mask with zeros) are not supported; run sequences "
                             "unpadded, one per batch row of equal length")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if use_cache and getattr(self.config, "attention_mode", "ssa") != "nsa":
            # the layers' own score (fixed when they were built) decides what the cache keeps
            scores = {layer.self_attn.selection_score for layer in self.layers}
            install_pooled_key_layers(cache, self.config.num_hidden_layers, self.config.block_size,
                                      "moment2" in scores, max(sub_parts(s) for s in scores) or 1)
        past = cache.get_seq_length() if cache is not None else 0
        # positions are always past..past+T-1: blocks are counted from the sequence start
        positions = torch.arange(past, past + x.shape[1], device=x.device).expand(x.shape[0], -1)
        cos, sin = _rope(positions, self.rotary_frequencies(x.device), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache if use_cache else None)
        x = self.norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: cache if use_cache else None})


class SSAForCausalLM(SSAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SSAConfig):
        super().__init__(config)
        self.model = SSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def set_inference_mode(self, mode: Optional[str] = None, block_counts: Optional[int] = None,
                           dense_layers: Optional[int] = None):
        """Switch between full and sparse attention and/or change the sparse block budget and the
        number of first layers that stay in full attention in sparse mode."""
        if mode is not None and mode not in ("full", "sparse"):
            raise ValueError(f"unknown inference mode {mode!r}; use full or sparse")
        if dense_layers is not None and not 0 <= int(dense_layers) <= self.config.num_hidden_layers:
            raise ValueError(f"dense_layers must be between 0 and {self.config.num_hidden_layers}")
        if block_counts is not None and int(block_counts) < 1:
            raise ValueError("block_counts must be a positive integer")
        if mode is not None:  # all checked: nothing changes on a refused call
            self.config.inference_mode = mode
        if dense_layers is not None:
            self.config.dense_layers = int(dense_layers)
        if block_counts is not None:
            self.config.block_counts = int(block_counts)
        return self

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                past_key_values=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         past_key_values=past_key_values)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})


__all__ = ["SSAConfig", "SSAModel", "SSAForCausalLM", "SSAPreTrainedModel"]
