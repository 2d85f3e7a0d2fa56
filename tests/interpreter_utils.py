"""Triton kernel tests run under the CPU interpreter in a fresh child process (TRITON_INTERPRET
must be set before triton is imported): the child prints one JSON row per checked case."""
import importlib.util
import json
import os
import subprocess
import sys
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


class _GroupRun:
    """One group of one interpreter script, run once: by the background runner (niced, from the
    start of the session) or by its module's test when that comes first."""

    def __init__(self, script: str, group: str):
        self.script, self.group = script, group
        self._lock = threading.Lock()
        self._claimed = False
        self._done = threading.Event()
        self._rows = self._error = None
        self._proc = None
        self.cancelled = False

    def claim(self) -> bool:
        with self._lock:
            if self._claimed or self.cancelled:
                return False
            self._claimed = True
            return True

    def run(self, niced: bool) -> None:
        """Run the child (the caller has claimed this group)."""
        try:
            self._proc = subprocess.Popen(_command(self.script, self.group), env=_env(),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if niced:  # idle cores only: the foreground tests keep theirs
                os.setpriority(os.PRIO_PROCESS, self._proc.pid, 19)
            if self.cancelled:
                self._proc.kill()
            out, err = self._proc.communicate(timeout=900)
            self._rows = _rows(self._proc.returncode, out, err)
        except BaseException as exc:  # handed to the test that asks
            self._error = exc
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        finally:
            self._done.set()

    def rows(self) -> list:
        if self.claim():
            self.run(niced=False)
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._rows

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()


class InterpreterQueue:
    """Every interpreter group the session's selected tests need. From the end of collection,
    ``background`` niced workers run them, the latest-collected module first (it waits longest
    for its turn): the interpreter keeps one core busy, and most of the suite leaves one of CI's
    two idle. A module's tests take over its groups not yet started, ``workers`` at a time."""

    def __init__(self, modules, background: int = 2, workers: int = 2):
        self._workers = workers
        self._runs = {}  # script -> {group: _GroupRun}
        order = []
        for script, groups in modules:
            runs = self._runs.setdefault(script, {})
            for g in groups:
                if g not in runs:
                    runs[g] = _GroupRun(script, g)
            order.append(list(runs.values()))
        self._threads = []
        queue = [run for runs in reversed(order) for run in runs]
        for _ in range(background if queue else 0):
            t = threading.Thread(target=self._drain, args=(queue,), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _drain(queue) -> None:
        for run in queue:
            if run.claim():
                run.run(niced=True)

    def start_module(self, script: str) -> None:
        """The module's turn: its groups nobody has started run now, ``workers`` at a time."""
        pending = [r for r in self._runs.get(script, {}).values() if r.claim()]
        if not pending:
            return
        lanes = [pending[i::self._workers] for i in range(self._workers)]
        for lane in lanes:
            if lane:
                threading.Thread(target=lambda rs=lane: [r.run(niced=False) for r in rs],
                                 daemon=True).start()

    def rows(self, script: str, group: str) -> list:
        run = self._runs.get(script, {}).get(group)
        return run_interpreted(script, group) if run is None else run.rows()

    def close(self) -> None:
        for runs in self._runs.values():
            for run in runs.values():
                run.cancel()


QUEUE_KEY = pytest.StashKey()


class InterpretedGroups:
    """A test module's interpreter groups: ``group_of(test name)`` gives the group a test reads
    (or None); ``first`` orders the module's groups (the longest first)."""

    def __init__(self, script: str, group_of, first=()):
        self.script, self.group_of, self.first = os.path.abspath(script), group_of, tuple(first)

    def groups(self, test_names) -> list:
        groups = list(dict.fromkeys(g for g in map(self.group_of, test_names) if g is not None))
        groups.sort(key=lambda g: self.first.index(g) if g in self.first else len(self.first))
        return groups

    def fixture(self):
        """The module-scoped fixture ``interpreted``: ``interpreted.rows(group)``."""
        spec = self

        @pytest.fixture(scope="module")
        def interpreted(request):
            queue = request.config.stash.get(QUEUE_KEY, None)
            if queue is None:  # collected without conftest's hook: this module alone
                names = [i.name for i in request.session.items
                         if getattr(i, "module", None) is request.module]
                queue = InterpreterQueue([(spec.script, spec.groups(names))], background=0)
            queue.start_module(spec.script)
            yield _ModuleRows(queue, spec.script)
            if QUEUE_KEY not in request.config.stash:
                queue.close()

        return interpreted


class _ModuleRows:
    def __init__(self, queue: InterpreterQueue, script: str):
        self._queue, self._script = queue, script

    def rows(self, group: str) -> list:
        return self._queue.rows(self._script, group)


def start_interpreter_queue(session) -> None:
    """conftest's collection hook: start the background runs of every selected module's groups."""
    modules, names = {}, {}
    for item in session.items:
        module = getattr(item, "module", None)
        spec = getattr(module, "INTERPRETED", None)
        if isinstance(spec, InterpretedGroups):
            modules.setdefault(spec.script, spec)
            names.setdefault(spec.script, []).append(item.name)
    if modules:
        session.config.stash[QUEUE_KEY] = InterpreterQueue(
            [(script, spec.groups(names[script])) for script, spec in modules.items()])


def stop_interpreter_queue(session) -> None:
    queue = session.config.stash.get(QUEUE_KEY, None)
    if queue is not None:
        queue.close()


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
