"""The training setups the quality studies share, written once: how SSA draws its branch
(the paper's way and the recipe's), the quality issue's small setting, and the model flags a
setting gives the trainer. study/paper_comparison.py and study/quality.py build their runs from
these; tools/gpu_validation.sh names the small setting with ``paper_comparison --preset small``."""
from __future__ import annotations

from typing import List, Mapping

BLOCK_SIZE = 16  # every study system's SSA block (evaluation selections are checked against it)

# SSA as published: one branch per micro-batch (= per step at one micro-batch), full with p 0.5
PAPER_DRAW = ["--ssa-branch-draw", "micro-batch", "--ssa-full-prob", "0.5"]
SEQUENCE_DRAW = ["--ssa-branch-draw", "sequence"]
# the robust recipe's draw: one branch per sequence, full with p 0.5 (the trainer's defaults)
RECIPE_DRAW = [*SEQUENCE_DRAW, "--ssa-full-prob", "0.5"]
# the paper's block score; the trainer's default for a new SSA run is the recipe's sub4 since
# session 21, so the systems measured with the mean score name it
PAPER_SCORE = ["--ssa-selection-score", "mean"]
PAPER_SSA = [*PAPER_DRAW, *PAPER_SCORE]      # SSA as published
MEAN_RECIPE = [*RECIPE_DRAW, *PAPER_SCORE]   # the recipe of sessions 11-20 (the mean score)

# The quality issue's small setting (it follows an independent plain-PyTorch study): 8 layers x
# 384, 12 q / 4 kv heads of 32, FFN 1024, seq 4096, 4 sequences per step, 600 steps, lr 1e-3 with
# 20 warm-up steps and cosine to 0, top-16 blocks of 16 tokens.
SMALL_SETTING = {
    "num_layers": 8, "hidden_size": 384, "ffn_hidden_size": 1024, "heads": 12, "kv_heads": 4,
    "seq_length": 4096, "micro_batch_size": 4, "global_batch_size": 4, "train_iters": 600,
    "lr": 1e-3, "min_lr": 0.0, "warmup_iters": 20, "block_counts": 16,
}
PRESETS = {"small": SMALL_SETTING}


def shape_flags(setting: Mapping) -> List[str]:
    """The trainer's model flags of a setting (``num_layers``, ``hidden_size``,
    ``ffn_hidden_size``, ``heads``, ``kv_heads``, ``seq_length``, ``block_counts``)."""
    return ["--num-layers", str(setting["num_layers"]), "--hidden-size", str(setting["hidden_size"]),
            "--ffn-hidden-size", str(setting["ffn_hidden_size"]),
            "--num-attention-heads", str(setting["heads"]), "--num-query-groups", str(setting["kv_heads"]),
            "--seq-length", str(setting["seq_length"]),
            "--ssa-block-size", str(BLOCK_SIZE), "--ssa-block-counts", str(setting["block_counts"])]
