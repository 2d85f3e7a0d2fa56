#!/usr/bin/env python3
"""PNG plots of saved GPU results (docs/results/), drawn from their JSON files.

Code: ssa_megatron/study/plot_results.py; options: --help.
"""
import sys

from ssa_megatron.study.plot_results import main

if __name__ == "__main__":
    sys.exit(main())
