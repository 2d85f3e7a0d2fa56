#!/usr/bin/env python3
"""Does an SSA training step give the same loss and gradients with the Triton kernels as with
the plain-PyTorch reference, on a real model and real text? (front of
ssa_megatron.eval.backend_parity)

    python tools/check_backend_parity.py --checkpoint runs/compare100/full-full_seed1/checkpoint \
        --data-path runs/english/english_text_document --micro-batch-size 2
"""
import sys

from ssa_megatron.eval.backend_parity import main

if __name__ == "__main__":
    sys.exit(main())
