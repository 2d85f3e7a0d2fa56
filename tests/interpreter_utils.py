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
    group's rows (or its failure) are handed out when a test asks for them. ``close`` cancels
    the groups not started and kills the children still running (an interrupted or stopped
    session does not wait for them)."""

    def __init__(self, script: str, groups, workers: int = 2):
        from concurrent.futures import ThreadPoolExecutor
        self._script = script
        self._children = []
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._runs = {g: self._pool.submit(self._run, g) for g in dict.fromkeys(groups)}

    def _run(self, group: str) -> list:
        if self._closed:
            raise RuntimeError("closed")
        proc = subprocess.Popen(_command(self._script, group), env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self._children.append(proc)
        try:
            out, err = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return _rows(proc.returncode, out, err)

    def rows(self, group: str) -> list:
        run = self._runs.get(group)
        return run_interpreted(self._script, group) if run is None else run.result()

    def close(self) -> None:
        self._closed = True
        for run in self._runs.values():
            run.cancel()
        for proc in self._children:
            if proc.poll() is None:
                proc.kill()
        self._pool.shutdown(wait=True)


def selected_groups(request, group_of) -> list:
    """The interpreter groups that this session's selected tests of ``request``'s module need
    (``group_of(test name)``: its group, or None)."""
    module = request.module
    names = [item.name for item in request.session.items
             if getattr(item, "module", None) is module]
    return [g for g in (group_of(n) for n in names) if g is not None]


def interpreted_groups(script: str, group_of, first=()):
    """A module-scoped fixture ``interpreted`` (a :class:`ConcurrentRuns`) of the groups the
    module's selected tests need (``group_of(test name)``), the groups named in ``first`` (the
    longest) started first, in that order: a test waits only for its own group."""

    @pytest.fixture(scope="module")
    def interpreted(request):
        groups = selected_groups(request, group_of)
        groups.sort(key=lambda g: first.index(g) if g in first else len(first))
        runs = ConcurrentRuns(script, groups)
        yield runs
        runs.close()

    return interpreted


def _command(script: str, what: str) -> list:
    return [sys.executable, os.path.abspath(script), what]


def _env() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _rows(returncode: int, out: str, err: str) -> list:
    assert returncode == 0, out[-3000:] + err[-3000:]
    rows = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert rows, out[-2000:] + err[-2000:]
    return rows


def run_interpreted(script: str, what: str) -> list:
    """``python script what`` with TRITON_INTERPRET=1; its JSON rows (at least one)."""
    proc = subprocess.run(_command(script, what), env=_env(), capture_output=True, text=True,
                          timeout=600)
    return _rows(proc.returncode, proc.stdout, proc.stderr)
