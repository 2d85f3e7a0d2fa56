#!/usr/bin/env python
"""kill -9 a training run at random moments (inside saves included), rerun it, compare the final
state with an uninterrupted run bit for bit; see ssa_megatron/training/fault_injection.py.

    python tools/fault_injection.py --trials 30 --workdir /tmp/fault_injection --json counts.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssa_megatron.training.fault_injection import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
