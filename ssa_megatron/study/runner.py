"""Training runs side by side: a queue of jobs on GPU slots (several per GPU if asked), with a
deadline after which running jobs save and stop and no new one starts; and the command each run
folder was started with, so that a study never continues a run under other flags."""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from typing import List, Optional, Sequence


def one_spelling_of_paths(args) -> None:
    """``args.out`` and (when it names a dataset here) ``args.data_path`` made absolute, so a run's
    recorded command reads the same whatever directory the study is started from."""
    args.out = os.path.abspath(args.out)
    if os.path.exists(args.data_path + ".idx"):
        args.data_path = os.path.abspath(args.data_path)


def record_command(path: str, words: List[str]) -> None:
    with open(path, "w") as f:
        f.write(shlex.join(words) + "\n")


def recorded_command(path: str) -> Optional[List[str]]:
    """The words :func:`record_command` wrote at ``path``; None when there is no record."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return shlex.split(f.read())


def _without(words: List[str], flags: Sequence[str]) -> List[str]:
    """``words`` without each of ``flags`` and the value after it."""
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        else:
            kept.append(word)
    return kept


def _names_the_paper_score(words: List[str]) -> bool:
    return any(a == "--ssa-selection-score" and b == "mean" for a, b in zip(words, words[1:]))


def command_changes(path: str, words: List[str], ignoring: Sequence[str] = ()) -> Optional[List[str]]:
    """How ``words`` differ from the command recorded at ``path`` (``old -> new`` for the first
    differing words, at most two), leaving out the flags ``ignoring`` and their values; None
    when nothing is recorded there or the two agree."""
    before = recorded_command(path)
    if before is None:
        return None
    before, now = _without(before, ignoring), _without(words, ignoring)
    if _names_the_paper_score(now) and "--ssa-selection-score" not in before:
        # recorded before the trainer's default score became sub4: the run trained with mean
        now = _without(now, ("--ssa-selection-score",))
    if before == now:
        return None
    return [f"{a} -> {b}" for a, b in zip(before, now) if a != b][:2] or ["other flags"]

def visible_devices(gpus: int):
    """The device ids slot i % gpus maps to: the gpus first of CUDA_VISIBLE_DEVICES, if set."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in visible.split(",") if x.strip()] if visible is not None else None
    if ids is not None and gpus > len(ids):
        raise SystemExit(f"error: --gpus {gpus} but CUDA_VISIBLE_DEVICES={visible!r} allows "
                         f"{len(ids)}: lower --gpus or widen CUDA_VISIBLE_DEVICES")
    return ids[:gpus] if ids is not None else [str(i) for i in range(gpus)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(cmd, out: str, log_name: str, device):
    env = dict(os.environ, MASTER_PORT=str(_free_port()))
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    log = open(os.path.join(out, log_name), "a")  # a resumed run appends to its log
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log


STOPPED = 3  # the trainer's exit code after saving on a signal


def _signal_running(slots, action: str) -> None:
    """``action`` ("terminate" or "kill") every process still running in ``slots``."""
    for entry in slots:
        if entry is not None and entry[2].poll() is None:
            getattr(entry[2], action)()


def run_queue(jobs, gpus: int, jobs_per_gpu: int = 1, deadline: float = None, grace: float = 180):
    """Run jobs, each a list of steps ``(log_name, make_command)`` run one after the other, on
    ``gpus * jobs_per_gpu`` slots (slot i on GPU i % gpus), in the order given: put the longest
    first. ``make_command()`` runs when the step starts and may return None (skip the step).
    Past ``deadline`` seconds no step starts and running ones get SIGTERM (the trainer saves at
    its next step and exits with 3), SIGKILL after ``grace`` more seconds. A step that exits
    with 3 ends its job (resume it later). Returns (failed outputs, stopped outputs)."""
    devices = visible_devices(gpus) if gpus else [None]
    pending = list(jobs)
    slots = [None] * max(1, len(devices) * jobs_per_gpu)  # (out, steps left, proc, log)
    failed, stopped, start, term_at = [], [], time.time(), None

    def next_step(slot, out, steps):
        while steps:
            log_name, make = steps[0]
            cmd = make()
            steps = steps[1:]
            if cmd is not None:
                proc, log = _start(cmd, out, log_name, devices[slot % len(devices)])
                return (out, steps, proc, log)
        return None

    try:
        while True:
            late = deadline is not None and time.time() - start > deadline
            if late and term_at is None:
                term_at = time.time()
                print(f"deadline {deadline:.0f} s reached: the runs still going save and stop; "
                      f"{len(pending)} not started", flush=True)
                _signal_running(slots, "terminate")
            if term_at is not None and time.time() - term_at > grace:
                _signal_running(slots, "kill")
            for i, entry in enumerate(slots):
                if entry is not None:
                    out, steps, proc, log = entry
                    if proc.poll() is None:
                        continue
                    log.close()
                    if proc.returncode == STOPPED:
                        stopped.append(out)
                        steps = []
                    elif proc.returncode != 0:
                        failed.append(out)
                        steps = []
                    slots[i] = None if (late or not steps) else next_step(i, out, steps)
                while slots[i] is None and pending and not late:
                    out, steps = pending.pop(0)
                    slots[i] = next_step(i, out, steps)
            if all(entry is None for entry in slots) and (late or not pending):
                stopped += [out for out, _ in pending]
                return failed, stopped
            time.sleep(2)
    finally:  # an exception or Ctrl-C here must not leave trainings running unwatched
        _signal_running(slots, "terminate")
