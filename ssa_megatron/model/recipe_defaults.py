"""The SSA training recipe's defaults, in one place: the trainer's flags
(training/arguments.py), ``SSAConfig`` and the model builder read them from here, and
``recipe_setting`` gives a run saved before a flag existed that flag's default."""
from __future__ import annotations

RECIPE_DEFAULTS = {
    "ssa_align_coef": 10.0,           # alpha, the alignment loss's weight (the paper's)
    "ssa_full_prob": 0.5,             # probability of the full branch (the paper's)
    "ssa_branch_draw": "sequence",    # per-sequence draws: the robust recipe (docs/RESULTS.md)
    "ssa_select_align_coef": 0.0,     # the selection alignment loss: off
    "ssa_select_align_rows": 64,
    "ssa_gate_init": "normal",
    "lm_loss_weight": 1.0,
}


# The block score a new SSA training run selects with unless told otherwise: the log-mean-exp
# over four sub-block means (docs/RESULTS.md, "Session 21"). It is the trainer's default only:
# a model or checkpoint that records no score selects with the paper's mean (ModelShape's
# default), and a resumed run keeps the score its checkpoint recorded.
RECIPE_SELECTION_SCORE = "sub4"


def recipe_score_unfit(attention_mode: str, block_size: int, select_align_coef: float = 0.0,
                       select_proj: bool = False):
    """Why these flags cannot train with the recipe's score (None: they can): it scores SSA's
    selection, needs blocks its sub-blocks split, and the selection alignment loss trains the
    mean score only."""
    from ssa_megatron.ops.reference import sub_parts, sub_parts_error
    if attention_mode != "ssa":
        return f"--attention-mode {attention_mode} has no SSA selection"
    if select_align_coef or select_proj:
        return "the selection alignment loss trains the mean score"
    if sub_parts_error(sub_parts(RECIPE_SELECTION_SCORE), block_size):
        return f"its sub-blocks do not split {block_size}-token blocks"
    return None


def recipe_selection_score(attention_mode: str, block_size: int, select_align_coef: float = 0.0,
                           select_proj: bool = False) -> str:
    """The score a new run trains with when ``--ssa-selection-score`` is not given: the recipe's
    where :func:`recipe_score_unfit` finds nothing against it, the paper's mean otherwise."""
    unfit = recipe_score_unfit(attention_mode, block_size, select_align_coef, select_proj)
    return "mean" if unfit else RECIPE_SELECTION_SCORE


def recipe_default(name: str):
    return RECIPE_DEFAULTS[name]


def recipe_setting(args, name: str):
    """``args.<name>``, or its default for arguments saved before the flag existed."""
    return getattr(args, name, RECIPE_DEFAULTS[name])
