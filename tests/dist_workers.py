"""Entry points run by tests/dist_utils.run_workers on every rank."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def _save(out_dir, obj):
    if dist.get_rank() == 0:
        torch.save(obj, os.path.join(out_dir, "result.pt"))


def grads(out_dir, tp, gas):
    """Loss, per-layer alignment loss and full (gathered) gradients of a tiny model."""
    from megatron.core import parallel_state as ps

    from model_utils import build_tiny_model, ce_loss, full_grads, random_batches, tiny_args
    from ssa_megatron.model import draw_mode
    from ssa_megatron.model.align_loss import AlignLossAutoScaler, AlignLossLoggingHelper
    from ssa_megatron.training.distributed import init_distributed
    tp, gas = int(tp), int(gas)
    args = tiny_args("--tensor-model-parallel-size", str(tp), "--ssa-align-coef", "100")
    init_distributed(tp, 1, seed=args.seed)
    model = build_tiny_model(args)
    AlignLossLoggingHelper.tracker.configure(args.num_layers)
    AlignLossAutoScaler.set_loss_scale(1.0 / gas)
    losses = []
    for i, batch in enumerate(random_batches(gas)):
        loss = ce_loss(model, batch, branch=draw_mode(args.seed, 0, i))
        (loss / gas).backward()
        losses.append(float(loss))
    per_layer = AlignLossLoggingHelper.tracker.per_layer(tp_group=ps.get_tensor_model_parallel_group(),
                                          dp_group=ps.get_data_parallel_group())
    _save(out_dir, {"losses": losses, "align_per_layer": per_layer, "grads": full_grads(model)})


def train(out_dir, *argv):
    """pretrain.run() with the given flags; saves the per-iteration record and final weights."""
    from ssa_megatron.training.arguments import parse_args
    from ssa_megatron.training.pretrain import run
    result = run(parse_args(list(argv)))
    result.pop("engine")
    _save(out_dir, dict(result))


if __name__ == "__main__":
    name, out = sys.argv[1], sys.argv[2]
    if ":" in name:  # "module:function" from another worker file
        import importlib
        module, func = name.split(":")
        getattr(importlib.import_module(module), func)(out, *sys.argv[3:])
    else:
        globals()[name](out, *sys.argv[3:])
    from ssa_megatron.training.distributed import destroy_distributed
    destroy_distributed(barrier=True)
