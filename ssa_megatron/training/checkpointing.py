"""Checkpoints: DeepSpeed engine state (model, ZeRO shards, LR scheduler) + our metadata.

Layout of ``--save DIR``::

    DIR/iter_0000100/          DeepSpeed's files for that step
        ssa_meta.json          iteration, consumed samples, args, model shape, tokenizer
        rng/rank_00000.pt      every rank's RNG states
    DIR/latest                 the tag of the newest *complete* checkpoint

``latest`` is written last, by rank 0, after a barrier that every rank reaches only once its
own files are on disk, through a temporary file and an atomic rename; a crash during a save
leaves the previous checkpoint in force (a half-written tag directory is removed when that
iteration is saved again). Saving the iteration ``latest`` already names is a no-op.

*Weights-only* checkpoints (``"weights_only": true`` in ssa_meta.json; written by
tools/convert_checkpoint.py from-hf / relayout) hold one ``mp_rank_XX_model_states.pt`` per TP
rank and no optimizer: ``--load`` takes their weights and starts at iteration 0.
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
# Flags whose files must match one to one (per-rank model/optimizer files).
LAYOUT_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")


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
    tag_dir = os.path.join(save_dir, tag)
    if read_latest(save_dir) == tag:
        return tag  # this iteration is saved and complete already (e.g. stop signal after a save)
    if rank == 0 and os.path.isdir(tag_dir):
        shutil.rmtree(tag_dir)  # left over from a save that did not finish
    if dist.is_initialized():
        dist.barrier()
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    os.makedirs(os.path.join(tag_dir, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(tag_dir, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        meta = {"iteration": iteration, "consumed_samples": consumed_samples,
                "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
                "data": data_description, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "padded_vocab_size": _padded_vocab(engine), "zero_stage": engine.zero_optimization_stage()}
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


def _padded_vocab(engine) -> Optional[int]:
    """Rows of the whole (TP-merged) word embedding of the engine's model, if it has one."""
    from megatron.core import parallel_state as ps
    for name, p in engine.module.named_parameters():
        if name.endswith("word_embeddings.weight"):
            rows = getattr(p, "ds_shape", p.shape)[0]  # ZeRO-3 keeps the real shape in ds_shape
            return int(rows) * ps.get_tensor_model_parallel_world_size()
    return None


def _prune(save_dir: str, keep_last: int, current: str) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (by iteration), never ``current``."""
    tags = sorted((d for d in os.listdir(save_dir)
                   if d.startswith("iter_") and os.path.isdir(os.path.join(save_dir, d))
                   and d[5:].isdigit()), key=lambda d: int(d[5:]))
    cur = int(current[5:])
    for tag in tags[:-keep_last]:
        if tag != current and int(tag[5:]) < cur:
            shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def check_compatible(meta: dict, args, tag_dir: str, padded_vocab: Optional[int] = None) -> None:
    """Refuse, with one line, a checkpoint whose weights do not fit the model the flags build."""
    saved = meta.get("args", {})
    flags = SHAPE_FLAGS if not meta.get("weights_only") else tuple(f for f in SHAPE_FLAGS
                                                                     if f != "attention_mode")
    diffs = [f"--{k.replace('_', '-')} {saved[k]} (flags say {getattr(args, k)})"
             for k in flags if k in saved and saved[k] != getattr(args, k, None)]
    if padded_vocab is not None and meta.get("padded_vocab_size") not in (None, padded_vocab):
        diffs.append(f"vocabulary (padded) {meta['padded_vocab_size']} (the data's tokenizer gives "
                     f"{padded_vocab})")
    if diffs:
        raise ConfigError(f"checkpoint {tag_dir} has a different model shape: "
                          + "; ".join(diffs) + " — match the flags or start a new --save dir")
    layout = [f"--{k.replace('_', '-')} {saved[k]} (flags say {getattr(args, k)})"
              for k in LAYOUT_FLAGS if k in saved and saved[k] != getattr(args, k, None)]
    if layout:
        raise ConfigError(f"checkpoint {tag_dir} was saved with another parallel layout: "
                          + "; ".join(layout) + " — use the same layout, or convert it with "
                          "tools/convert_checkpoint.py relayout")


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
    check_compatible(meta, args, tag_dir, _padded_vocab(engine))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if meta.get("weights_only"):
        if engine.zero_optimization_stage() == 3:
            raise ConfigError(f"{tag_dir} holds weights only (a converted checkpoint), which ZeRO-3 "
                              "cannot load; start from it with ZeRO stage 0-2")
        path, _ = engine.load_checkpoint(load_dir, tag=tag, load_module_only=True,
                                         load_optimizer_states=False, load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"DeepSpeed could not load {tag_dir}; is it a checkpoint of this layout?")
        if rank == 0:
            print(f"loaded weights-only checkpoint {tag_dir} ({meta.get('source') or 'converted'}); "
                  "fresh optimizer, iteration 0", flush=True)
        return 0, 0
    saved_world = meta.get("world_size")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if engine.zero_optimization_stage() > 0 and saved_world not in (None, world):
        raise ConfigError(f"{tag_dir} holds ZeRO optimizer shards of {saved_world} processes, this run "
                          f"has {world}: resume with {saved_world} processes, or continue from its weights "
                          "with a fresh optimizer: tools/convert_checkpoint.py relayout --input "
                          f"{load_dir} --output NEW_DIR --tensor-model-parallel-size "
                          f"{args.tensor_model_parallel_size}, then --load NEW_DIR")
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load {tag_dir}; is it a checkpoint of this layout?")
    rng_path = os.path.join(tag_dir, "rng", f"rank_{rank:05d}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    return int(client_state["iteration"]), int(client_state["consumed_samples"])
