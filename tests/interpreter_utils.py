"""Triton kernel tests run under the CPU interpreter in a fresh child process (TRITON_INTERPRET
must be set before triton is imported): the child prints one JSON row per checked case."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


class ConcurrentRuns:
    """:func:`run_interpreted` of several groups of one script, started together and run
    ``workers`` at a time (the interpreter keeps about one core busy, and CI has two); each
    group's rows (or its failure) are handed out when a test asks for them."""

    def __init__(self, script: str, groups, workers: int = 2):
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._runs = {g: self._pool.submit(run_interpreted, script, g) for g in dict.fromkeys(groups)}
        self._script = script

    def rows(self, group: str) -> list:
        run = self._runs.get(group)
        return run_interpreted(self._script, group) if run is None else run.result()

    def close(self) -> None:
        for run in self._runs.values():
            run.cancel()
        self._pool.shutdown(wait=True)


def selected_groups(request, group_of) -> list:
    """The interpreter groups that this session's selected tests of ``request``'s module need
    (``group_of(test name)``: its group, or None)."""
    module = request.module
    names = [item.name for item in request.session.items
             if getattr(item, "module", None) is module]
    return [g for g in (group_of(n) for n in names) if g is not None]


def run_interpreted(script: str, what: str) -> list:
    """``python script what`` with TRITON_INTERPRET=1; its JSON rows (at least one)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(script), what], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert rows, proc.stdout[-2000:] + proc.stderr[-2000:]
    return rows
