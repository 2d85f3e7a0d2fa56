"""The whole model's tensors in one layout-independent form (GPTModel names, unsharded).

Works for a GPTModel (PP=1) and for the pipeline model on any TP x PP layout; used to compare
layouts in tests and to export weights. Collective: every rank must call it.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps


def canonical_name(name: str) -> Optional[str]:
    """GPTModel name of a parameter of either model; None for parameters with no such name."""
    name = name.removeprefix("module.")
    if name.startswith("tied_modules.embed."):
        return name.removeprefix("tied_modules.embed.")
    if name.startswith(("embedding.", "decoder.", "output_layer.")):
        return name
    head = re.match(r"\d+\.(output_layer\..*)", name)  # the pipeline's untied output layer
    if head is not None:
        return head.group(1)
    m = re.match(r"(\d+)\.(layer|norm)\.(.*)", name)
    if m is None:
        return None
    index, kind, rest = int(m.group(1)), m.group(2), m.group(3)
    if kind == "layer":
        return f"decoder.layers.{index - 1}.{rest}"
    return f"decoder.final_layernorm.{rest}"


def _unshard(t: torch.Tensor, param) -> torch.Tensor:
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([chunks[r][s] for s in range(stride) for r in range(tp)], dim=dim)


def gather_full(model: torch.nn.Module, pick: Callable = lambda p: p.data) -> Dict[str, torch.Tensor]:
    """{GPTModel name: full CPU tensor} of ``pick(param)`` (weights by default, or grads),
    complete on every rank."""
    local = {}
    for name, param in model.named_parameters():
        cname = canonical_name(name)
        if cname is None:
            continue
        value = pick(param)
        value = torch.zeros_like(param.data) if value is None else value.detach()
        local[cname] = _unshard(value.float(), param).cpu()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    merged = {}
    for part in everything:
        merged.update(part)
    return merged
