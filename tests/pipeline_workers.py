"""Workers for the pipeline tests: train, then report losses, first-step grads, final weights."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def train_and_gather(out_dir, *argv):
    from model_utils import gather_full
    from ssa_megatron.training.arguments import parse_args
    from ssa_megatron.training.pretrain import run
    args = parse_args(list(argv))
    first_grads = {}

    def before_step(engine, iteration):
        if iteration == 0:
            first_grads.update(gather_full(engine.module, pick=lambda p: p.grad))

    result = run(args, before_step=before_step)
    engine = result.pop("engine")
    weights = gather_full(engine.module)
    if dist.get_rank() == 0:
        torch.save({**result, "first_grads": first_grads, "weights": weights},
                   os.path.join(out_dir, "result.pt"))
