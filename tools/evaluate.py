#!/usr/bin/env python
"""Evaluate an ssa_megatron checkpoint: perplexity in full / sparse mode over block budgets and
context lengths, attention sparsity, alignment gap, needle retrieval. See --help."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssa_megatron.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
