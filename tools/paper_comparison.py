#!/usr/bin/env python3
"""The paper's comparison at small scale: Full-Full, Sparse-Sparse and SSA trained with identical
data, steps, hyper-parameters and seeds, then evaluated with tools/evaluate.py.

Code: ssa_megatron/study/paper_comparison.py; options: --help.
"""
import sys

from ssa_megatron.study.paper_comparison import main

if __name__ == "__main__":
    sys.exit(main())
