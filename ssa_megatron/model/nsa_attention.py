"""NSA baseline attention (``--attention-mode nsa``) inside megatron-core's SelfAttention.

``NSASelfAttention`` is :class:`SSASelfAttention` with three gates per query head: its
column-parallel ``linear_gate`` maps hidden -> 3 * heads and its weight rows are laid out **per
head**, ``[head 0: compression, selection, window, head 1: compression, selection, window, ...]``
(row ``3 * h + i``, h = global query head in megatron's order, i in ``ops.nsa.BRANCHES``). This is
the layout of ``g_proj`` ([3 * heads, hidden]) in the released NSA/SSA checkpoints, so the weight
maps over one to one (no permutation; a TP shard holds whole heads: rows of heads
[r * heads / tp, (r + 1) * heads / tp)). ``sigmoid`` is applied to each gate.

``NSACoreAttention`` runs the three branches of :mod:`ssa_megatron.ops.nsa` on the local heads
(no communication: a kv group and its query heads live on one TP rank) and returns
``Σ_i g_i * O_i``. There is no alignment loss and no per-micro-batch branch draw: training and
inference both use the three-branch output. Block size, block counts and window come from
``--ssa-block-size``, ``--ssa-block-counts`` and ``--nsa-window-size``.
"""
from __future__ import annotations

from ssa_megatron.model.attention import SSACoreAttention, SSASelfAttention
from ssa_megatron.ops import nsa


class NSASelfAttention(SSASelfAttention):
    """SelfAttention + a column-parallel gate with 3 sigmoid scalars per query head and token."""

    gates_per_head = 3


class NSACoreAttention(SSACoreAttention):
    """[sq, b, np, hn] query, [sq, b, ng, hn] key/value in; [sq, b, np * hn] out (local heads)."""

    def __init__(self, config, layer_number: int, *args, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        self.window_size = config.nsa_window_size

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("NSA attention does not take an attention bias")
        (q, k, v), cu_seqlens, layout = self.to_ops_layout(query, key, value, packed_seq_params)

        gates = None
        params = self.ssa_params(packed_seq_params)
        if params is not None and params.ssa_gate is not None:  # [sq, b, 3 * local heads] -> [B, T, local heads, 3]
            gates = params.ssa_gate.transpose(0, 1).reshape(q.shape[0], q.shape[1], q.shape[2], 3)
        out = nsa.nsa_attention(q, k, v, gates, self.block_size, self.block_counts,
                                self.window_size, cu_seqlens=cu_seqlens, scale=self.softmax_scale)
        return self.from_ops_layout(out, layout)
