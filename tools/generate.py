#!/usr/bin/env python
"""Generate text from a Hugging Face export in full and sparse attention (front of
ssa_megatron.eval.generate).

    python tools/generate.py --model hf/my_model --prompt "Fellow citizens" --max-new-tokens 64
"""
import sys

from ssa_megatron.eval.generate import main

if __name__ == "__main__":
    sys.exit(main())
