"""Evaluation of trained SSA checkpoints.

* :mod:`.model`     - checkpoint -> single-process TP=1 GPTModel; llama3-style RoPE scaling
* :mod:`.data`      - evaluation token streams (.bin/.idx splits, raw text/jsonl) and windows
* :mod:`.perplexity` - perplexity in full / sparse mode at several block budgets and lengths
* :mod:`.sparsity`  - attention mass inside the selected blocks, top-k concentration, alignment gap
* :mod:`.needle`    - synthetic needle-in-a-haystack generator, scorer, greedy retrieval
* :mod:`.report`    - table, JSON and PNG
* :mod:`.cli`       - ``tools/evaluate.py``
"""
