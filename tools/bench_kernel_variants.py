#!/usr/bin/env python3
"""Sweep the SSA kernels' launch and algorithm settings on one GPU, against SDPA in the same run.

Code: ssa_megatron/bench/kernel_variants.py; options: --help.
"""
import sys

from ssa_megatron.bench.kernel_variants import main

if __name__ == "__main__":
    sys.exit(main())
