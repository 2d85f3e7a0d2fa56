#!/usr/bin/env python3
"""SSA quality study: many seeds of small SSA / Full-Full models side by side on one GPU, with
attention diagnostics from step 0, then a summary of which runs land where Full-Full does
(front of ssa_megatron.study.quality_study).

    python tools/ssa_quality_study.py run --data-path runs/english/english_text_document \
        --out runs/quality --groups full-full:1-4 ssa-step:1-8 ssa-seq:1-8 --jobs-per-gpu 8
    python tools/ssa_quality_study.py summarize --out runs/quality
"""
import sys

from ssa_megatron.study.quality_study import main

if __name__ == "__main__":
    sys.exit(main())
