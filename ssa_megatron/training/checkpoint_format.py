"""The checkpoint format: the one owner of the files a ``--save`` directory holds, how they are
named, written, verified, found and read. Training (training/checkpointing.py: the DeepSpeed
engine's save and load) and the converter (convert/megatron_ckpt.py) both go through it.

Layout of ``--save DIR``::

    DIR/iter_0000100/          DeepSpeed's files for that step (below)
        ssa_meta.json          iteration, consumed samples, args (the flags, with the model's
                               shape: model/shape.py), tokenizer, padded vocabulary
        rng/rank_00000.pt      every rank's RNG states
        manifest.json          every file above with its size and sha256 (written last)
    DIR/latest                 the tag of the newest *complete* checkpoint
    DIR/run.lock               the run writing DIR (training/run_safety.py)

DeepSpeed's model files in a tag directory, by layout:

* ``mp_rank_XX_model_states.pt`` - PP = 1, ZeRO 0/1/2: ``module`` holds TP rank XX's weights;
* ``zero_pp_rank_D_mp_rank_XX_model_states.pt`` + ``*_optim_states.pt`` without ``module``
  weights - ZeRO-3: DeepSpeed's zero_to_fp32 rebuilds each TP rank's fp32 weights;
* ``layer_LL-model_XX-model_states.pt`` - a DeepSpeed ``PipelineModule`` (PP > 1): layer LL of
  the pipe list, TP rank XX, named by :func:`ssa_megatron.model.pipeline.gpt_model_name`.

*Weights-only* checkpoints (``"weights_only": true`` in ssa_meta.json, written by
:func:`write_weights_only`) hold one ``mp_rank_XX_model_states.pt`` per TP rank and no optimizer.

Verification (:func:`verify_checkpoint`, :func:`select_checkpoint`): the manifest's sizes and
checksums, each rank a share of the files; a checkpoint saved before manifests existed
(``checkpoint_format`` 1) is accepted unverified when ``latest`` names it. Every problem is a
:class:`CheckpointError` whose message is one line.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ssa_megatron.data.tokenizer import file_sha256
from ssa_megatron.errors import ConfigError

LATEST = "latest"
META = "ssa_meta.json"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ssa_megatron.checkpoint.manifest"
PARTIAL = ".partial"
DIAGNOSTICS = "diagnostics.jsonl"  # the run's attention diagnostics, when not sent elsewhere
TAG_PATTERN = re.compile(r"iter_(\d{7,})")
# ssa_meta.json "checkpoint_format": 2 = saved with a manifest (a missing one is then damage, not age)
CHECKPOINT_FORMAT = 2
# DeepSpeed's model files (see the module docstring)
MODEL_STATES = "mp_rank_{:02d}_model_states.pt"
ANY_MODEL_STATES = "*model_states.pt"
PLAIN_MODEL_STATES = "mp_rank_*_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_*_mp_rank_*_model_states.pt"
PIPE_MODEL_STATES = "layer_*-model_*-model_states.pt"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used or a save that failed; the message is one line."""


# ---------------------------------------------------------------------------------------------
# names: tags, latest


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


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


def read_latest(load_dir: str) -> Optional[str]:
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, errors="replace") as f:
        tag = f.read().strip()
    return tag or None


def write_latest(save_dir: str, tag: str) -> None:
    """Point ``latest`` at ``tag`` (atomically: temporary file, fsync, rename)."""
    write_atomic(os.path.join(save_dir, LATEST), tag)


