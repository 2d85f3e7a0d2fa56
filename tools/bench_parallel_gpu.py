#!/usr/bin/env python3
"""Two GPUs (NCCL): DP=2, TP=2 and PP=2 runs of a small SSA model against one GPU.

Code: ssa_megatron/bench/parallel_gpu.py; options: --help.
"""
import sys

from ssa_megatron.bench.parallel_gpu import main

if __name__ == "__main__":
    sys.exit(main())
