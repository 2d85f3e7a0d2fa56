#!/usr/bin/env python3
"""Measured byte floors of the block-sparse attention kernels on one GPU.

Code: ssa_megatron/bench/byte_floor.py; options: --help.
"""
import sys

from ssa_megatron.bench.byte_floor import main

if __name__ == "__main__":
    sys.exit(main())
