#!/usr/bin/env python3
"""Train-loss curves of several runs (each a trainer output folder with train.json, resumed
parts joined) in one PNG: the moving average of the per-step loss, and each run minus the first.

Code: ssa_megatron/study/plot_train_curves.py; options: --help.
"""
import sys

from ssa_megatron.study.plot_train_curves import main

if __name__ == "__main__":
    sys.exit(main())
