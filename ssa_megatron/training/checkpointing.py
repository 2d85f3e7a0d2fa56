"""Checkpoints: DeepSpeed engine state (model, ZeRO shards, LR scheduler) + our metadata.

Layout of ``--save DIR``::

    DIR/iter_0000100/          DeepSpeed's files for that step
        ssa_meta.json          iteration, consumed samples, args, model shape, tokenizer
        rng/rank_00000.pt      every rank's RNG states
        manifest.json          every file above with its size and sha256 (written last)
    DIR/latest                 the tag of the newest *complete* checkpoint
    DIR/run.lock               the run writing DIR (training/run_safety.py)

A save writes into ``DIR/iter_N.partial/``. Once every rank's files are on disk (a barrier), the
ranks checksum and fsync their share of the files, rank 0 writes ``manifest.json`` (temporary file,
fsync, rename), renames the directory to ``iter_N`` and only then points ``latest`` at it (again
temporary file + rename). A directory named ``iter_N`` is therefore complete by construction; a
crash at any moment leaves the previous ``latest`` in force, and ``*.partial`` directories are
removed by the next run that holds the lock. A write error on any rank (a full disk) is agreed on
by all ranks: the partial directory is removed, ``latest`` is left as it was, and the run stops with
one line (CheckpointError).

Loading (:func:`select_checkpoint`) verifies the manifest (sizes and checksums, each rank a share
of the files) and falls back to the newest intact checkpoint not newer than ``latest``, naming the
damaged one and the file at fault in one warning line; ``--load-iteration N`` asks for one. A
checkpoint saved before manifests existed is accepted unverified when ``latest`` names it.

*Weights-only* checkpoints (``"weights_only": true`` in ssa_meta.json; written by
tools/convert_checkpoint.py from-hf / relayout) hold one ``mp_rank_XX_model_states.pt`` per TP
rank and no optimizer: ``--load`` takes their weights and starts at iteration 0.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ssa_megatron.model.config import ConfigError

LATEST = "latest"
META = "ssa_meta.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ssa_megatron.checkpoint.manifest"
PARTIAL = ".partial"
TAG_PATTERN = re.compile(r"iter_(\d{7,})")
# ssa_meta.json "checkpoint_format": 2 = saved with a manifest (a missing one is then damage, not age)
CHECKPOINT_FORMAT = 2
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
    with open(path, errors="replace") as f:
        tag = f.read().strip()
    return tag or None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used or a save that failed; the message is one line."""


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def iteration_of(tag: str) -> Optional[int]:
    m = TAG_PATTERN.fullmatch(tag)
    return int(m.group(1)) if m else None


def list_tags(save_dir: str) -> List[str]:
    """Complete checkpoint directories (``iter_N``, not ``*.partial``), oldest first."""
    if not os.path.isdir(save_dir):
        return []
    tags = [d for d in os.listdir(save_dir)
            if iteration_of(d) is not None and os.path.isdir(os.path.join(save_dir, d))]
    return sorted(tags, key=iteration_of)


