"""How SSA training mixes its branches, step by step: the branch of each micro-batch or sequence,
the full-branch probability and alignment weight schedules, and the recipe's one-line summary."""
from __future__ import annotations

from typing import Optional

import torch

from ssa_megatron.model.recipe_defaults import (RECIPE_SELECTION_SCORE, recipe_score_unfit,
                                                recipe_setting)
from ssa_megatron.model.shape import shape_default
from ssa_megatron.model.runtime import (PiecewiseLinear, collapse_branches, draw_mode,
                                        draw_sequence_branches)
from ssa_megatron.training.resume_notes import changed_flags


class BranchRecipe:
    """The trainer's SSA settings that change with the iteration."""

    def __init__(self, args):
        self.seed = args.seed
        self.per_sequence = recipe_setting(args, "ssa_branch_draw") == "sequence"
        self.full_prob = args.ssa_full_prob
        self.align_coef = args.ssa_align_coef
        self.mbs = args.micro_batch_size
        spec = getattr(args, "ssa_full_prob_schedule", None)
        self.full_prob_schedule = PiecewiseLinear(spec, args.train_iters, "--ssa-full-prob-schedule") if spec else None
        spec = getattr(args, "ssa_align_coef_schedule", None)
        self.align_schedule = PiecewiseLinear(spec, args.train_iters, "--ssa-align-coef-schedule") if spec else None

    def full_prob_at(self, iteration: int) -> float:
        return self.full_prob_schedule(iteration) if self.full_prob_schedule else self.full_prob

    def align_coef_at(self, iteration: int) -> Optional[float]:
        return self.align_schedule(iteration) if self.align_schedule else None

    def branch(self, iteration: int, micro: int, first_sample: int, collapse: bool = True):
        """"full" / "sparse" for the micro-batch, or a bool tensor [mbs] (True: full) when each
        sequence draws its own; ``first_sample`` is the global index of its first sequence.
        ``collapse=False`` keeps the tensor even when its rows agree (pipeline stages exchange
        tensors of one fixed shape)."""
        p = self.full_prob_at(iteration)
        if self.per_sequence:
            rows = draw_sequence_branches(self.seed, range(first_sample, first_sample + self.mbs), p)
            return collapse_branches(rows) if collapse else rows
        return draw_mode(self.seed, iteration, micro, p)

    def describe(self, args) -> str:
        if args.attention_mode != "ssa":
            return f"recipe: --attention-mode {args.attention_mode} (no branch mixing)"
        draw = "per sequence" if self.per_sequence else "per micro-batch"
        prob = (f"schedule {self.full_prob_schedule.spec}" if self.full_prob_schedule
                else f"{self.full_prob}")
        align = (f"schedule {self.align_schedule.spec}" if self.align_schedule else f"{self.align_coef}")
        extras = [name for name, on in (("qk-layernorm", getattr(args, "qk_layernorm", False)),
                                        ("zero-init gates", recipe_setting(args, "ssa_gate_init") == "zero"))
                  if on]
        extras.insert(0, f"{selection_score_text(args)} selection score")
        select = recipe_setting(args, "ssa_select_align_coef")
        if select:
            trains = "a learned selection map" if getattr(args, "ssa_select_proj", False) else "q and k"
            extras.insert(0, f"selection alignment weight {select} "
                             f"({recipe_setting(args, 'ssa_select_align_rows')} rows, training {trains})")
        return (f"recipe: SSA, branch drawn {draw}, full-branch probability {prob}, "
                f"alignment weight {align}, top-{args.ssa_block_counts} of {args.ssa_block_size}-token "
                f"blocks{', ' + ', '.join(extras) if extras else ''}")


def selection_score_text(args) -> str:
    """The block score, and why a run that left the flag out did not get the recipe's."""
    score = getattr(args, "ssa_selection_score", None) or shape_default("ssa_selection_score")
    if not getattr(args, "_selection_score_defaulted", False) or score == RECIPE_SELECTION_SCORE:
        return score
    why = recipe_score_unfit(args.attention_mode, args.ssa_block_size, args.ssa_select_align_coef,
                             args.ssa_select_proj) or "the checkpoint's"
    return f"{score} (not {RECIPE_SELECTION_SCORE}: {why})"


