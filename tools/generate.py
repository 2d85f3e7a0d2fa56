#!/usr/bin/env python
"""Generate text from a Hugging Face export in full and sparse attention (front of
ssa_megatron.eval.generate).

    python tools/generate.py --model hf/my_model --prompt "Fellow citizens" --max-new-tokens 64
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssa_megatron.eval.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
