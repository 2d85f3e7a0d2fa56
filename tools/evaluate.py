#!/usr/bin/env python
"""Evaluate an ssa_megatron checkpoint: perplexity in full / sparse mode over block budgets and
context lengths, attention sparsity, alignment gap, needle retrieval. See --help."""
import sys

from ssa_megatron.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