def full_coverage_note(args) -> Optional[str]:
    """A note when the sparse branch's budget covers every training position (block size x
    block count >= sequence length): sparse attention then equals full attention, and SSA,
    Sparse-Sparse or NSA train a full-attention model."""
    if args.attention_mode not in ("ssa", "sparse", "nsa"):
        return None
    budget = args.ssa_block_size * args.ssa_block_counts
    if budget < args.seq_length:
        return None
    return (f"note: --ssa-block-size {args.ssa_block_size} x --ssa-block-counts {args.ssa_block_counts} = "
            f"{budget} tokens covers the whole --seq-length {args.seq_length}: the sparse branch equals "
            "full attention here; lower --ssa-block-counts (or train longer sequences) to train sparsity")


RECIPE_ARGS = ("ssa_branch_draw", "ssa_full_prob", "ssa_full_prob_schedule", "ssa_align_coef",
               "ssa_align_coef_schedule", "ssa_select_align_coef", "ssa_select_align_rows",
               "ssa_selection_score")  # the trainer's flags that set how branches mix


def recipe_change_note(saved_args, args) -> Optional[str]:
    """A note when an SSA run continues a checkpoint with another branch-mixing recipe (e.g. a
    job requeued after the defaults changed, or flags left out on resume): the run goes on with
    the new one, so say so and name the checkpoint's flags."""
    if getattr(args, "attention_mode", None) != "ssa" or saved_args.get("attention_mode") != "ssa":
        return None
    changed = changed_flags(saved_args, args, RECIPE_ARGS)
    if not changed:
        return None
    return ("note: this run trains SSA with other recipe settings than the checkpoint it continues ("
            + ", ".join(changed) + "); pass the checkpoint's values to keep its recipe")


def keep_checkpoint_selection_score(args, meta: dict) -> Optional[str]:
    """A resumed SSA run whose --ssa-selection-score was left out keeps the score its checkpoint
    trained with (the paper's mean where it records none), so that a job requeued after the
    recipe's default changed goes on as it started; sets ``args.ssa_selection_score`` and
    returns the line that says so (None: nothing kept). An imported model (weights only, not a
    relayout of a run) starts training here and takes the recipe's score; so does a run whose
    other flags now forbid its checkpoint's score (the load's recipe note then names the change)."""
    from ssa_megatron.training.checkpoint_format import is_relayout
    if not getattr(args, "_selection_score_defaulted", False):
        return None
    if meta.get("weights_only") and not is_relayout(meta):
        return None
    saved = meta.get("args", {})
    if saved.get("attention_mode") != "ssa" or args.attention_mode != "ssa":
        return None
    kept = saved.get("ssa_selection_score", shape_default("ssa_selection_score"))
    if kept == args.ssa_selection_score:
        return None
    from ssa_megatron.model.config import ConfigError
    from ssa_megatron.training.arguments import check_recipe_flags
    flags_score, args.ssa_selection_score = args.ssa_selection_score, kept
    try:
        check_recipe_flags(args)
    except ConfigError:
        args.ssa_selection_score = flags_score
        return None
    return (f"note: the checkpoint this run continues trained with the {kept} selection score, so "
            f"the run keeps it (left out, these flags would give {flags_score}); pass "
            f"--ssa-selection-score {flags_score} to change it")


def first_sample_of_micro(consumed: int, micro: int, mbs: int, dp_size: int, dp_rank: int) -> int:
    """Global index (in the training order) of the first sequence of this rank's micro-batch, as
    the ResumableSampler hands them out."""
    return consumed + micro * mbs * dp_size + dp_rank * mbs


def set_align_coef(model: torch.nn.Module, coef: float) -> None:
    from ssa_megatron.model.attention import SSACoreAttention
    for module in model.modules():
        if isinstance(module, SSACoreAttention):
            module.align_coef = coef
