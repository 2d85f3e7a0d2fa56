"""Read and write ssa_megatron (DeepSpeed) checkpoints as one full megatron state dict.

Reading (:func:`read_checkpoint`) accepts a ``--save`` directory (its ``latest`` tag is used) or one
tag directory, and detects the layout from the files DeepSpeed wrote:

* ``mp_rank_XX_model_states.pt`` - PP = 1, ZeRO 0/1/2: ``module`` holds TP rank XX's weights
  (the trained bf16/fp32 parameters); the TP ranks are merged (layout.merge_tp).
* ``zero_pp_rank_D_mp_rank_XX_model_states.pt`` + ``*_optim_states.pt`` without ``module`` weights -
  ZeRO-3: DeepSpeed's zero_to_fp32 rebuilds each TP rank's fp32 weights from its DP shards (it is
  pointed at one TP rank's files at a time), then the TP ranks are merged.
* ``layer_LL-model_XX-model_states.pt`` - a DeepSpeed ``PipelineModule`` (PP > 1, see
  ssa_megatron/model/pipeline.py): layer LL of the pipe list, TP rank XX. The pipe list is
  [embedding, N transformer layers, final norm, head]; :func:`_pipeline_layer_name` maps its
  local names to GPTModel names (``layer.`` -> ``decoder.layers.{LL-1}.``, ``norm.`` ->
  ``decoder.final_layernorm.``, a tied head is the embedding again, an untied one
  ``output_layer.``). Tested with PP=2 (TP=1);
  a change of that layer list in model/pipeline.py must be mirrored here.

Writing (:func:`write_checkpoint`) produces a *weights-only* checkpoint (``iter_0000000``, one
``mp_rank_XX_model_states.pt`` per TP rank, ``ssa_meta.json`` with ``"weights_only": true``,
``latest``) that ``--load`` starts from: weights in, fresh optimizer, iteration 0. PP > 1 output
and ZeRO-3 loading of weights-only checkpoints are not available; the messages say so.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

from ssa_megatron.convert.layout import ConversionError, is_weight_key, merge_tp, split_tp
from ssa_megatron.model.shape import ModelShape

META = "ssa_meta.json"
LATEST = "latest"


def resolve_tag_dir(path: str, tag: Optional[str] = None, warn=None) -> str:
    """The tag directory to read, verified against its manifest the way training loads it
    (training/checkpointing.py): ``path/tag``, ``path`` itself (both must be intact), or the
    newest intact checkpoint of a --save directory (a damaged newer one is named in a warning
    line). ``warn`` gets the warning lines (default: stderr)."""
    import sys

    from ssa_megatron.training.checkpointing import CheckpointError, select_checkpoint, verify_checkpoint
    warn = warn or (lambda line: print(f"warning: {line}", file=sys.stderr, flush=True))
    if not os.path.isdir(path):
        raise ConversionError(f"checkpoint {path} does not exist")
    if tag:
        d = os.path.join(path, tag)
        if not os.path.isdir(d):
            raise ConversionError(f"{path} has no checkpoint {tag}")
    elif os.path.isfile(os.path.join(path, META)) or glob.glob(os.path.join(path, "*model_states.pt")):
        d = path
    else:
        try:
            chosen = select_checkpoint(path)
        except CheckpointError as err:
            raise ConversionError(str(err)) from None
        if chosen is None:
            raise ConversionError(f"{path} is neither a checkpoint tag directory nor a --save directory "
                                  "with a checkpoint in it; pass the directory training saved to")
        for line in chosen[1]:
            warn(line)
        return os.path.join(path, chosen[0])
    problem, verified = verify_checkpoint(d, allow_unverified=True)
    if problem is not None:
        raise ConversionError(f"checkpoint {d} is damaged: {problem}; pick another --tag")
    if not verified:
        warn(f"{d} has no manifest.json (saved by an older version): reading it unverified")
    return d


def _load(path: str) -> dict:
    # DeepSpeed's own files are pickles (configs, scheduler state): trusted training output.
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise ConversionError(f"cannot read {path} ({type(err).__name__}: {first})") from None


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


def _pipeline_layer_name(index: int, key: str, num_layers: int) -> Optional[str]:
    """GPTModel name of ``key`` of pipe layer ``index`` (None: a duplicate or non-weight entry)."""
    if index == 0:
        return key  # EmbeddingPipe: embedding.word_embeddings.weight
    if 1 <= index <= num_layers:
        return f"decoder.layers.{index - 1}." + key[len("layer."):] if key.startswith("layer.") else None
    if index == num_layers + 1:
        return "decoder.final_layernorm." + key[len("norm."):] if key.startswith("norm.") else None
    if index == num_layers + 2 and key.startswith("output_layer."):
        return key  # the untied output layer
    return None  # the tied head: the same weight as layer 0


def _read_pipeline(tag_dir: str, num_layers: int) -> List[Dict[str, torch.Tensor]]:
    files = glob.glob(os.path.join(tag_dir, "layer_*-model_*-model_states.pt"))
    ranks = sorted({int(re.search(r"-model_(\d+)-", os.path.basename(f)).group(1)) for f in files})
    shards = []
    for r in ranks:
        sd = {}
        for f in sorted(glob.glob(os.path.join(tag_dir, f"layer_*-model_{r:02d}-model_states.pt"))):
            index = int(re.search(r"layer_(\d+)-", os.path.basename(f)).group(1))
            for key, t in _load(f).items():
                name = _pipeline_layer_name(index, key, num_layers)
                if name is not None and is_weight_key(name) and torch.is_tensor(t):
                    sd[name] = t
        shards.append(sd)
    return shards


def read_meta(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, META)
    if not os.path.isfile(path):
        raise ConversionError(f"{tag_dir} has no {META}: not a complete ssa_megatron checkpoint "
                              "(a save that did not finish, or another program's checkpoint)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        raise ConversionError(f"cannot read {path} ({err})") from None


def read_checkpoint(path: str, tag: Optional[str] = None,
                    warn=None) -> Tuple[Dict[str, torch.Tensor], dict, ModelShape]:
    """(full megatron state dict, ssa_meta.json, model shape) of a checkpoint of any TP layout,
    verified against its manifest (``warn``: where warning lines go, default stderr)."""
    tag_dir = resolve_tag_dir(path, tag, warn)
    meta = read_meta(tag_dir)
    num_layers = int(meta["args"]["num_layers"])
    pipe = glob.glob(os.path.join(tag_dir, "layer_*-model_*-model_states.pt"))
    plain = sorted(glob.glob(os.path.join(tag_dir, "mp_rank_*_model_states.pt")), key=_mp_rank)
    zero3 = glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_*_model_states.pt"))
    if pipe:
        shards = _read_pipeline(tag_dir, num_layers)
    elif plain:
        shards = [{k: v for k, v in (_load(f)["module"] or {}).items()
                   if is_weight_key(k) and torch.is_tensor(v)} for f in plain]
        if any(not sd or any(v.numel() == 0 for v in sd.values()) for sd in shards) and zero3:
            shards = [_zero3_rank_weights(tag_dir, _mp_rank(f)) for f in plain]
    elif zero3:
        ranks = sorted({_mp_rank(os.path.basename(f)) for f in zero3})
        shards = [_zero3_rank_weights(tag_dir, r) for r in ranks]
    else:
        raise ConversionError(f"{tag_dir} holds no DeepSpeed model files (*model_states.pt)")
    full = merge_tp(shards)
    return full, meta, ModelShape.from_meta(meta, full["embedding.word_embeddings.weight"].shape[0])


def padded_vocab(vocab_size: int, tp: int) -> int:
    from ssa_megatron.model.builder import padded_vocab_size
    return padded_vocab_size(vocab_size, tp)


def repad_embedding(full: Dict[str, torch.Tensor], vocab_size: int, tp: int) -> Dict[str, torch.Tensor]:
    """Give the embedding (and an untied output layer) the padded size the model builds with
    ``tp`` (extra rows zero)."""
    rows = padded_vocab(vocab_size, tp)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        t = full.get(name)
        if t is not None and t.shape[0] != rows:
            new = torch.zeros(rows, t.shape[1], dtype=t.dtype)
            n = min(rows, t.shape[0])
            new[:n] = t[:n]
            full = dict(full, **{name: new})
    return full


def write_checkpoint(full: Dict[str, torch.Tensor], shape: ModelShape, out_dir: str, tp: int, pp: int = 1,
                     data: Optional[dict] = None, source: Optional[str] = None,
                     progress=None) -> str:
    """A weights-only checkpoint of layout TP=``tp`` that ``--load`` continues from (iteration 0).

    Written into a temporary directory and renamed into place, so a failure leaves nothing behind.
    """
    if pp != 1:
        raise ConversionError("writing a pipeline-parallel (PP > 1) checkpoint is not available yet; "
                              "write PP=1 and load it with --pipeline-model-parallel-size 1")
    if shape.num_query_groups % tp or shape.num_attention_heads % tp:
        raise ConversionError(f"TP {tp} does not divide {shape.num_query_groups} kv groups / "
                              f"{shape.num_attention_heads} heads; pick a TP size that divides both")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"output {out_dir} exists and is not empty; choose a new directory")
    full = repad_embedding(full, shape.vocab_size, tp)
    shards = split_tp(full, tp)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        tag = "iter_0000000"
        os.makedirs(os.path.join(tmp, tag))
        ranks = range(tp) if progress is None else progress(range(tp), desc="writing TP ranks")
        for r in ranks:
            state = {"module": shards[r], "buffer_names": [], "optimizer": None, "param_shapes": None,
                     "lr_scheduler": None, "skipped_steps": 0, "global_steps": 0, "global_samples": 0,
                     "dp_world_size": 1, "mp_world_size": tp, "iteration": 0, "consumed_samples": 0}
            torch.save(state, os.path.join(tmp, tag, f"mp_rank_{r:02d}_model_states.pt"))
        meta = {"iteration": 0, "consumed_samples": 0, "weights_only": True, "checkpoint_format": 2,
                "args": shape.to_meta_args(tp), "data": data or {}, "source": source,
                "padded_vocab_size": int(full["embedding.word_embeddings.weight"].shape[0])}
        with open(os.path.join(tmp, tag, META), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        from ssa_megatron.training.checkpointing import write_manifest
        write_manifest(os.path.join(tmp, tag), 0, collective=False)
        with open(os.path.join(tmp, LATEST), "w") as f:
            f.write(tag)
        from ssa_megatron.convert.hf_ckpt import _publish
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
