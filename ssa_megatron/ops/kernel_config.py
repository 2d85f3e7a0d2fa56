"""Temporary changes to a Triton kernel's launch settings (the ``CONFIG`` dict of
``triton_selection``, ``triton_sparse_attention`` and the other kernel modules).

Benchmarks sweep the settings and tests run each code path; both go through
:func:`override_config`, which gives the dict back exactly as it was, whatever happened inside.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator


def _restore(config: dict, saved: dict) -> None:
    """Make ``config`` equal ``saved`` again, keeping the identity of nested dicts."""
    for key in [k for k in config if k not in saved]:
        del config[key]
    for key, value in saved.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            _restore(config[key], value)
        else:
            config[key] = value


@contextlib.contextmanager
def override_config(config: dict, **overrides) -> Iterator[dict]:
    """Set ``overrides`` in the kernel settings ``config`` for the duration of the block.

    A dict value for a key that holds a dict (e.g. ``small_d={"tma": 1}``) updates that entry
    rather than replacing it. The block may change ``config`` further; on exit every key, nested
    entries included, has its value from before the ``with`` again.
    """
    saved = copy.deepcopy(config)
    try:
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
        yield config
    finally:
        _restore(config, saved)


__all__ = ["override_config"]
