#!/usr/bin/env python
"""Tokenize a corpus into megatron-core .bin/.idx (front of ssa_megatron.data.preprocess).

    python tools/preprocess_data.py --input data.jsonl --json-keys text \
        --tokenizer tok/spm8k.model --output-prefix data/my_text_document --workers 8
"""
import sys

from ssa_megatron.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
