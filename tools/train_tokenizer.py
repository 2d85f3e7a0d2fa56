#!/usr/bin/env python
"""Train a SentencePiece BPE/unigram tokenizer (front of ssa_megatron.data.tokenizer_training).

    python tools/train_tokenizer.py --input corpus/ --output-prefix tok/spm8k --vocab-size 8000
"""
import sys

from ssa_megatron.data.tokenizer_training import main

if __name__ == "__main__":
    sys.exit(main())
