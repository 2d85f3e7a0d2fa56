"""GPU measurements behind docs/KERNEL_NOTES.md and docs/RESULTS.md: kernel and SDPA timings
(``attention``), launch-setting sweeps (``kernel_variants``), byte floors (``byte_floor``),
decode steps of the HF export (``decode``), trainer throughput (``training``) and parallel
layouts (``parallel_gpu``). Each module's ``main`` is the CLI of the tools/bench_*.py of that name.
"""
