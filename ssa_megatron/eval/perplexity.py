"""Perplexity of a GPTModel over evaluation windows, in full and sparse mode.

Each (mode, block_counts) setting accumulates the summed next-token cross-entropy and the number
of scored tokens over the windows of this rank; :func:`all_reduce_sums` adds them over the data-
parallel ranks, so perplexity = exp(sum NLL / tokens) over all windows, whatever the rank count.
The cross-entropy is over the tokenizer's vocabulary: the rows megatron-core pads the output
layer with (to a multiple of 128) are left out of the softmax, as the Hugging Face export leaves
them out, so both give the same perplexity. Training's logged LM loss keeps them in its softmax and
reads slightly higher (docs/FIRST_RUN.md has a measured example).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ssa_megatron.eval.data import Window, batch_windows
from ssa_megatron.model.attention import set_inference_mode

Setting = Tuple[str, Optional[int]]  # (mode, block_counts); block_counts None for full


HYBRID = "sparse+dense"  # a hybrid setting's mode: "sparse+dense<N>", the first N layers full
SELECTED = "sparse@"  # sparse mode under another block selection: "sparse@oracle", "sparse@recent4"


def hybrid_mode(dense_layers: int) -> str:
    """The mode name of sparse mode with attention layers 1..``dense_layers`` in full attention
    (the name evaluate.py's records carry)."""
    return f"{HYBRID}{int(dense_layers)}"


def selection_mode(selection: str) -> str:
    """The mode name of sparse mode whose blocks are picked by ``selection``
    (ops/selection_variants.py; the name evaluate.py's records carry)."""
    return f"{SELECTED}{selection}"


def settings_for(modes: Sequence[str], block_counts: Sequence[int],
                 dense_layers: Sequence[int] = (), selections: Sequence[str] = ()) -> List[Setting]:
    """Every (mode, block budget) to evaluate; with ``dense_layers``, sparse mode also with the
    first N attention layers in full attention, for each N; with ``selections``, sparse mode also
    under each of those block selections."""
    out: List[Setting] = []
    for mode in modes:
        if mode == "sparse":
            out.extend(("sparse", int(bc)) for bc in block_counts)
            out.extend((hybrid_mode(n), int(bc)) for n in dense_layers for bc in block_counts)
            out.extend((selection_mode(s), int(bc)) for s in selections for bc in block_counts)
        else:
            out.append((mode, None))
    return out


def apply_setting(model, setting: Setting) -> None:
    from ssa_megatron.ops.selection_variants import POOLED
    mode, bc = setting
    if mode.startswith(HYBRID):
        set_inference_mode(model, "sparse", bc, dense_layers=int(mode[len(HYBRID):]),
                           selection=POOLED)
    elif mode.startswith(SELECTED):
        set_inference_mode(model, "sparse", bc, selection=mode[len(SELECTED):])
    elif mode in ("full", "sparse"):
        set_inference_mode(model, mode, bc, selection=POOLED)


def eod_position_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Positions restarting after each EOD token (megatron's reset_position_ids)."""
    b, s = tokens.shape
    pos = torch.arange(s).expand(b, s).clone()
    for row in range(b):
        for i in torch.nonzero(tokens[row] == eod).flatten().tolist():
            if i + 1 < s:
                pos[row, i + 1:] -= pos[row, i + 1].item()
    return pos


def window_losses(model, tokens: torch.Tensor, labels: torch.Tensor,
                  reset_eod: Optional[int] = None, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token cross-entropy [B, L] (fp32) of one batch of windows, over the first
    ``vocab_size`` logits (default: all, padding included)."""
    device = next(model.parameters()).device
    tokens, labels = tokens.to(device), labels.to(device)
    packed = None
    if reset_eod is not None:
        from ssa_megatron.model.runtime import document_packed_seq_params
        pos = eod_position_ids(tokens.cpu(), reset_eod).to(device)
        packed = document_packed_seq_params(pos)
    else:
        pos = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    with torch.no_grad():
        if vocab_size is None:
            return model(tokens, pos, None, labels=labels, packed_seq_params=packed).float()
        logits = model(tokens, pos, None, packed_seq_params=packed)[..., :vocab_size].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab_size), labels.reshape(-1), reduction="none").view_as(labels)


def evaluate_perplexity(model, stream, windows: Sequence[Window], length: int,
                        settings: Sequence[Setting], micro_batch_size: int = 1,
                        reset_eod: Optional[int] = None,
                        progress: Optional[Callable[[Iterable], Iterable]] = None,
                        vocab_size: Optional[int] = None) -> Dict[Setting, List[float]]:
    """{setting: [sum NLL, scored tokens]} over this rank's ``windows``."""
    sums = {s: [0.0, 0.0] for s in settings}
    batches = [windows[i: i + micro_batch_size] for i in range(0, len(windows), micro_batch_size)]
    it = progress(batches) if progress else batches
    for group in it:
        tokens, labels, mask = batch_windows(stream, group, length)
        for setting in settings:
            apply_setting(model, setting)
            ce = window_losses(model, tokens, labels, reset_eod, vocab_size).cpu()
            sums[setting][0] += float((ce.double() * mask.double()).sum())
            sums[setting][1] += float(mask.sum())
    return sums


def all_reduce_sums(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over all ranks (gloo or NCCL); no-op in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = values.to(device)
    dist.all_reduce(t)
    return t.cpu()


def reduce_perplexity(sums: Dict[Setting, List[float]]) -> Dict[Setting, dict]:
    keys = list(sums)
    t = all_reduce_sums(torch.tensor([sums[k] for k in keys], dtype=torch.float64).reshape(-1, 2))
    out = {}
    for k, (nll, n) in zip(keys, t.tolist()):
        mean = nll / n if n else float("nan")
        out[k] = {"nll": mean, "tokens": int(n), "ppl": math.exp(mean) if n else float("nan")}
    return out
