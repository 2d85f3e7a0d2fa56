#!/usr/bin/env python3
"""Decode-step timing of the exported Hugging Face model (ssa_megatron/hf): sparse vs full mode
with a KV cache of --context tokens.

Code: ssa_megatron/bench/decode.py; options: --help.
"""
import sys

from ssa_megatron.bench.decode import main

if __name__ == "__main__":
    sys.exit(main())
