"""Tensor layouts: megatron-core GPTModel (per TP rank) <-> one full state dict <-> HF names.
The model's shape (model/shape.py, or any mapping of its field names) gives the sizes.

The *full megatron state dict* (megatron-core names, TP merged, embedding with its padded rows) is
the hub every conversion goes through:

    megatron checkpoint (any TP, ZeRO stage; PP: see megatron_ckpt) --merge--> full --to_hf--> HF
    HF (ours, the paper's, plain Llama) --from_hf--> full --split--> megatron checkpoint (any TP)

TP rules (megatron-core, local spec):

* ``embedding.word_embeddings.weight`` and an untied ``output_layer.weight`` (padded vocab),
  ``linear_qkv`` weight and bias (whole kv groups per rank, each group [G query heads x D, k D,
  v D] rows), ``linear_gate`` and ``core_attention.select_proj`` (heads): split along dim 0;
* ``linear_proj``, ``linear_fc2`` (row parallel): split along dim 1;
* ``linear_fc1`` (SwiGLU, partition stride 2): rank r holds [gate_r; up_r];
* norms (also --qk-layernorm's per-head q/k norms): replicated.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping

import torch

from ssa_megatron.errors import ConfigError
from ssa_megatron.training.checkpoint_format import is_weight_key

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
SELECT_PROJ = "self_attention.core_attention.select_proj"  # --ssa-select-proj's [heads, D, D]
DIM0 = ("embedding.word_embeddings.weight", "output_layer.weight")
DIM0_SUFFIX = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
               "self_attention.linear_gate.weight", SELECT_PROJ)
DIM1_SUFFIX = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
STRIDE2_SUFFIX = ("mlp.linear_fc1.weight",)
REPLICATED_SUFFIX = ("input_layernorm.weight", "pre_mlp_layernorm.weight", "final_layernorm.weight",
                     "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight")


class ConversionError(ConfigError):
    """A checkpoint or directory that cannot be converted; the message says why and what to do."""


def tp_rule(name: str):
    """('dim0'|'dim1'|'stride2'|'replicated') for a megatron parameter name."""
    if name in DIM0:
        return "dim0"
    if name.endswith(DIM0_SUFFIX):
        return "dim0"
    if name.endswith(DIM1_SUFFIX):
        return "dim1"
    if name.endswith(STRIDE2_SUFFIX):
        return "stride2"
    if name.endswith(REPLICATED_SUFFIX):
        return "replicated"
    raise ConversionError(f"unknown megatron parameter {name!r}: the converter does not know how "
                          "TP splits it; extend ssa_megatron/convert/layout.py")


def merge_tp(shards: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Per-TP-rank state dicts (rank order) -> one full state dict."""
    names = [n for n in shards[0] if is_weight_key(n)]
    for r, sd in enumerate(shards[1:], 1):
        if {n for n in sd if is_weight_key(n)} != set(names):
            raise ConversionError(f"TP rank {r} holds other parameters than rank 0: the checkpoint "
                                  "is damaged or mixes layouts")
    full = {}
    for n in names:
        parts = [sd[n] for sd in shards]
        rule = tp_rule(n)
        if rule == "replicated" or len(parts) == 1:
            full[n] = parts[0].clone()
        elif rule == "dim0":
            full[n] = torch.cat(parts, dim=0)
        elif rule == "dim1":
            full[n] = torch.cat(parts, dim=1)
        else:  # stride2: [gate_r; up_r] per rank
            halves = [p.chunk(2, dim=0) for p in parts]
            full[n] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return full


def split_tp(full: Dict[str, torch.Tensor], tp: int) -> List[Dict[str, torch.Tensor]]:
    """One full state dict -> ``tp`` per-rank state dicts (inverse of :func:`merge_tp`)."""
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for n, t in full.items():
        rule = tp_rule(n)
        if rule == "replicated" or tp == 1:
            parts = [t] * tp
        elif rule in ("dim0", "dim1"):
            dim = 0 if rule == "dim0" else 1
            if t.shape[dim] % tp:
                raise ConversionError(f"{n} {tuple(t.shape)} does not split into {tp} TP ranks")
            parts = list(t.chunk(tp, dim=dim))
        else:
            gate, up = t.chunk(2, dim=0)
            if gate.shape[0] % tp:
                raise ConversionError(f"{n}: FFN size {gate.shape[0]} is not divisible by TP {tp}")
            parts = [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp), up.chunk(tp))]
        for r in range(tp):
            shards[r][n] = parts[r].clone().contiguous()
    return shards


# ---------------------------------------------------------------------------------------------
# full megatron <-> HF (our SSA model code: Llama names + g_proj)


