"""The trainer's ``--result-json`` record (per-step losses, step times, memory of one run).

A run that continues an earlier one (a resume, a requeue) writes a new record; the earlier record
is kept beside it as ``<stem>_part<N>_until_<iteration>.json``, oldest first, so that a run's whole
history is the parts plus the last record (:func:`read_series` joins them).
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Optional, Tuple


def _part_pattern(path: str):
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.compile(re.escape(stem) + r"_part(\d+)_until_.*\.json$")


def _numbered_parts(path: str) -> List[Tuple[int, str]]:
    """(part number, full path) of the earlier parts of the record at ``path``, oldest first."""
    folder = os.path.dirname(path) or "."
    pattern = _part_pattern(path)
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in (os.listdir(folder) if os.path.isdir(folder) else [])
             for m in [pattern.match(name)] if m]
    return sorted(found)


def earlier_parts(path: str) -> List[str]:
    """The earlier parts of the record at ``path``, oldest first (full paths)."""
    return [part for _, part in _numbered_parts(path)]


def set_aside(path: str) -> Optional[str]:
    """Move an existing record at ``path`` to the next part name; returns where it went."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            until = json.load(f).get("iteration", "unknown")
    except (OSError, ValueError, AttributeError):
        until = "unknown"
    last = max((n for n, _ in _numbered_parts(path)), default=0)
    target = f"{os.path.splitext(path)[0]}_part{last + 1}_until_{until}.json"
    os.replace(path, target)
    return target


def write(path: str, result: dict) -> None:
    """Write the record atomically (a crash leaves the old file or the new one, never half)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in result.items() if isinstance(v, (int, float, str, list))}, f)
    os.replace(tmp, path)


def read_series(path: str, key: str = "lm_loss"):
    """({iteration: value} of the per-step series ``key`` of the record at ``path`` (e.g.
    "lm_loss", "grad_norm") over every part of the run, a later part winning for a step it
    re-ran; the parts' records, oldest first), or (None, None) when no part logged a step."""
    records = []
    for part in earlier_parts(path) + [path]:
        if os.path.isfile(part):
            with open(part) as f:
                records.append(json.load(f))
    records = [r for r in records if r and r.get("lm_loss")]
    if not records:
        return None, None
    values = {}
    for r in records:
        steps = r.get("iterations") or range(r["iteration"] - len(r["lm_loss"]) + 1, r["iteration"] + 1)
        values.update(zip(steps, r.get(key) or []))
    return values, records
