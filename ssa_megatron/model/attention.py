"""SSA attention inside megatron-core's SelfAttention.

``SSASelfAttention`` is megatron's SelfAttention plus the per-head sigmoid gate computed from the
layer input (after the input norm); it hands the gate to ``SSACoreAttention``, the
``core_attention`` submodule that runs the full and/or sparse branch on the local heads. What one
forward needs (the micro-batch's branch, the gate, a diagnostics probe) arrives in the forward's
``packed_seq_params`` (model/runtime.SSAForwardParams), never as state left on the modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core import parallel_state
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from ssa_megatron.errors import ConfigError
from ssa_megatron.model import align_loss
from ssa_megatron.model.recipe_defaults import recipe_setting
from ssa_megatron.model.runtime import SSAForwardParams, forward_params
from ssa_megatron.ops import dispatch as ops
from ssa_megatron.ops import selection_loss, selection_variants


@dataclass
class SSASelfAttentionSubmodules(SelfAttentionSubmodules):
    linear_gate: Union[ModuleSpec, type, None] = None


class SSASelfAttention(SelfAttention):
    """SelfAttention with a column-parallel gate: one sigmoid scalar per query head and token."""

    gates_per_head = 1  # NSA (model/nsa_attention.py) uses 3: rows [head0: g1 g2 g3, head1: ...]

    def __init__(self, config, submodules: SSASelfAttentionSubmodules, layer_number: int,
                 attn_mask_type=None, **kwargs):
        if attn_mask_type is not None:
            kwargs["attn_mask_type"] = attn_mask_type
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        if self.checkpoint_core_attention or config.fused_single_qkv_rope:
            # the gate rides in packed_seq_params, which neither path hands on as SSA needs
            raise ConfigError("SSA attention does not support megatron's selective core-attention "
                              "recompute or fused single-QKV RoPE; use --recompute-activations")
        self.linear_gate = build_module(
            submodules.linear_gate,
            self.config.hidden_size,
            self.config.num_attention_heads * self.gates_per_head,
            config=self.config,
            init_method=self.config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="gate",
        )
        if recipe_setting(self.config, "ssa_gate_init") == "zero":
            with torch.no_grad():
                self.linear_gate.weight.zero_()

    # SelfAttention.forward's positional arguments after hidden_states, up to packed_seq_params
    PACKED_SEQ_PARAMS_POSITION = 8

    def forward(self, hidden_states, *args, **kwargs):
        gate_logits, _ = self.linear_gate(hidden_states)  # [sq, b, heads per rank]
        gate = torch.sigmoid(gate_logits.float()).to(hidden_states.dtype)
        # megatron hands packed_seq_params on to this layer's core_attention: the gate rides in it
        if len(args) > self.PACKED_SEQ_PARAMS_POSITION:
            args = list(args)
            args[self.PACKED_SEQ_PARAMS_POSITION] = forward_params(args[self.PACKED_SEQ_PARAMS_POSITION],
                                                                   ssa_gate=gate)
        else:
            kwargs["packed_seq_params"] = forward_params(kwargs.get("packed_seq_params"), ssa_gate=gate)
        return super().forward(hidden_states, *args, **kwargs)


class SSACoreAttention(MegatronModule):
    """[sq, b, np, hn] query, [sq, b, ng, hn] key/value in; [sq, b, np * hn] out (local heads)."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type="self",
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SSA attention does not support context parallelism; "
                             "set --context-parallel-size 1")
        self.layer_number = max(1, layer_number)
        self.attention_mode = config.attention_mode
        self.block_size = config.ssa_block_size
        self.block_counts = config.ssa_block_counts
        self.align_coef = config.ssa_align_coef
        self.select_align_coef = config.ssa_select_align_coef
        self.select_align_rows = config.ssa_select_align_rows
        # --ssa-select-proj: q + q P_h is what the selection scores with (P_h [D, D] per local
        # query head, starting at 0: SSA's own selection); only the selection loss trains it
        self.select_proj = None
        if config.ssa_select_proj:
            heads = config.num_attention_heads // parallel_state.get_tensor_model_parallel_world_size()
            self.select_proj = torch.nn.Parameter(torch.zeros(
                heads, config.kv_channels, config.kv_channels, dtype=config.params_dtype))
            self.select_proj.tensor_model_parallel = True  # heads split over TP ranks
            self.select_proj.partition_dim = 0
            self.select_proj.partition_stride = 1
        self.selection_score = config.ssa_selection_score
        self.inference_mode = config.default_inference_mode
        # How sparse mode picks its blocks: SSA's pooled scores, or an evaluation-only variant
        # (ops/selection_variants.py); set with set_inference_mode.
        self.selection = selection_variants.POOLED
        self.softmax_scale = softmax_scale
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()

    def branch(self, params: Optional[SSAForwardParams]):
        """"full", "sparse", or (SSA training with per-sequence draws) a bool tensor [b] whose
        True rows train the full branch."""
        if not self.training:
            return self.inference_mode
        if self.attention_mode == "ssa":
            if params is None or params.ssa_branch is None:
                raise RuntimeError("SSA training needs a branch per micro-batch: give the model's forward "
                                   "packed_seq_params=forward_params(seq_length=S, ssa_branch='full' "
                                   "or 'sparse') (ssa_megatron.model.runtime)")
            return params.ssa_branch
        return self.attention_mode

    @staticmethod
    def ssa_params(packed_seq_params) -> Optional[SSAForwardParams]:
        return packed_seq_params if isinstance(packed_seq_params, SSAForwardParams) else None

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SSA attention does not take an attention bias")
        (q, k, v), cu_seqlens, layout = self.to_ops_layout(query, key, value, packed_seq_params)
        params = self.ssa_params(packed_seq_params)
        branch = self.branch(params)
        mixed = isinstance(branch, torch.Tensor)
        align = self.training and self.attention_mode == "ssa" and torch.is_grad_enabled()
        o_full = o_sparse = indices = None
        if mixed or branch == "full" or align:
            o_full = ops.full_attention(q, k, v, cu_seqlens=cu_seqlens, scale=self.softmax_scale)
        if mixed or branch == "sparse" or align:
            o_sparse, indices = self.sparse_branch(q, k, v, cu_seqlens, return_indices=True)

        gate = params.ssa_gate if params is not None else None
        if gate is not None:
            gate = gate.transpose(0, 1).reshape(q.shape[0], q.shape[1], -1, 1)
            o_full = None if o_full is None else o_full * gate
            o_sparse = None if o_sparse is None else o_sparse * gate

        if mixed:  # per-sequence draws: each sequence's tokens take their own branch's output
            if layout[0]:
                raise ValueError("per-sequence branches need the sbhd layout; THD input (one packed "
                                 "sequence) takes one branch: draw it per micro-batch")
            rows = branch.to(q.device).repeat_interleave(layout[1])  # [b * sq] in sequence order
            out = torch.where(rows.reshape(q.shape[0], q.shape[1], 1, 1), o_full, o_sparse)
        else:
            out = o_full if branch == "full" else o_sparse
        if params is not None and params.ssa_probe is not None:
            params.ssa_probe.record(self, q, k, gate, indices, o_full, o_sparse, cu_seqlens)
        if align:
            loss = ops.alignment_loss(o_full, o_sparse)
            align_loss.AlignLossLoggingHelper.tracker.record(self.layer_number, loss.detach())
            # Each TP rank averages its own heads; /tp makes the sum over ranks the global mean.
            weight = self.align_coef / (self.config.num_layers * self.tp_size)
            out = align_loss.attach_alignment_loss(out, loss * weight)
            if self.select_align_coef > 0:
                out = self.attach_selection_loss(out, q, k, cu_seqlens, layout)

        return self.from_ops_layout(out, layout)

    def selection_query(self, q):
        """The queries SSA's block selection scores with: q, or q + q P_h (--ssa-select-proj)."""
        if self.select_proj is None:
            return q
        return q + torch.einsum("bthd,hde->bthe", q, self.select_proj.to(q.dtype))

    def attach_selection_loss(self, out, q, k, cu_seqlens, layout):
        """``out`` carrying the selection alignment loss of this forward's sampled query rows.
        With a selection map the loss trains the map alone (q and k held fixed); without, it
        trains q and k."""
        # rows are positions along the token axis: with documents packed across the flattened
        # batch that axis holds every sequence of the micro-batch, so it gets rows for each
        sequences = 1 if cu_seqlens is None else layout[2]
        rows = selection_loss.sample_rows(q.shape[1], self.select_align_rows * sequences,
                                          self.block_size, self.block_counts)
        q_select = None
        if self.select_proj is not None:
            q, k = q.detach(), k.detach()
            q_select = self.selection_query(q)
        loss = selection_loss.selection_alignment_loss(q, k, self.block_size, rows, cu_seqlens,
                                                       scale=self.softmax_scale, q_select=q_select)
        align_loss.AlignLossLoggingHelper.selection_tracker.record(self.layer_number, loss.detach())
        weight = self.select_align_coef / (self.config.num_layers * self.tp_size)
        return align_loss.attach_alignment_loss(out, loss * weight)

    @staticmethod
    def to_ops_layout(query, key, value, packed_seq_params):
        """megatron's [sq, b, heads, hn] (or THD [t, heads, hn]) -> ops' [B, T, heads, hn] and the
        document boundaries (THD's cu_seqlens, or sbhd documents packed across the flattened
        batch: runtime.packed_documents)."""
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd:  # [t, heads, hn]: one packed sequence
            return ([x.unsqueeze(0) for x in (query, key, value)], packed_seq_params.cu_seqlens_q,
                    (True, query.shape[0], 1))
        sq, b = query.shape[0], query.shape[1]
        qkv = [x.transpose(0, 1) for x in (query, key, value)]  # [b, sq, heads, hn]
        cu_seqlens = None if packed_seq_params is None else packed_seq_params.cu_seqlens_q
        if cu_seqlens is not None:  # documents packed across the flattened batch
            qkv = [x.reshape(1, b * sq, *x.shape[2:]) for x in qkv]
        return qkv, cu_seqlens, (False, sq, b)

    @staticmethod
    def from_ops_layout(out, layout):
        """[B, T, heads, hn] -> [sq, b, heads * hn] (or [t, heads * hn] for THD)."""
        thd, sq, b = layout
        if thd:
            return out.reshape(sq, -1)
        out = out.reshape(b, sq, -1, out.shape[-1]).transpose(0, 1)
        return out.reshape(sq, b, -1)

    def sparse_branch(self, q, k, v, cu_seqlens, return_indices: bool = False):
        with torch.no_grad():
            indices = selection_variants.select_blocks_with(
                self.selection, q.detach(), k.detach(), self.block_size, self.block_counts,
                cu_seqlens=cu_seqlens, scale=self.softmax_scale,
                q_select=self.selection_query(q.detach()), score=self.selection_score)
        out = ops.sparse_attention(q, k, v, indices, self.block_size, cu_seqlens=cu_seqlens,
                                   scale=self.softmax_scale)
        return (out, indices) if return_indices else out


def set_inference_mode(model: torch.nn.Module, mode: Optional[str] = None,
                       block_counts: Optional[int] = None, dense_layers: int = 0,
                       selection: Optional[str] = None) -> None:
    """Switch a trained model's branch (full/sparse) and/or its block budget, in place. With a
    mode, ``dense_layers`` > 0 keeps the first that many attention layers (layer numbers 1..N)
    in full attention whatever the mode (a hybrid sparse mode). ``selection`` names how sparse
    mode picks its blocks (ops/selection_variants.py; "pooled" is SSA's)."""
    if mode is not None and mode not in ("full", "sparse"):
        raise ValueError(f"unknown inference mode {mode!r}; use full or sparse")
    if block_counts is not None and block_counts < 1:
        raise ValueError("block_counts must be a positive integer")
    if dense_layers < 0 or (dense_layers and mode is None):
        raise ValueError("dense_layers must be >= 0 and comes with a mode")
    if selection is not None:
        selection_variants.parse_selection(selection)
    for module in model.modules():
        if isinstance(module, SSACoreAttention):
            if mode is not None:
                module.inference_mode = "full" if module.layer_number <= dense_layers else mode
            if block_counts is not None:
                module.block_counts = block_counts
            if selection is not None:
                module.selection = selection
