#!/usr/bin/env python
"""Convert ssa_megatron checkpoints to/from Hugging Face format (see ssa_megatron/convert/cli.py)."""
import sys

from ssa_megatron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
