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


def recipe_default(name: str):
    return RECIPE_DEFAULTS[name]


def recipe_setting(args, name: str):
    """``args.<name>``, or its default for arguments saved before the flag existed."""
    return getattr(args, name, RECIPE_DEFAULTS[name])
