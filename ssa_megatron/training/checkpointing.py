"""Checkpoints: DeepSpeed engine state (model, ZeRO shards, LR scheduler) + our metadata.

Layout of ``--save DIR``::

    DIR/iter_0000100/          DeepSpeed's files for that step
        ssa_meta.json          iteration, consumed samples, args, model shape, tokenizer
        rng/rank_00000.pt      every rank's RNG states
    DIR/latest                 the tag of the newest *complete* checkpoint

``latest`` is written last, by rank 0, after a barrier that every rank reaches only once its
own files are on disk, through a temporary file and an atomic rename; a crash during a save
leaves the previous checkpoint in force.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ssa_megatron.model.config import ConfigError

LATEST = "latest"
META = "ssa_meta.json"
# Flags that fix the shapes of the weights; a checkpoint must agree with them to load.
SHAPE_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups", "kv_channels", "attention_mode")


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_latest(load_dir: str) -> Optional[str]:
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    return tag or None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    state["tracker"] = get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(engine, save_dir: str, iteration: int, consumed_samples: int, args,
                    data_description: dict, keep_last: Optional[int] = None,
                    fault_hook=None) -> str:
    """Save on every rank; returns the tag. ``fault_hook`` lets tests inject a crash."""
    tag = tag_for(iteration)
    rank = dist.get_rank() if dist.is_initialized() else 0
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(os.path.join(tag_dir, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(tag_dir, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        meta = {"iteration": iteration, "consumed_samples": consumed_samples,
                "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
                "data": data_description, "world_size": dist.get_world_size() if dist.is_initialized() else 1}
        _write_atomic(os.path.join(tag_dir, META), json.dumps(meta, indent=1, sort_keys=True))
    if fault_hook is not None:
        fault_hook(rank)
    if dist.is_initialized():
        dist.barrier()  # every rank's files are written
    if rank == 0:
        _write_atomic(os.path.join(save_dir, LATEST), tag)
        if keep_last:
            _prune(save_dir, keep_last, current=tag)
    if dist.is_initialized():
        dist.barrier()
    return tag


def _prune(save_dir: str, keep_last: int, current: str) -> None:
    tags = sorted(d for d in os.listdir(save_dir)
                  if d.startswith("iter_") and os.path.isdir(os.path.join(save_dir, d)))
    for tag in tags[:-keep_last]:
        if tag != current:
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def check_compatible(meta: dict, args, tag_dir: str) -> None:
    saved = meta.get("args", {})
    diffs = [f"--{k.replace('_', '-')} {saved[k]} (flags say {getattr(args, k)})"
             for k in SHAPE_FLAGS if k in saved and saved[k] != getattr(args, k)]
    if diffs:
        raise ConfigError(f"checkpoint {tag_dir} has a different model shape: "
                          + "; ".join(diffs) + " — match the flags or start a new --save dir")


def load_checkpoint(engine, load_dir: str, args):
    """Resume from ``latest``; returns (iteration, consumed_samples) or (0, 0) if none."""
    tag = read_latest(load_dir)
    if tag is None:
        return 0, 0
    tag_dir = os.path.join(load_dir, tag)
    meta_path = os.path.join(tag_dir, META)
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{load_dir}/latest names {tag}, but {meta_path} is missing: "
                          "the checkpoint is incomplete; point --load at a good one")
    with open(meta_path) as f:
        meta = json.load(f)
    check_compatible(meta, args, tag_dir)
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load {tag_dir}; is it a checkpoint of this layout?")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_path = os.path.join(tag_dir, "rng", f"rank_{rank:05d}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    return int(client_state["iteration"]), int(client_state["consumed_samples"])
