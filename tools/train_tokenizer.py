#!/usr/bin/env python
"""Train a SentencePiece BPE/unigram tokenizer (front of ssa_megatron.data.tokenizer_training).

    python tools/train_tokenizer.py --input corpus/ --output-prefix tok/spm8k --vocab-size 8000
"""
import os
import sys

try:
    import ssa_megatron  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssa_megatron.data.tokenizer_training import main

if __name__ == "__main__":
    sys.exit(main())
