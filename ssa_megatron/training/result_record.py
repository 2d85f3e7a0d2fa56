"""The trainer's ``--result-json`` record (per-step losses, step times, memory of one run).

A run that continues an earlier one (a resume, a requeue) writes a new record; the earlier record
is kept beside it as ``<stem>_part<N>_until_<iteration>.json``, oldest first, so that a run's whole
history is the parts plus the last record (``paper_comparison.step_losses`` joins them).
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
