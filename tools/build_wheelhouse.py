#!/usr/bin/env python3
"""Build a wheelhouse for installing ssa_megatron on a GPU node without internet.

Code: ssa_megatron/wheelhouse.py; options: --help.
"""
import sys

from ssa_megatron.wheelhouse import main

if __name__ == "__main__":
    sys.exit(main())
