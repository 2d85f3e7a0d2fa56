#!/usr/bin/env python3
"""How far runs that should be alike spread: train-loss window means, the first step each run
leaves a reference run, the largest gradient norm in a window (e.g. gpu_validation.sh robust).

Code: ssa_megatron/study/replicates.py; options: --help.
"""
import sys

from ssa_megatron.study.replicates import main

if __name__ == "__main__":
    sys.exit(main())
