"""Attention sparsity and alignment gap per layer, from the q/k/v each layer really sees.

A forward pre-hook on every ``SSACoreAttention`` receives the layer's query [sq, b, np, hn] and
key/value [sq, b, ng, hn] (after RoPE) and its gate, during a forward in *full* mode (so each
layer's inputs are those of the full model). For every block budget k it computes, per query token
t and query head h (P = causal softmax(q k^T * scale), the full attention row of t):

* ``selected mass``  = sum of P over the tokens of the blocks the SSA selection picks for t
  (current block up to t, plus the top scored complete past blocks; ops.select_blocks);
  ``dropped mass`` = 1 - selected mass (the quantity the paper's error bound is linear in);
* ``top-k mass``     = the largest mass any k blocks (of those up to t's block) can hold: the
  oracle concentration of full attention;
* ``>= 90 %``        = whether that mass reaches 0.9 (per (token, head) pair); a *head* counts as
  concentrated when its mass, averaged over tokens, reaches 0.9;
* ``alignment gap``  = ||O_full - O_sparse|| / ||O_full|| over the whole layer output (gated, as the
  layer hands it on; O_sparse = ops.sparse_attention with the selection of budget k).

All token positions are included (early tokens, whose whole past fits in k blocks, have dropped
mass 0). The attention matrix is never held whole: query chunks of ``chunk`` rows are processed
at a time. Statistics are sums (``tokens`` counts query tokens), so ranks and windows add up.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from ssa_megatron.ops import dispatch as ops
from ssa_megatron.ops import reference

THRESHOLD = 0.9


def layer_attention_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          block_size: int, block_counts: Sequence[int],
                          scale: Optional[float] = None, gate: Optional[torch.Tensor] = None,
                          chunk: Optional[int] = None, gap: bool = True,
                          q_select: Optional[torch.Tensor] = None,
                          score: str = "mean") -> Dict[str, torch.Tensor]:
    """Sums over query tokens for one layer; q [B, T, HQ, D], k/v [B, T, H, D] (ops layout),
    ``gate`` [B, T, HQ] or None, ``q_select`` the queries the layer's selection scores with when
    they are not q (--ssa-select-proj). Returns float64 CPU tensors:

    ``tokens`` [] ; ``selected_mass``, ``selected_ge90``, ``topk_mass``, ``topk_ge90``
    [K, HQ] (K = len(block_counts)); ``gap_num`` [K], ``gap_den`` [] (squared norms).
    """
    b, t, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nbc = len(block_counts)
    nb = (t + block_size - 1) // block_size
    dev = q.device
    with torch.no_grad():
        q_sel = q if q_select is None else q_select
        indices = [ops.select_blocks(q_sel, k, block_size, int(bc), scale=scale, score=score)
                   for bc in block_counts]
        sums = {name: torch.zeros(nbc, hq, dtype=torch.float64, device=dev)
                for name in ("selected_mass", "selected_ge90", "topk_mass", "topk_ge90")}
        rows = chunk or reference.query_chunk_rows(b, hq, t, 1 << 29, most=t)
        for c0 in range(0, t, rows):
            c1 = min(t, c0 + rows)
            mass = reference.block_attention_mass(q[:, c0:c1], k[:, :c1],
                                                  torch.arange(c0, c1, device=dev), block_size, scale)
            mass = torch.nn.functional.pad(mass, (0, nb - mass.shape[-1]))  # blocks past c1: 0
            block_mass = mass.reshape(b, c1 - c0, hq, nb).permute(0, 2, 1, 3)  # [B, HQ, tc, nb]
            ranked = block_mass.sort(dim=-1, descending=True).values.cumsum(-1)
            for i, bc in enumerate(block_counts):
                idx = indices[i][:, c0:c1].long().repeat_interleave(g, dim=2).permute(0, 2, 1, 3)
                picked = block_mass.gather(-1, idx.clamp(min=0)) * (idx >= 0)
                sel = picked.sum(-1).clamp(max=1.0)  # [B, HQ, tc]
                top = ranked[..., min(int(bc), nb) - 1].clamp(max=1.0)
                sums["selected_mass"][i] += sel.double().sum((0, 2))
                sums["selected_ge90"][i] += (sel >= THRESHOLD).double().sum((0, 2))
                sums["topk_mass"][i] += top.double().sum((0, 2))
                sums["topk_ge90"][i] += (top >= THRESHOLD).double().sum((0, 2))
        out = {name: val.cpu() for name, val in sums.items()}
        out["tokens"] = torch.tensor(float(b * t), dtype=torch.float64)
        out["gap_num"] = torch.zeros(nbc, dtype=torch.float64)
        out["gap_den"] = torch.zeros((), dtype=torch.float64)
        if gap:
            o_full = ops.full_attention(q, k, v, scale=scale).float()
            gw = 1.0 if gate is None else gate.float().unsqueeze(-1)
            o_full = o_full * gw
            out["gap_den"] += o_full.double().square().sum().cpu()
            for i, bc in enumerate(block_counts):
                o_sp = ops.sparse_attention(q, k, v, indices[i], block_size, scale=scale).float() * gw
                out["gap_num"][i] += (o_sp - o_full).double().square().sum().cpu()
    return out


class SparsityCollector:
    """Hooks every SSA core attention of a model; accumulates :func:`layer_attention_stats`."""

    def __init__(self, model: torch.nn.Module, block_counts: Sequence[int], gap: bool = True):
        from ssa_megatron.model.attention import SSACoreAttention
        self.block_counts = [int(x) for x in block_counts]
        self.gap = gap
        self.layers = sorted((m for m in model.modules() if isinstance(m, SSACoreAttention)),
                             key=lambda m: m.layer_number)
        self.stats: Dict[int, Dict[str, torch.Tensor]] = {}
        self.enabled = False
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True)
                         for m in self.layers]

    def close(self) -> None:
        for hnd in self._handles:
            hnd.remove()
        self._handles = []

    def _hook(self, module, args, kwargs):
        if not self.enabled:
            return None
        names = ("query", "key", "value")
        qkv = [args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names)]
        packed = kwargs.get("packed_seq_params")
        if packed is not None and packed.cu_seqlens_q is not None:
            raise RuntimeError("sparsity analysis does not handle packed documents")
        q, k, v = (x.transpose(0, 1) for x in qkv)  # [b, sq, heads, hn]
        gate = None
        params = module.ssa_params(packed)
        if params is not None and params.ssa_gate is not None:
            gate = params.ssa_gate.transpose(0, 1).reshape(q.shape[0], q.shape[1], q.shape[2], -1)[..., 0]
        s = layer_attention_stats(q, k, v, module.block_size, self.block_counts,
                                  module.softmax_scale, gate, gap=self.gap,
                                  q_select=module.selection_query(q), score=module.selection_score)
        acc = self.stats.get(module.layer_number)
        self.stats[module.layer_number] = s if acc is None else {n: acc[n] + s[n] for n in s}
        return None

    def names(self) -> List[str]:
        return ["tokens", "selected_mass", "selected_ge90", "topk_mass", "topk_ge90",
                "gap_num", "gap_den"]

    def flat(self) -> torch.Tensor:
        """All sums as one float64 vector (layer-major) for an all-reduce."""
        parts = []
        for layer in self.layers:
            s = self.stats.get(layer.layer_number)
            if s is None:
                s = self._zeros(layer)
            parts.extend(s[n].reshape(-1) for n in self.names())
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def _zeros(self, layer) -> Dict[str, torch.Tensor]:
        hq = layer.config.num_attention_heads  # TP=1 in evaluation: all heads are local
        k = len(self.block_counts)
        z = {n: torch.zeros(k, hq, dtype=torch.float64)
             for n in ("selected_mass", "selected_ge90", "topk_mass", "topk_ge90")}
        z.update(tokens=torch.zeros((), dtype=torch.float64),
                 gap_num=torch.zeros(k, dtype=torch.float64), gap_den=torch.zeros((), dtype=torch.float64))
        return z

    def summarize(self, flat: Optional[torch.Tensor] = None) -> dict:
        """Per-layer and mean numbers per block budget (from ``flat``, e.g. all-reduced)."""
        flat = self.flat() if flat is None else flat
        per_layer = []
        pos = 0
        for layer in self.layers:
            z = self._zeros(layer)
            s = {}
            for n in self.names():
                size = z[n].numel()
                s[n] = flat[pos: pos + size].reshape(z[n].shape)
                pos += size
            n_tok = float(s["tokens"])
            head_sel = s["selected_mass"] / max(n_tok, 1.0)  # [K, HQ] mean over tokens
            head_top = s["topk_mass"] / max(n_tok, 1.0)
            entry = {"layer": layer.layer_number, "tokens": int(n_tok), "by_block_counts": {}}
            for i, bc in enumerate(self.block_counts):
                sel = float(head_sel[i].mean())
                entry["by_block_counts"][str(bc)] = {
                    "selected_mass": sel,
                    "dropped_mass": 1.0 - sel,
                    "topk_mass": float(head_top[i].mean()),
                    "selected_ge90_pairs": float(s["selected_ge90"][i].sum()) / max(n_tok * head_sel.shape[1], 1.0),
                    "topk_ge90_pairs": float(s["topk_ge90"][i].sum()) / max(n_tok * head_sel.shape[1], 1.0),
                    "selected_ge90_heads": float((head_sel[i] >= THRESHOLD).double().mean()),
                    "topk_ge90_heads": float((head_top[i] >= THRESHOLD).double().mean()),
                    "alignment_gap": (math.sqrt(float(s["gap_num"][i]) / float(s["gap_den"]))
                                      if self.gap and float(s["gap_den"]) > 0 else None),
                    "per_head_dropped_mass": [1.0 - float(x) for x in head_sel[i]],
                }
            per_layer.append(entry)
        mean = {}
        for bc in map(str, self.block_counts):
            rows = [e["by_block_counts"][bc] for e in per_layer]
            mean[bc] = {key: (sum(r[key] for r in rows) / len(rows) if rows and rows[0][key] is not None
                              else None)
                        for key in ("selected_mass", "dropped_mass", "topk_mass", "selected_ge90_pairs",
                                    "topk_ge90_pairs", "selected_ge90_heads", "topk_ge90_heads",
                                    "alignment_gap")}
        return {"block_counts": self.block_counts, "per_layer": per_layer, "mean": mean}
