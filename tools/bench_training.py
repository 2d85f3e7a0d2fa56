#!/usr/bin/env python3
"""Training throughput of the SSA recipe on one GPU: full / ssa / sparse attention and
megatron-core's stock local layer as the outside baseline, measured by the trainer itself.

Code: ssa_megatron/bench/training.py; options: --help.
"""
import sys

from ssa_megatron.bench.training import main

if __name__ == "__main__":
    sys.exit(main())