def write_atomic(path: str, text: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# ssa_meta.json


def write_meta(tag_dir: str, meta: dict) -> None:
    write_atomic(os.path.join(tag_dir, META), json.dumps(meta, indent=1, sort_keys=True))


RELAYOUT_SOURCE = "relayout of "  # how the "source" of a relayout's metadata begins


def is_relayout(meta: dict) -> bool:
    """Whether a weights-only checkpoint is a relayout of one of our runs (its training goes on
    there) rather than an imported model (a new run starts there)."""
    return str(meta.get("source", "")).startswith(RELAYOUT_SOURCE)


def read_meta(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, META)
    if not os.path.isfile(path):
        raise CheckpointError(f"{tag_dir} has no {META}: not a complete ssa_megatron checkpoint "
                              "(a save that did not finish, or another program's checkpoint)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} ({err})") from None


# ---------------------------------------------------------------------------------------------
# collectives (all ranks take part; a lone process does it all)


def rank_world() -> Tuple[int, int]:
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


def gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# manifest.json and verification


def _synced_sha256(path: str) -> str:
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # flushes what this node wrote into the file
    return file_sha256(path)


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
    rank, world = rank_world() if collective else (0, 1)
    files = _checkpoint_files(tag_dir) if rank == 0 else None
    if collective:
        files = broadcast_from_rank0(files)
    mine = {rel: {"size": os.path.getsize(os.path.join(tag_dir, rel)),
                  "sha256": _synced_sha256(os.path.join(tag_dir, rel))}
            for rel in files[rank::world]}
    entries: Dict[str, dict] = {}
    for part in (gather(mine) if collective else [mine]):
        entries.update(part)
    if rank == 0:
        for sub in {os.path.dirname(rel) for rel in files}:
            fsync_dir(os.path.join(tag_dir, sub))
        manifest = {"format": MANIFEST_FORMAT, "version": 1, "iteration": iteration,
                    "files": {rel: entries[rel] for rel in files}}
        write_atomic(os.path.join(tag_dir, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


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
    rank, world = rank_world() if collective else (0, 1)
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
    problems = [p for part in (gather(mine) if collective else [mine]) for p in part]
    return (problems[0] if problems else None), True


# ---------------------------------------------------------------------------------------------
# finding the checkpoint to load


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
    rank, _ = rank_world() if collective else (0, 1)
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


def resolve_tag_dir(path: str, tag: Optional[str] = None, warn: Optional[Callable] = None) -> str:
    """The tag directory to read, verified against its manifest the way training loads it:
    ``path/tag``, ``path`` itself (both must be intact), or the newest intact checkpoint of a
    --save directory (a damaged newer one is named in a warning line). ``warn`` gets the warning
    lines (default: stderr)."""
    import sys
    warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if tag:
        d = os.path.join(path, tag)
        if not os.path.isdir(d):
            raise CheckpointError(f"{path} has no checkpoint {tag}")
    elif os.path.isfile(os.path.join(path, META)) or glob.glob(os.path.join(path, ANY_MODEL_STATES)):
        d = path
    else:
        chosen = select_checkpoint(path)
        if chosen is None:
            raise CheckpointError(f"{path} is neither a checkpoint tag directory nor a --save directory "
                                  "with a checkpoint in it; pass the directory training saved to")
        for line in chosen[1]:
            warn(line)
        return os.path.join(path, chosen[0])
    problem, verified = verify_checkpoint(d, allow_unverified=True)
    if problem is not None:
        raise CheckpointError(f"checkpoint {d} is damaged: {problem}; pick another --tag")
    if not verified:
        warn(f"{d} has no manifest.json (saved by an older version): reading it unverified")
    return d


# ---------------------------------------------------------------------------------------------
# DeepSpeed's model files


def is_weight_key(name: str) -> bool:
    """State-dict entries that are weights (not megatron's ``_extra_state`` / RoPE buffers)."""
    return not name.endswith("_extra_state") and "rotary_pos_emb" not in name and "inv_freq" not in name


def _torch_load(path: str) -> dict:
    # DeepSpeed's own files are pickles (configs, scheduler state): trusted training output.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read {path} ({type(err).__name__}: {first})") from None


def _mp_rank(name: str) -> int:
    return int(re.search(r"mp_rank_(\d+)", name).group(1))


def _zero3_rank_weights(tag_dir: str, mp_rank: int) -> Dict[str, torch.Tensor]:
    """fp32 weights of one TP rank of a ZeRO-3 checkpoint through DeepSpeed's zero_to_fp32."""
    from deepspeed.utils import zero_to_fp32
    files = glob.glob(os.path.join(tag_dir, f"*mp_rank_{mp_rank:02d}_*states.pt"))
    with tempfile.TemporaryDirectory() as tmp:  # zero_to_fp32 globs a whole tag directory
        os.makedirs(os.path.join(tmp, "tag"))
        for f in files:
            os.symlink(os.path.abspath(f), os.path.join(tmp, "tag", os.path.basename(f)))
        sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(tmp, tag="tag")
    return {k: v for k, v in sd.items() if is_weight_key(k)}


def _read_pipeline(tag_dir: str) -> List[Dict[str, torch.Tensor]]:
    from ssa_megatron.model.pipeline import gpt_model_name
    files = glob.glob(os.path.join(tag_dir, PIPE_MODEL_STATES))
    ranks = sorted({int(re.search(r"-model_(\d+)-", os.path.basename(f)).group(1)) for f in files})
    shards = []
    for r in ranks:
        sd = {}
        for f in sorted(glob.glob(os.path.join(tag_dir, f"layer_*-model_{r:02d}-model_states.pt"))):
            index = int(re.search(r"layer_(\d+)-", os.path.basename(f)).group(1))
            for key, t in _torch_load(f).items():
                name = gpt_model_name(index, key)
                if name is not None and is_weight_key(name) and torch.is_tensor(t):
                    sd[name] = t
        shards.append(sd)
    return shards


def read_model_shards(tag_dir: str) -> List[Dict[str, torch.Tensor]]:
    """Each TP rank's weights ({GPTModel name: tensor}, rank order) of a checkpoint of any layout
    (PP, ZeRO 0-3; see the module docstring)."""
    pipe = glob.glob(os.path.join(tag_dir, PIPE_MODEL_STATES))
    plain = sorted(glob.glob(os.path.join(tag_dir, PLAIN_MODEL_STATES)), key=_mp_rank)
    zero3 = glob.glob(os.path.join(tag_dir, ZERO3_MODEL_STATES))
    if pipe:
        return _read_pipeline(tag_dir)
    if plain:
        shards = [{k: v for k, v in (_torch_load(f)["module"] or {}).items()
                   if is_weight_key(k) and torch.is_tensor(v)} for f in plain]
        if any(not sd or any(v.numel() == 0 for v in sd.values()) for sd in shards) and zero3:
            shards = [_zero3_rank_weights(tag_dir, _mp_rank(f)) for f in plain]
        return shards
    if zero3:
        ranks = sorted({_mp_rank(os.path.basename(f)) for f in zero3})
        return [_zero3_rank_weights(tag_dir, r) for r in ranks]
    raise CheckpointError(f"{tag_dir} holds no DeepSpeed model files ({ANY_MODEL_STATES})")


def write_weights_only(save_dir: str, shards: List[Dict[str, torch.Tensor]], meta: dict,
                       progress=None) -> str:
    """A weights-only checkpoint of ``shards`` (one per TP rank) in the empty ``save_dir``: tag
    ``iter_0000000`` with one DeepSpeed ``mp_rank_XX_model_states.pt`` per rank (what
    ``engine.load_checkpoint(load_module_only=True)`` reads), ``meta`` (``weights_only``, iteration
    0 and the format added), its manifest and ``latest``. Returns the tag."""
    tag, tp = tag_for(0), len(shards)
    tag_dir = os.path.join(save_dir, tag)
    os.makedirs(tag_dir)
    ranks = range(tp) if progress is None else progress(range(tp), desc="writing TP ranks")
    for r in ranks:
        state = {"module": shards[r], "buffer_names": [], "optimizer": None, "param_shapes": None,
                 "lr_scheduler": None, "skipped_steps": 0, "global_steps": 0, "global_samples": 0,
                 "dp_world_size": 1, "mp_world_size": tp, "iteration": 0, "consumed_samples": 0}
        torch.save(state, os.path.join(tag_dir, MODEL_STATES.format(r)))
    write_meta(tag_dir, {"iteration": 0, "consumed_samples": 0, "weights_only": True,
                         "checkpoint_format": CHECKPOINT_FORMAT, **meta})
    write_manifest(tag_dir, 0, collective=False)
    write_latest(save_dir, tag)
    return tag
