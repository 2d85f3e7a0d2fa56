#!/usr/bin/env python3
"""Benchmark SSA attention kernels against torch SDPA on one GPU.

Code: ssa_megatron/bench/attention.py; options: --help.
"""
import sys

from ssa_megatron.bench.attention import main

if __name__ == "__main__":
    sys.exit(main())