def _rank_world() -> Tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_rank0(obj):
    """Rank 0's ``obj`` on every rank (ranks must agree before any of them acts or exits)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def file_sha256(path: str, fsync: bool = False) -> str:
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())  # flushes what this node wrote into the file
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checkpoint_files(tag_dir: str) -> List[str]:
    files = []
    for root, _, names in os.walk(tag_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel != MANIFEST and ".tmp." not in name:
                files.append(rel.replace(os.sep, "/"))
    return sorted(files)


def write_manifest(tag_dir: str, iteration: int, collective: bool = True) -> None:
    """Checksum every file of ``tag_dir`` (each rank its share, fsynced) and write manifest.json
    on rank 0, last and atomically. ``collective``: all ranks call (else one process does it all)."""
    rank, world = _rank_world() if collective else (0, 1)
    files = _checkpoint_files(tag_dir) if rank == 0 else None
    if collective:
        files = broadcast_from_rank0(files)
    mine = {rel: {"size": os.path.getsize(os.path.join(tag_dir, rel)),
                  "sha256": file_sha256(os.path.join(tag_dir, rel), fsync=True)}
            for rel in files[rank::world]}
    entries: Dict[str, dict] = {}
    for part in (_gather(mine) if collective else [mine]):
        entries.update(part)
    if rank == 0:
        for sub in {os.path.dirname(rel) for rel in files}:
            fsync_dir(os.path.join(tag_dir, sub))
        manifest = {"format": MANIFEST_FORMAT, "version": 1, "iteration": iteration,
                    "files": {rel: entries[rel] for rel in files}}
        _write_atomic(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise ValueError("not an ssa_megatron manifest")
    return manifest


def _check_file(tag_dir: str, rel: str, entry: dict) -> Optional[str]:
    path = os.path.join(tag_dir, rel)
    if not os.path.isfile(path):
        return f"{rel} is missing"
    size = os.path.getsize(path)
    if size != entry.get("size"):
        return f"{rel} is {size} bytes, the manifest says {entry.get('size')}"
    if file_sha256(path) != entry.get("sha256"):
        return f"{rel} does not match its sha256 checksum (corrupt bytes)"
    return None


def verify_checkpoint(tag_dir: str, allow_unverified: bool = False,
                      collective: bool = False) -> Tuple[Optional[str], bool]:
    """(what is wrong with ``tag_dir`` or None, whether it was verified). A directory without a
    manifest passes unverified only when ``allow_unverified`` (saved before manifests existed).
    ``collective``: every rank checks its share of the files (all ranks must call)."""
    rank, world = _rank_world() if collective else (0, 1)
    if not os.path.isfile(os.path.join(tag_dir, MANIFEST)):
        try:
            with open(os.path.join(tag_dir, META)) as f:
                fmt = json.load(f).get("checkpoint_format", 1)
        except (OSError, ValueError, AttributeError):
            return f"it has no {MANIFEST} and no readable {META} (a save that did not finish)", False
        if fmt >= CHECKPOINT_FORMAT:
            return f"{MANIFEST} is missing", False
        if allow_unverified:
            return None, False
        return f"it has no {MANIFEST} (saved by an older version; not named by latest)", False
    try:
        files = read_manifest(tag_dir)["files"]
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})".replace("\n", " "), False
    names = sorted(files)
    mine = [p for p in (_check_file(tag_dir, rel, files[rel]) for rel in names[rank::world]) if p]
    problems = [p for part in (_gather(mine) if collective else [mine]) for p in part]
    return (problems[0] if problems else None), True


def _load_plan(load_dir: str, iteration: Optional[int]) -> dict:
    """Which tags to try, newest first, and what to say about ``latest``."""
    tags = list_tags(load_dir)
    notes: List[str] = []
    if iteration is not None:
        tag = tag_for(iteration)
        if tag not in tags:
            have = ", ".join(str(iteration_of(t)) for t in tags) or "none"
            return {"error": f"--load-iteration {iteration}: {load_dir} has no {tag} "
                             f"(iterations there: {have})"}
        return {"candidates": [tag], "explicit": True, "latest": read_latest(load_dir), "notes": notes}
    latest = None
    if os.path.isfile(os.path.join(load_dir, LATEST)):
        try:
            latest = read_latest(load_dir)
        except (OSError, UnicodeDecodeError):
            latest = None
        if latest not in tags:
            if not tags:
                return {"error": f"{load_dir}/latest names {latest!r}, but {load_dir} holds no "
                                 "checkpoint directory: restore them, or start over with --start-over"}
            notes.append(f"{load_dir}/latest names {latest!r}, which is not a checkpoint there; "
                         "looking for the newest intact one")
            latest = None
    if not tags:
        return {"candidates": [], "latest": latest, "notes": notes}
    limit = iteration_of(latest) if latest else None
    newer = [t for t in tags if limit is not None and iteration_of(t) > limit]
    if newer:
        notes.append(f"{', '.join(newer)} in {load_dir} are newer than latest ({latest}) and are not "
                     f"loaded; --load-iteration {iteration_of(newer[-1])} would load one")
    candidates = [t for t in reversed(tags) if t not in newer]
    return {"candidates": candidates, "latest": latest, "notes": notes}


def select_checkpoint(load_dir: str, iteration: Optional[int] = None,
                      collective: bool = False) -> Optional[Tuple[str, List[str]]]:
    """(tag to load, warning lines) or None when ``load_dir`` holds no checkpoint.

    Tries ``--load-iteration`` only, else ``latest`` and then older tags, verifying each; a damaged
    one is named with the file at fault. Raises CheckpointError (one line) when none is intact.
    ``collective``: all ranks call; rank 0 plans, every rank verifies a share of the files."""
    rank, _ = _rank_world() if collective else (0, 1)
    plan = _load_plan(load_dir, iteration) if rank == 0 else None
    if collective:
        plan = broadcast_from_rank0(plan)
    if plan.get("error"):
        raise CheckpointError(plan["error"])
    notes, damaged = list(plan["notes"]), []
    for tag in plan["candidates"]:
        legacy_ok = plan.get("explicit") or tag == plan["latest"]
        problem, verified = verify_checkpoint(os.path.join(load_dir, tag), allow_unverified=legacy_ok,
                                              collective=collective)
        if problem is None:
            if damaged:
                notes.append(f"checkpoint {'; '.join(damaged)}: loading {load_dir}/{tag} instead")
            if not verified:
                notes.append(f"{load_dir}/{tag} has no {MANIFEST} (saved by an older version): "
                             "loading it unverified")
            return tag, notes
        damaged.append(f"{load_dir}/{tag} is damaged: {problem}")
        if plan.get("explicit"):
            raise CheckpointError(f"{damaged[0]}; choose another --load-iteration")
    if not damaged:
        return None
    raise CheckpointError(f"no intact checkpoint in {load_dir}: {'; '.join(damaged)} — restore the "
                          "files, or start over with --start-over (moves them aside)")


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


@contextlib.contextmanager
def _catch_write_errors(engine, errors: List[str]):
    """DeepSpeed writes every file through ``engine.checkpoint_engine.save``: record an OSError
    (a full disk) instead of raising it, so that this rank still reaches the collectives the other
    ranks are in, and all ranks can agree that the save failed."""
    ce = engine.checkpoint_engine
    write = ce.save

    def save(state_dict, path, *a, **kw):
        if errors:
            return None  # this save has failed already; write nothing more
        try:
            return write(state_dict, path, *a, **kw)
        except OSError as err:
            errors.append(f"{path}: {err.strerror or err}")
    own = vars(ce).get("save")
    ce.save = save
    try:
        yield
    finally:
        if own is None:
            del ce.save  # the class's method again
        else:
            ce.save = own


def _first_error(errors: List[str]) -> Optional[str]:
    found = [e for part in _gather(errors[:1]) for e in part]
    return found[0] if found else None


def save_checkpoint(engine, save_dir: str, iteration: int, consumed_samples: int, args,
                    data_description: dict, keep_last: Optional[int] = None,
                    fault_hook=None) -> str:
    """Save on every rank; returns the tag. ``fault_hook(rank)`` runs once this rank's files are
    written (tests inject crashes there). Raises CheckpointError on every rank if a write failed
    anywhere; the previous checkpoint and ``latest`` are then untouched."""
    tag = tag_for(iteration)
    partial_tag = tag + PARTIAL
    rank, world = _rank_world()
    tag_dir = os.path.join(save_dir, tag)
    partial_dir = os.path.join(save_dir, partial_tag)
    previous = read_latest(save_dir)
    if rank == 0 and os.path.isdir(partial_dir):
        shutil.rmtree(partial_dir)  # left over from a save that did not finish
    if dist.is_initialized():
        dist.barrier()
    errors: List[str] = []
    client_state = {"iteration": iteration, "consumed_samples": consumed_samples}
    with _catch_write_errors(engine, errors):
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
            meta = {"iteration": iteration, "consumed_samples": consumed_samples,
                    "checkpoint_format": CHECKPOINT_FORMAT,
                    "args": {k: v for k, v in vars(args).items() if _jsonable(v)},
                    "data": data_description, "world_size": world,
                    "padded_vocab_size": _padded_vocab(engine),
                    "zero_stage": engine.zero_optimization_stage()}
            _write_atomic(path, json.dumps(meta, indent=1, sort_keys=True))
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
                _write_atomic(os.path.join(save_dir, LATEST), tag)
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
    from ssa_megatron.model.options import WEIGHT_OPTIONS, model_options
    had, want = model_options(saved), model_options(args)  # missing in older checkpoints: defaults
    diffs += [f"--{k.replace('_', '-')} {had[k]} (flags say {want[k]})" for k in WEIGHT_OPTIONS
              if had[k] != want[k]]
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


def _deepspeed_load(engine, load_dir: str, tag: str, **kw):
    """engine.load_checkpoint with any failure to read the files as one CheckpointError line."""
    try:
        return engine.load_checkpoint(load_dir, tag=tag, **kw)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"cannot read checkpoint {load_dir}/{tag} ({type(err).__name__}: "
                              f"{first}); choose another with --load-iteration N") from None


def load_checkpoint(engine, load_dir: str, args):
    """Resume from the newest intact checkpoint (or ``args.load_iteration``); returns
    (iteration, consumed_samples), or (0, 0) if ``load_dir`` holds none. All ranks call."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    chosen = select_checkpoint(load_dir, getattr(args, "load_iteration", None), collective=True)
    if chosen is None:
        return 0, 0
    tag, notes = chosen
    if rank == 0:
        for note in notes:
            print(f"warning: {note}", flush=True)
    tag_dir = os.path.join(load_dir, tag)
    meta_path = os.path.join(tag_dir, META)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {meta_path} ({err}); choose another checkpoint with "
                              "--load-iteration N") from None
    check_compatible(meta, args, tag_dir, _padded_vocab(engine))
    from ssa_megatron.model.options import rope_change_note
    note = rope_change_note(meta.get("args", {}), args)
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
