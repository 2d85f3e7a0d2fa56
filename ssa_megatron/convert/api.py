"""The three conversions, each through the full (TP-merged) megatron state dict."""
from __future__ import annotations

from typing import List, Optional, Tuple

from ssa_megatron.convert import hf_ckpt, layout, megatron_ckpt
from ssa_megatron.model.shape import ModelShape, padded_vocab_size
from ssa_megatron.training import checkpoint_format as fmt


def _progress():
    try:
        from tqdm import tqdm
        return tqdm
    except ImportError:  # pragma: no cover
        return None


def training_dtype(meta: dict) -> str:
    """The HF dtype of the precision a checkpoint trained in (its saved --bf16 / --fp16)."""
    args = meta.get("args") or {}
    return "bfloat16" if args.get("bf16") else "float16" if args.get("fp16") else "float32"


def megatron_to_hf(checkpoint: str, out_dir: str, tag: Optional[str] = None, dtype: str = "auto",
                   max_shard_size="5GB", inference_mode: Optional[str] = None,
                   block_counts: Optional[int] = None) -> Tuple[str, List[str]]:
    """Megatron checkpoint (any TP layout / ZeRO stage) -> HF directory. Returns the tag
    directory it read and notes. ``dtype`` "auto": :func:`training_dtype`."""
    tag_dir = megatron_ckpt.resolve_tag_dir(checkpoint, tag)
    full, meta, shape = megatron_ckpt.read_tag_dir(tag_dir)
    notes = []
    if dtype == "auto":
        dtype = training_dtype(meta)
        notes.append(f"weights in {dtype}, the precision the checkpoint trained in (--dtype to choose)")
    if inference_mode is not None:
        shape = shape.replace(inference_mode=inference_mode)
    if block_counts is not None:
        shape = shape.replace(ssa_block_counts=int(block_counts))
    hf_state = layout.megatron_to_hf(full, shape)
    return tag_dir, notes + hf_ckpt.write_hf(out_dir, hf_state, shape, meta.get("data"), dtype, max_shard_size)


def hf_to_megatron_checkpoint(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1,
                              attention_mode: Optional[str] = None) -> str:
    """HF directory (ours, the paper's layout, Llama, Mistral, Qwen2, Qwen3, Phi-3) -> weights-only
    megatron checkpoint. Returns the flavour read (ssa, paper, llama)."""
    hf_state, shape, flavour = hf_ckpt.read_hf(hf_dir, attention_mode)
    full = layout.hf_to_megatron(hf_state, shape, padded_vocab_size(shape.vocab_size, tp))
    data = hf_ckpt.tokenizer_data_from_hf(hf_dir, shape.vocab_size)
    megatron_ckpt.write_checkpoint(full, shape, out_dir, tp, pp, data=data,
                                   source=f"{flavour} HF model {hf_dir}", progress=_progress())
    return flavour


def training_flags(checkpoint: str) -> list:
    """The pretrain.py model flags that rebuild a checkpoint's model (for --load)."""
    meta = megatron_ckpt.read_meta(megatron_ckpt.resolve_tag_dir(checkpoint))
    return ModelShape.from_meta(meta, 0).training_flags()


def relayout(checkpoint: str, out_dir: str, tp: int, pp: int = 1, tag: Optional[str] = None) -> str:
    """A checkpoint of any layout -> a weights-only checkpoint with TP=``tp`` (directly). Returns
    the tag directory it read."""
    tag_dir = megatron_ckpt.resolve_tag_dir(checkpoint, tag)
    full, meta, shape = megatron_ckpt.read_tag_dir(tag_dir)
    megatron_ckpt.write_checkpoint(full, shape, out_dir, tp, pp, data=meta.get("data"),
                                   source=f"{fmt.RELAYOUT_SOURCE}{checkpoint}", progress=_progress())
    return tag_dir
