"""NSA worker for tests/dist_utils.run_workers("nsa_workers:nsa_grads", ...)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def nsa_grads(out_dir, tp):
    """Losses and TP-gathered gradients of a tiny nsa-mode model over two micro-batches: one
    plain, one with documents packed across the flattened batch (cu_seqlens)."""
    from model_utils import build_tiny_model, ce_loss, full_grads, random_batches, tiny_args
    from ssa_megatron.model.runtime import packed_documents
    from ssa_megatron.training.distributed import init_distributed
    tp = int(tp)
    args = tiny_args("--tensor-model-parallel-size", str(tp), "--attention-mode", "nsa",
                     "--nsa-window-size", "24")
    init_distributed(tp, 1, seed=args.seed)
    model = build_tiny_model(args)
    losses = []
    packs = [None, torch.tensor([0, 40, 70, 128], dtype=torch.int32)]
    for batch, cu in zip(random_batches(2), packs):
        loss = ce_loss(model, batch, None if cu is None else packed_documents(cu, args.seq_length))
        (loss / 2).backward()
        losses.append(float(loss.detach()))
    grads = full_grads(model)  # collective: every rank
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "grads": grads}, os.path.join(out_dir, "result.pt"))
