"""Tensor layouts: megatron-core GPTModel (per TP rank) <-> one full state dict <-> HF names.

The *full megatron state dict* (megatron-core names, TP merged, embedding with its padded rows) is
the hub every conversion goes through:

    megatron checkpoint (any TP, ZeRO stage; PP: see megatron_ckpt) --merge--> full --to_hf--> HF
    HF (ours, the paper's, plain Llama) --from_hf--> full --split--> megatron checkpoint (any TP)

TP rules (megatron-core, local spec):

* ``embedding.word_embeddings.weight`` (padded vocab), ``linear_qkv`` (whole kv groups per rank,
  each group [G query heads x D, k D, v D] rows), ``linear_gate`` (heads): split along dim 0;
* ``linear_proj``, ``linear_fc2`` (row parallel): split along dim 1;
* ``linear_fc1`` (SwiGLU, partition stride 2): rank r holds [gate_r; up_r];
* norms: replicated.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
DIM0 = ("embedding.word_embeddings.weight", "output_layer.weight")
DIM0_SUFFIX = ("self_attention.linear_qkv.weight", "self_attention.linear_gate.weight")
DIM1_SUFFIX = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
STRIDE2_SUFFIX = ("mlp.linear_fc1.weight",)
REPLICATED_SUFFIX = ("input_layernorm.weight", "pre_mlp_layernorm.weight", "final_layernorm.weight")


class ConversionError(ValueError):
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


def is_weight_key(name: str) -> bool:
    """State-dict entries that are weights (not megatron's ``_extra_state`` / RoPE buffers)."""
    return not name.endswith("_extra_state") and "rotary_pos_emb" not in name and "inv_freq" not in name


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


def megatron_to_hf(full: Dict[str, torch.Tensor], spec: dict) -> Dict[str, torch.Tensor]:
    """Full megatron state dict -> HF SSA state dict (lm_head tied: not stored)."""
    hq, h = spec["num_attention_heads"], spec["num_query_groups"]
    d, g = spec["kv_channels"], spec["num_attention_heads"] // spec["num_query_groups"]
    hidden, vocab = spec["hidden_size"], spec["vocab_size"]
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"][:vocab].clone(),
           "model.norm.weight": full["decoder.final_layernorm.weight"].clone()}
    if "output_layer.weight" in full:
        raise ConversionError("the checkpoint has an untied output layer; SSA models tie it to the "
                              "embedding")
    for i in range(spec["num_layers"]):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = full[m + "self_attention.linear_qkv.weight"].view(h, (g + 2) * d, hidden)
        out[p + "self_attn.q_proj.weight"] = qkv[:, : g * d].reshape(hq * d, hidden).clone()
        out[p + "self_attn.k_proj.weight"] = qkv[:, g * d: (g + 1) * d].reshape(h * d, hidden).clone()
        out[p + "self_attn.v_proj.weight"] = qkv[:, (g + 1) * d:].reshape(h * d, hidden).clone()
        out[p + "self_attn.g_proj.weight"] = full[m + "self_attention.linear_gate.weight"].clone()
        out[p + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"].clone()
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[p + "mlp.gate_proj.weight"] = gate.clone()
        out[p + "mlp.up_proj.weight"] = up.clone()
        out[p + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"].clone()
        out[p + "input_layernorm.weight"] = full[m + "input_layernorm.weight"].clone()
        out[p + "post_attention_layernorm.weight"] = full[m + "pre_mlp_layernorm.weight"].clone()
    return out


def hf_to_megatron(hf: Dict[str, torch.Tensor], spec: dict, padded_vocab: int) -> Dict[str, torch.Tensor]:
    """HF SSA state dict (Llama names + g_proj) -> full megatron state dict.

    ``g_proj`` becomes ``linear_gate`` as is: [heads, hidden] (SSA) or [3 * heads, hidden] (NSA,
    rows 3 * h + i = gate i of head h, i in compression, selection, window)."""
    h = spec["num_query_groups"]
    d, g = spec["kv_channels"], spec["num_attention_heads"] // spec["num_query_groups"]
    hidden = spec["hidden_size"]
    emb = hf["model.embed_tokens.weight"]
    if emb.shape[0] > padded_vocab:
        raise ConversionError(f"embedding has {emb.shape[0]} rows, more than the padded vocab {padded_vocab}")
    padded = torch.zeros(padded_vocab, emb.shape[1], dtype=emb.dtype)
    padded[: emb.shape[0]] = emb
    full = {"embedding.word_embeddings.weight": padded,
            "decoder.final_layernorm.weight": hf["model.norm.weight"].clone()}
    for i in range(spec["num_layers"]):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        q = hf[p + "self_attn.q_proj.weight"].view(h, g * d, hidden)
        k = hf[p + "self_attn.k_proj.weight"].view(h, d, hidden)
        v = hf[p + "self_attn.v_proj.weight"].view(h, d, hidden)
        full[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, hidden).clone()
        full[m + "self_attention.linear_gate.weight"] = hf[p + "self_attn.g_proj.weight"].clone()
        full[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"].clone()
        full[m + "mlp.linear_fc1.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"],
                                                       hf[p + "mlp.up_proj.weight"]], dim=0)
        full[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"].clone()
        full[m + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"].clone()
        full[m + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"].clone()
    return full
