"""Tiny models and batches shared by the model/parallel tests."""
from __future__ import annotations

import torch

from ssa_megatron.training.arguments import build_parser, validate_args

TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "8", "--num-query-groups", "2", "--seq-length", "64",
        "--ssa-block-counts", "2", "--train-iters", "1", "--data-path", "unused"]


def tiny_args(*extra: str):
    return validate_args(build_parser().parse_args(TINY + list(extra)))


def build_tiny_model(args, vocab_size: int = 120):
    from ssa_megatron.model.builder import build_config, build_gpt_model
    from ssa_megatron.training.distributed import set_seed
    set_seed(args.seed)
    return build_gpt_model(build_config(args), vocab_size, args.seq_length)


def random_batches(n: int, batch: int = 2, seq: int = 64, vocab: int = 120, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append({"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
                    "position_ids": torch.arange(seq).expand(batch, -1).contiguous()})
    return out


def ce_loss(model, batch, packed_seq_params=None, branch=None):
    """Mean CE of one forward; ``branch`` is the SSA branch it trains (model/runtime.forward_params)."""
    from ssa_megatron.model.runtime import forward_params
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                      packed_seq_params=forward_params(packed_seq_params, batch["tokens"].shape[-1],
                                                       ssa_branch=branch))
    return per_token.float().mean()


def full_grads(model):
    """Gradients gathered to the unsharded (TP=1) layout: name -> tensor."""
    return gather_full(model, pick=lambda p: p.grad)


def _unshard(t: torch.Tensor, param) -> torch.Tensor:
    from megatron.core import parallel_state as ps
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    torch.distributed.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([chunks[r][s] for s in range(stride) for r in range(tp)], dim=dim)


def gather_full(model, pick=lambda p: p.data):
    """{GPTModel name: full CPU tensor} of ``pick(param)`` (weights by default, or grads) of a
    GPTModel (PP=1) or the pipeline model on any TP x PP layout, complete on every rank (a
    layout-independent form to compare layouts with). Collective: every rank must call it."""
    import torch.distributed as dist

    from ssa_megatron.model.pipeline import gpt_param_name
    local = {}
    for name, param in model.named_parameters():
        gpt_name = gpt_param_name(name)
        if gpt_name is None:
            continue
        value = pick(param)
        value = torch.zeros_like(param.data) if value is None else value.detach()
        local[gpt_name] = _unshard(value.float(), param).cpu()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    merged = {}
    for part in everything:
        merged.update(part)
    return merged


def stub_checkpoint_reading(monkeypatch, meta: dict, tag: str = "iter_0000000"):
    """checkpointing.load_checkpoint as far as its checks and notes: ``tag`` is found with
    ``meta`` and fits the flags; DeepSpeed's load then fails ("could not load"). Returns an
    engine stand-in (ZeRO stage 0)."""
    from types import SimpleNamespace

    from ssa_megatron.training import checkpointing
    monkeypatch.setattr(checkpointing, "select_checkpoint", lambda *a, **k: (tag, []))
    monkeypatch.setattr(checkpointing, "read_meta", lambda tag_dir: meta)
    monkeypatch.setattr(checkpointing, "check_compatible", lambda *a: None)
    monkeypatch.setattr(checkpointing, "_padded_vocab", lambda engine: None)
    monkeypatch.setattr(checkpointing, "_deepspeed_load", lambda *a, **k: (None, None))
    return SimpleNamespace(zero_optimization_stage=lambda: 0)
