#!/usr/bin/env python
"""Convert ssa_megatron checkpoints to/from Hugging Face format (see ssa_megatron/convert/cli.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssa_megatron.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
