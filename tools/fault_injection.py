#!/usr/bin/env python
"""kill -9 a training run at random moments (inside saves included), rerun it, compare the final
state with an uninterrupted run bit for bit; see ssa_megatron/training/fault_injection.py.

    python tools/fault_injection.py --trials 30 --workdir /tmp/fault_injection --json counts.json
"""
import sys

from ssa_megatron.training.fault_injection import main

if __name__ == "__main__":
    sys.exit(main())