def megatron_to_hf(full: Dict[str, torch.Tensor], shape: Mapping) -> Dict[str, torch.Tensor]:
    """Full megatron state dict -> HF SSA state dict (``lm_head`` only when untied)."""
    h = shape["num_query_groups"]
    d, g = shape["kv_channels"], shape["num_attention_heads"] // shape["num_query_groups"]
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"][:vocab].clone(),
           "model.norm.weight": full["decoder.final_layernorm.weight"].clone()}
    untied = bool(shape.get("untie_embeddings_and_output_weights"))
    if untied != ("output_layer.weight" in full):
        raise ConversionError("the checkpoint's output layer does not match its flags ("
                              f"untie_embeddings_and_output_weights {untied}): it is damaged or "
                              "its ssa_meta.json belongs to another model")
    if untied:
        out["lm_head.weight"] = full["output_layer.weight"][:vocab].clone()
    for i in range(shape["num_layers"]):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        for suffix in ("weight", "bias") if shape.get("add_qkv_bias") else ("weight",):
            q, k, v = _split_qkv(full[m + "self_attention.linear_qkv." + suffix], h, g, d)
            out[p + "self_attn.q_proj." + suffix] = q
            out[p + "self_attn.k_proj." + suffix] = k
            out[p + "self_attn.v_proj." + suffix] = v
        out[p + "self_attn.g_proj.weight"] = full[m + "self_attention.linear_gate.weight"].clone()
        if shape.get("ssa_select_proj"):
            out[p + "self_attn.select_proj"] = full[m + SELECT_PROJ].clone()
        if shape.get("qk_layernorm"):
            for x in "qk":
                out[f"{p}self_attn.{x}_norm.weight"] = full[f"{m}self_attention.{x}_layernorm.weight"].clone()
        out[p + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"].clone()
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[p + "mlp.gate_proj.weight"] = gate.clone()
        out[p + "mlp.up_proj.weight"] = up.clone()
        out[p + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"].clone()
        out[p + "input_layernorm.weight"] = full[m + "input_layernorm.weight"].clone()
        out[p + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"].clone()
    return out


def _split_qkv(qkv: torch.Tensor, h: int, g: int, d: int):
    """megatron's fused qkv weight [h (g + 2) d, hidden] (or bias) -> HF q, k, v (copies)."""
    rest = qkv.shape[1:]
    grouped = qkv.view(h, (g + 2) * d, *rest)
    return (grouped[:, : g * d].reshape(h * g * d, *rest).clone(),
            grouped[:, g * d: (g + 1) * d].reshape(h * d, *rest).clone(),
            grouped[:, (g + 1) * d:].reshape(h * d, *rest).clone())


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, g: int, d: int) -> torch.Tensor:
    rest = q.shape[1:]
    return torch.cat([q.view(h, g * d, *rest), k.view(h, d, *rest), v.view(h, d, *rest)],
                     dim=1).reshape(h * (g + 2) * d, *rest).clone()


def _pad_rows(t: torch.Tensor, rows: int, what: str) -> torch.Tensor:
    if t.shape[0] > rows:
        raise ConversionError(f"{what} has {t.shape[0]} rows, more than the padded vocab {rows}")
    padded = torch.zeros(rows, *t.shape[1:], dtype=t.dtype)
    padded[: t.shape[0]] = t
    return padded


def hf_to_megatron(hf: Dict[str, torch.Tensor], shape: Mapping, padded_vocab: int) -> Dict[str, torch.Tensor]:
    """HF SSA state dict (Llama names + g_proj) -> full megatron state dict.

    ``g_proj`` becomes ``linear_gate`` as is: [heads, hidden] (SSA) or [3 * heads, hidden] (NSA,
    rows 3 * h + i = gate i of head h, i in compression, selection, window)."""
    h = shape["num_query_groups"]
    d, g = shape["kv_channels"], shape["num_attention_heads"] // shape["num_query_groups"]
    full = {"embedding.word_embeddings.weight": _pad_rows(hf["model.embed_tokens.weight"],
                                                          padded_vocab, "embedding"),
            "decoder.final_layernorm.weight": hf["model.norm.weight"].clone()}
    if shape.get("untie_embeddings_and_output_weights"):
        full["output_layer.weight"] = _pad_rows(hf["lm_head.weight"], padded_vocab, "lm_head")
    for i in range(shape["num_layers"]):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        for suffix in ("weight", "bias") if shape.get("add_qkv_bias") else ("weight",):
            full[m + "self_attention.linear_qkv." + suffix] = _join_qkv(
                *(hf[f"{p}self_attn.{x}_proj.{suffix}"] for x in "qkv"), h, g, d)
        full[m + "self_attention.linear_gate.weight"] = hf[p + "self_attn.g_proj.weight"].clone()
        if shape.get("ssa_select_proj"):
            full[m + SELECT_PROJ] = hf[p + "self_attn.select_proj"].clone()
        if shape.get("qk_layernorm"):
            for x in "qk":
                full[f"{m}self_attention.{x}_layernorm.weight"] = hf[f"{p}self_attn.{x}_norm.weight"].clone()
        full[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"].clone()
        full[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"],
                                                       hf[p + "mlp.up_proj.weight"]], dim=0)
        full[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"].clone()
        full[m + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"].clone()
        full[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"].clone()
    return full
