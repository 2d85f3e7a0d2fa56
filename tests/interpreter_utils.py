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
