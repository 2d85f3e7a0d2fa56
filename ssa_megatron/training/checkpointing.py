"""Checkpoints of a training run: the DeepSpeed engine's state (model, ZeRO shards, LR scheduler),
every rank's RNG states and our metadata, saved and loaded safely. The files and their names,
the manifest, ``latest`` and how a checkpoint is found and verified belong to
training/checkpoint_format.py (which the converter uses too).

A save writes into ``DIR/iter_N.partial/``. Once every rank's files are on disk (a barrier), the
ranks checksum and fsync their share of the files, rank 0 writes ``manifest.json`` (temporary file,
fsync, rename), renames the directory to ``iter_N`` and only then points ``latest`` at it (again
temporary file + rename). A directory named ``iter_N`` is therefore complete by construction; a
crash at any moment leaves the previous ``latest`` in force, and ``*.partial`` directories are
removed by the next run that holds the lock. A write error on any rank (a full disk) is agreed on
by all ranks: the partial directory is removed, ``latest`` is left as it was, and the run stops with
one line (CheckpointError).

Loading (:func:`load_checkpoint`) takes the newest intact checkpoint not newer than ``latest``
(checkpoint_format.select_checkpoint names a damaged one and the file at fault in one warning
line); ``--load-iteration N`` asks for one. A *weights-only* checkpoint (written by
tools/convert_checkpoint.py from-hf / relayout) gives its weights and starts at iteration 0.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from typing import List, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

from ssa_megatron import engine_patches
from ssa_megatron.errors import ConfigError
from ssa_megatron.model.shape import OPTIONS, shape_fields
from ssa_megatron.training.checkpoint_format import (CHECKPOINT_FORMAT, LATEST, META, PARTIAL, CheckpointError,
                                                     broadcast_from_rank0, fsync_dir, gather, iteration_of,
                                                     list_tags, rank_world, read_latest, read_meta,
                                                     select_checkpoint, tag_for, write_latest, write_manifest,
                                                     write_meta)

# Flags that fix the shapes of the weights; a checkpoint must agree with them to load (the
# options among them, missing from older checkpoints, are compared with their defaults).
SHAPE_FLAGS = tuple(name for name in shape_fields(weights=True)
                    if name not in shape_fields(OPTIONS))
# Flags whose files must match one to one (per-rank model/optimizer files).
LAYOUT_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")


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


def _first_error(errors: List[str]) -> Optional[str]:
    found = [e for part in gather(errors[:1]) for e in part]
    return found[0] if found else None


def save_checkpoint(engine, save_dir: str, iteration: int, consumed_samples: int, args,
                    data_description: dict, keep_last: Optional[int] = None,
                    fault_hook=None) -> str:
    """Save on every rank; returns the tag. ``fault_hook(rank)`` runs once this rank's files are
    written (tests inject crashes there). Raises CheckpointError on every rank if a write failed
    anywhere; the previous checkpoint and ``latest`` are then untouched."""
    tag = tag_for(iteration)
    partial_tag = tag + PARTIAL
    rank, world = rank_world()
    tag_dir = os.path.join(save_dir, tag)
    partial_dir = os.path.join(save_dir, partial_tag)
    previous = read_latest(save_dir)
    if rank == 0 and os.path.isdir(partial_dir):
        shutil.rmtree(partial_dir)  # left over from a save that did not finish
    if dist.is_initialized():
        dist.barrier()
    errors: List[str] = []
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples}
    with engine_patches.checkpoint_write_errors_recorded(engine, errors):
        try:
            engine.save_checkpoint(save_dir, tag=partial_tag, client_state=client_state,
                                   save_latest=False)
        except OSError as err:
            errors.append(f"{partial_dir}: {err.strerror or err}")
    path = os.path.join(partial_dir, "rng", f"rank_{rank:05d}.pt")
    try:
        if not errors:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(rng_state(), path)
        if rank == 0 and not errors:
            path = os.path.join(partial_dir, META)
            write_meta(partial_dir, {
                "iteration": iteration, "consumed_samples": consumed_samples,
                "checkpoint_format": CHECKPOINT_FORMAT,
                "args": {k: v for k, v in vars(args).items() if _jsonable(v) and not k.startswith("_")},
                "data": data_description, "world_size": world,
                "padded_vocab_size": _padded_vocab(engine),
                "zero_stage": engine.zero_optimization_stage()})
    except OSError as err:
        errors.append(f"{path}: {err.strerror or err}")
    if fault_hook is not None:
        fault_hook(rank)
    error = _first_error(errors)  # collective: every rank's files are written (or failed)
    if error is None:
        write_manifest(partial_dir, iteration)
        if rank == 0:
            try:
                if os.path.isdir(tag_dir):
                    # a complete checkpoint of this iteration from an earlier attempt (one newer
                    # than `latest`, or damaged): never deleted, only renamed
                    aside = f"{tag_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                    os.rename(tag_dir, aside)
                    print(f"note: moved the earlier {tag_dir} aside to {aside}", flush=True)
                os.rename(partial_dir, tag_dir)
                fsync_dir(save_dir)
                write_latest(save_dir, tag)
            except OSError as err:
                error = f"{getattr(err, 'filename', None) or save_dir}: {err.strerror or err}"
        error = broadcast_from_rank0(error)
    if error is not None:
        if rank == 0:
            shutil.rmtree(partial_dir, ignore_errors=True)
        kept = (f"{save_dir}/{LATEST} still names {previous}, which is intact" if previous else
                f"{save_dir} has no earlier checkpoint")
        if dist.is_initialized():
            dist.barrier()
        raise CheckpointError(f"saving {tag_dir} failed ({error}); {kept}. Free space (df -h "
                              f"{save_dir}) and rerun the same command to resume")
    if rank == 0 and keep_last:
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
    """Keep the newest ``keep_last`` complete checkpoints up to ``current`` (by iteration). Ones
    newer than ``current`` belong to a timeline this run left (it resumed from an older one, e.g.
    ``--load-iteration``): they neither count nor go, so the checkpoint the run resumed from is
    not deleted to make room for them."""
    tags = [tag for tag in list_tags(save_dir) if iteration_of(tag) <= iteration_of(current)]
    for tag in tags[:-keep_last]:
        if tag != current:
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
    from ssa_megatron.model.shape import shape_default
    # a switch missing from an older checkpoint's args (or these flags) is off: its default
    switches = {k: shape_default(k) for k in flags if isinstance(shape_default(k), bool)}
    saved = dict(switches, **saved)
    diffs = [f"--{k.replace('_', '-')} {saved[k]} (flags say {getattr(args, k, switches.get(k))})"
             for k in flags if k in saved and saved[k] != getattr(args, k, switches.get(k))]
    from ssa_megatron.model.options import WEIGHT_OPTIONS, model_options
    had, want = model_options(saved), model_options(args)  # missing in older checkpoints: defaults
    diffs += [f"--{k.replace('_', '-')} {had[k]} (flags say {want[k]})" for k in WEIGHT_OPTIONS
              if had[k] != want[k]]
    if padded_vocab is not None and meta.get("padded_vocab_size") not in (None, padded_vocab):
        diffs.append(f"vocabulary (padded) {meta['padded_vocab_size']} (the data's tokenizer gives "
                     f"{padded_vocab})")
    if diffs:
        fix = ("pass the model flags tools/convert_checkpoint.py from-hf printed for it (they are in "
               "its ssa_meta.json 'args')" if meta.get("weights_only") else
               "match the flags or start a new --save dir")
        raise ConfigError(f"checkpoint {tag_dir} has a different model shape: "
                          + "; ".join(diffs) + f" — {fix}")
    layout = [f"--{k.replace('_', '-')} {saved[k]} (flags say {getattr(args, k)})"
              for k in LAYOUT_FLAGS if k in saved and saved[k] != getattr(args, k, None)]
    if layout:
        raise ConfigError(f"checkpoint {tag_dir} was saved with another parallel layout: "
                          + "; ".join(layout) + " — use the same layout, or convert it with "
                          "tools/convert_checkpoint.py relayout")


def _deepspeed_load(engine, load_dir: str, tag: str, **kw):
    """engine.load_checkpoint with any failure to read the files as one CheckpointError line."""
    try:
        return engine.load_checkpoint(load_dir, tag=tag, **kw)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"cannot read checkpoint {load_dir}/{tag} ({type(err).__name__}: "
                              f"{first}); choose another with --load-iteration N") from None


_NOT_CHOSEN = object()  # load_checkpoint's default: choose the checkpoint itself


class ChosenCheckpoint(NamedTuple):
    """The checkpoint a resume loads: its tag, warning lines about the choice, its ssa_meta.json."""
    tag: str
    notes: List[str]
    meta: dict


def choose_checkpoint(load_dir: str, args) -> Optional[ChosenCheckpoint]:
    """The checkpoint a resume from ``load_dir`` loads (``--load-iteration``, else the newest
    intact one, its files verified, its ssa_meta.json read once), or None. All ranks call."""
    picked = select_checkpoint(load_dir, getattr(args, "load_iteration", None), collective=True)
    if picked is None:
        return None
    tag, notes = picked
    try:
        meta = read_meta(os.path.join(load_dir, tag))
    except CheckpointError as err:
        raise CheckpointError(f"{err}; choose another checkpoint with --load-iteration N") from None
    return ChosenCheckpoint(tag, notes, meta)


def refuse_data_of_another_tokenizer(load_dir: str, args, data_description: dict, chosen) -> None:
    """Before the model is built: a ConfigError when the checkpoint ``chosen`` in ``load_dir``
    (:func:`choose_checkpoint`) is an imported model (weights only) whose tokenizer is not the one
    the training data was made with, unless ``--allow-tokenizer-change``. A resumed run of our own
    is never refused."""
    from ssa_megatron.training.resume_notes import imported_tokenizer_error
    if getattr(args, "allow_tokenizer_change", False) or chosen is None:
        return
    mismatch = imported_tokenizer_error(chosen.meta.get("data"), data_description)
    if mismatch and chosen.meta.get("weights_only"):
        raise ConfigError(f"{os.path.join(load_dir, chosen.tag)}: {mismatch}")


def load_checkpoint(engine, load_dir: str, args, data_description: Optional[dict] = None,
                    chosen=_NOT_CHOSEN):
    """Resume from the newest intact checkpoint (or ``args.load_iteration``), or from ``chosen``
    when :func:`choose_checkpoint` has picked it already (its files are verified once); returns
    (iteration, consumed_samples), or (0, 0) if ``load_dir`` holds none. All ranks call."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if chosen is _NOT_CHOSEN:
        chosen = choose_checkpoint(load_dir, args)
    if chosen is None:
        return 0, 0
    tag, notes, meta = chosen
    if rank == 0:
        for note in notes:
            print(f"warning: {note}", flush=True)
    tag_dir = os.path.join(load_dir, tag)
    check_compatible(meta, args, tag_dir, _padded_vocab(engine))
    from ssa_megatron.model.options import rope_change_note
    from ssa_megatron.training.resume_notes import data_change_note, schedule_change_note
    from ssa_megatron.training.ssa_recipe import recipe_change_note
    saved_args = meta.get("args", {})
    notes = [rope_change_note(saved_args, args)]
    if not meta.get("weights_only"):  # a converted model starts training here: nothing to keep
        notes += [recipe_change_note(saved_args, args), schedule_change_note(saved_args, args)]
    if data_description is not None:
        notes.append(data_change_note(meta.get("data"), data_description))
    for note in notes:
        if note and rank == 0:
            print(note, flush=True)
    if meta.get("weights_only"):
        if engine.zero_optimization_stage() == 3:
            raise ConfigError(f"{tag_dir} holds weights only (a converted checkpoint), which ZeRO-3 "
                              "cannot load; start from it with ZeRO stage 0-2")
        path, _ = _deepspeed_load(engine, load_dir, tag, load_module_only=True,
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
    path, client_state = _deepspeed_load(engine, load_dir, tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
    if path is None:
        raise ConfigError(f"DeepSpeed could not load {tag_dir}; is it a checkpoint of this layout?")
    rng_path = os.path.join(tag_dir, "rng", f"rank_{rank:05d}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    return int(client_state["iteration"]), int(client_state["consumed_samples"])
