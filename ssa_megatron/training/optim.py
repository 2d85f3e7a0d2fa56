"""AdamW parameter groups and the Megatron-style LR schedule (warmup, then cosine/linear decay)."""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on norms, biases and other 1-D parameters (Megatron-LM's rule)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(args):
    """Multiplier of --lr at each optimizer step."""
    total = args.train_iters
    warmup = args.lr_warmup_iters if args.lr_warmup_iters is not None else int(
        round(args.lr_warmup_fraction * total))
    floor = args.min_lr / args.lr if args.lr > 0 else 0.0

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if args.lr_decay_style == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if args.lr_decay_style == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * decay

    return f
