"""Training diagnostics of SSA attention: what each layer's heads do, measured on the training
micro-batch itself.

``AttentionProbe`` goes with one forward (``forward_params(ssa_probe=probe)`` as the forward's
``packed_seq_params``, model/runtime.py) and every ``SSACoreAttention`` of that forward records, per layer and query head, on a sample of query positions of the first sequence:
the entropy of full attention and of the sparse branch's attention, the share of full
attention's mass that the sparse selection keeps, the largest attention logit, q/k norms, the
gate's mean and saturation, and the relative gap between the gated full and sparse outputs.
``UpdateNorms`` measures |update| / |weight| per parameter group across one optimizer step.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional

import torch

GATE_SATURATION = 0.05  # a gate below this or above 1 - this counts as saturated


def probe_positions(seq_len: int, count: int, block_size: int, block_counts: int = 2) -> torch.Tensor:
    """``count`` query positions spread from the first block past the budget (earlier positions
    select every block they can see, so their kept mass is 1 by construction) to the end."""
    lo = min(seq_len - 1, block_counts * block_size)
    return torch.linspace(lo, seq_len - 1, count).round().long().unique()


def _document_starts(positions: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    if cu_seqlens is None:
        return torch.zeros_like(positions)
    bounds = cu_seqlens.to(positions.device).long()
    return bounds[torch.searchsorted(bounds, positions, right=True) - 1]


def attention_stats(q, k, indices, block_size: int, scale: Optional[float],
                    cu_seqlens: Optional[torch.Tensor] = None, samples: int = 32) -> Dict[str, list]:
    """Per query head: full-attention entropy, sparse-attention entropy, the kept share of full
    attention's mass, and the largest logit, averaged over sampled positions of sequence 0.

    q [B, T, HQ, D], k [B, T, H, D], indices [B, T, H, n] (block ids from each document's start,
    -1 empty), all in the ops layout."""
    q0, k0 = q[0].detach().float(), k[0].detach().float()
    t, hq, d = q0.shape
    group = hq // k0.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    pos = probe_positions(t, samples, block_size, indices.shape[-1]).to(q0.device)
    starts = _document_starts(pos, cu_seqlens)
    keys = k0.repeat_interleave(group, dim=1)  # [T, HQ, D]
    logits = torch.einsum("phd,thd->pht", q0[pos], keys) * scale  # [P, HQ, T]
    j = torch.arange(t, device=q0.device)
    visible = (j[None, :] <= pos[:, None]) & (j[None, :] >= starts[:, None])  # [P, T]
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    entropy_full = -(p * logp.nan_to_num(neginf=0.0)).sum(-1)  # [P, HQ]
    max_logit = logits.amax(-1)

    sel = indices[0, pos].long().repeat_interleave(group, dim=1)  # [P, HQ, n]
    token_block = ((j[None, :] - starts[:, None]).clamp(min=0) // block_size)  # [P, T]
    n_blocks = t // block_size + 1
    chosen = torch.zeros(sel.shape[0], hq, n_blocks + 1, dtype=torch.bool, device=q0.device)
    chosen.scatter_(2, torch.where(sel >= 0, sel, torch.full_like(sel, n_blocks)), True)
    chosen = chosen[..., :n_blocks]
    in_sparse = torch.gather(chosen, 2, token_block[:, None, :].expand(-1, hq, -1)) & visible[:, None, :]
    kept = (p * in_sparse).sum(-1)  # [P, HQ]
    p_sparse = torch.where(in_sparse, p, torch.zeros_like(p)) / kept.clamp(min=1e-30)[..., None]
    entropy_sparse = -(p_sparse * torch.log(p_sparse.clamp(min=1e-30))).sum(-1)
    return {"entropy_full": entropy_full.mean(0).tolist(),
            "entropy_sparse": entropy_sparse.mean(0).tolist(),
            "kept_mass": kept.mean(0).tolist(),
            "max_logit": max_logit.amax(0).tolist()}


class AttentionProbe:
    """Collects one record per layer during the forward it is handed to."""

    def __init__(self, samples: int = 32):
        self.samples = samples
        self.layers: Dict[int, Dict[str, object]] = {}

    @torch.no_grad()
    def record(self, module, q, k, gate, indices, o_full, o_sparse, cu_seqlens) -> None:
        if module.layer_number in self.layers:
            return  # a recomputed forward (activation checkpointing) in backward: recorded already
        if indices is None:
            from ssa_megatron.ops import dispatch as ops
            indices = ops.select_blocks(module.selection_query(q[:1].detach()), k[:1].detach(),
                                        module.block_size,
                                        module.block_counts, scale=module.softmax_scale,
                                        cu_seqlens=cu_seqlens if q.shape[0] == 1 else None,
                                        score=module.selection_score)
        stats = attention_stats(q, k, indices, module.block_size, module.softmax_scale,
                                cu_seqlens, self.samples)
        stats["q_norm"] = q.detach().float().norm(dim=-1).mean(dim=(0, 1)).tolist()
        stats["k_norm"] = k.detach().float().norm(dim=-1).mean(dim=(0, 1)).tolist()
        if gate is not None:
            g = gate.detach().float()
            stats["gate_mean"] = g.mean(dim=(0, 1, 3)).tolist()
            stats["gate_saturated"] = float(((g < GATE_SATURATION) | (g > 1 - GATE_SATURATION))
                                            .float().mean())
        if o_full is not None and o_sparse is not None:
            full = o_full.detach().float()
            stats["output_gap"] = float((full - o_sparse.detach().float()).norm()
                                        / full.norm().clamp(min=1e-30))
        self.layers[module.layer_number] = stats

    def summary(self) -> List[Dict[str, object]]:
        return [dict(layer=n, **self.layers[n]) for n in sorted(self.layers)]


_GROUPS = [("embedding", r"embedding"), ("output_layer", r"output_layer"),
           ("attention_qkv", r"linear_qkv"), ("attention_proj", r"linear_proj"),
           ("gate", r"linear_gate"), ("mlp_in", r"linear_fc1"), ("mlp_out", r"linear_fc2"),
           ("norms", r"norm")]


def parameter_group(name: str) -> str:
    for group, pattern in _GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


class UpdateNorms:
    """|W_after - W_before| / |W_before| per parameter group over one optimizer step (the module's
    working copy of the weights; under ZeRO-3 the partitioned weights are not measured)."""

    def __init__(self, model: torch.nn.Module):
        self.named = [(n, p) for n, p in model.named_parameters() if p.numel() > 0]
        self.before = {n: p.detach().float().clone() for n, p in self.named}

    @torch.no_grad()
    def finish(self) -> Dict[str, float]:
        delta: Dict[str, float] = {}
        weight: Dict[str, float] = {}
        for n, p in self.named:
            g = parameter_group(n)
            old = self.before[n]
            delta[g] = delta.get(g, 0.0) + float((p.detach().float() - old).pow(2).sum())
            weight[g] = weight.get(g, 0.0) + float(old.pow(2).sum())
        return {g: math.sqrt(delta[g]) / max(math.sqrt(weight[g]), 1e-30) for g in delta}
