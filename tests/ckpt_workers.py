"""Workers for the checkpoint / HF conversion tests (run as "ckpt_workers:NAME" by run_workers)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _save(out_dir, obj):
    if dist.get_rank() == 0:
        torch.save(obj, os.path.join(out_dir, "result.pt"))


def train_logits(out_dir, *argv):
    """pretrain.run() with the given flags, then the trained model's eval logits (TP-gathered,
    fp32) in full and sparse mode on fixed tokens: result["logits"][mode] is [2, seq, vocab]."""
    from megatron.core import parallel_state as ps

    from ssa_megatron.model.attention import set_inference_mode
    from ssa_megatron.training.arguments import parse_args
    from ssa_megatron.training.pretrain import run
    args = parse_args(list(argv))
    result = run(args)
    model = result.pop("engine").module
    model.eval()
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 250, (2, args.seq_length), generator=g)
    pos = torch.arange(args.seq_length).expand(2, -1)
    logits = {}
    with torch.no_grad():
        for mode in ("full", "sparse"):
            set_inference_mode(model, mode)
            out = model(tokens, pos, None).float()  # [b, s, V/tp]
            tp = ps.get_tensor_model_parallel_world_size()
            if tp > 1:
                parts = [torch.empty_like(out) for _ in range(tp)]
                dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                out = torch.cat(parts, dim=-1)
            logits[mode] = out
    _save(out_dir, dict(result, tokens=tokens, logits=logits))


def train_counting_selections(out_dir, *argv):
    """pretrain.run() counting how often the checkpoint to resume from is chosen (each choice
    verifies the checkpoint's files against their sha256)."""
    from ssa_megatron.training import checkpointing
    from ssa_megatron.training.arguments import parse_args
    from ssa_megatron.training.pretrain import run
    calls, real = [], checkpointing.select_checkpoint
    checkpointing.select_checkpoint = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    result = run(parse_args(list(argv)))
    result.pop("engine")
    _save(out_dir, dict(result, selections=len(calls)))


def train_fault(out_dir, fault_rank, fault_at_save, *argv):
    """pretrain.run() whose save number ``fault_at_save`` (1-based) dies on rank ``fault_rank``
    after that rank wrote its files and before ``latest`` is updated (os._exit: no clean-up)."""
    from ssa_megatron.training.arguments import parse_args
    from ssa_megatron.training.pretrain import run
    fault_rank, fault_at_save = int(fault_rank), int(fault_at_save)
    calls = {"n": 0}

    def hook(rank):
        calls["n"] += 1
        if rank == fault_rank and calls["n"] == fault_at_save:
            print(f"fault injected on rank {rank} at save {calls['n']}", flush=True)
            os._exit(17)

    result = run(parse_args(list(argv)), fault_hook=hook)
    result.pop("engine")
    _save(out_dir, dict(result))


def train_logits_first(out_dir, *argv):
    """pretrain.run() with the given flags; the model's full-mode logits (TP-gathered, fp32) on
    fixed tokens are taken before the first optimizer step, i.e. from the loaded weights."""
    from megatron.core import parallel_state as ps

    from ssa_megatron.model.attention import set_inference_mode
    from ssa_megatron.training.arguments import parse_args
    from ssa_megatron.training.pretrain import run
    args = parse_args(list(argv))
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 250, (2, args.seq_length), generator=g)
    captured = {}

    def before_step(engine, iteration):
        if iteration or captured:
            return
        model = engine.module
        model.eval()
        set_inference_mode(model, "full")
        with torch.no_grad():
            out = model(tokens, torch.arange(args.seq_length).expand(2, -1), None).float()
        model.train()
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1:
            parts = [torch.empty_like(out) for _ in range(tp)]
            dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
            out = torch.cat(parts, dim=-1)
        captured["full"] = out

    result = run(args, before_step=before_step)
    result.pop("engine")
    _save(out_dir, dict(result, tokens=tokens, logits=captured))
