"""The build lock of DeepSpeed's CPU communication op, and the lock a killed process leaves behind.

On the CPU, ``deepspeed.init_distributed`` loads a C++ op through ``torch.utils.cpp_extension``,
which takes a lock file in the op's build directory on every load (not only the first build) and
deletes it when done. A process killed inside that window (``kill -9``, the OOM killer, a Slurm
preemption at start-up) leaves the file, and every later run then waits for it forever. The
holder of a live lock keeps the file open, so a lock that no process has open, seen twice a poll
apart, is abandoned and safe to remove. Only processes visible in this machine's /proc count: a
build directory shared with another node, PID namespace or user (``TORCH_EXTENSIONS_DIR`` on a
shared file system) is outside that promise; give each its own.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional, Tuple

LOCK_NAME = "lock"  # torch.utils.cpp_extension's name for it


def deepspeed_cpu_op_build_dir() -> Optional[str]:
    """Where DeepSpeed builds and loads its CPU communication op, or None when this DeepSpeed /
    accelerator does not use one."""
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return None
        from torch.utils.cpp_extension import _get_build_directory
        return _get_build_directory(builder.NAME, verbose=False)
    except Exception:  # a DeepSpeed without this op builder
        return None


def _identity(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def processes_holding(path: str) -> Optional[list]:
    """The pids that have ``path`` open, among the processes whose open files can be read (this
    user's); None where /proc is not there to ask (then nothing is ever judged abandoned)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    target = os.path.realpath(path)
    holders = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # another user's process, or gone
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    holders.append(int(pid))
                    break
            except OSError:
                continue
    return holders


def _unheld_identity(path: str) -> Optional[Tuple[int, int, int]]:
    """The lock's identity when it exists and no process has it open, else None."""
    before = _identity(path)
    if before is None or processes_holding(path) != []:
        return None
    return before if _identity(path) == before else None


def remove_if_abandoned(path: str, confirm_after_s: float = 0.5) -> bool:
    """Remove the lock at ``path`` if no process has had it open across ``confirm_after_s``
    (the holder closes it a moment before deleting it: one look could catch that moment)."""
    first = _unheld_identity(path)
    if first is None:
        return False
    threading.Event().wait(confirm_after_s)
    if _unheld_identity(path) != first:
        return False
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def abandoned_lock_cleared(build_dir: Optional[str], poll_s: float = 0.5, say=print) -> Iterator[None]:
    """While the body runs (a load that may wait on the lock), remove the build lock in
    ``build_dir`` whenever it is abandoned, saying so in one line."""
    if build_dir is None:
        yield
        return
    path = os.path.join(build_dir, LOCK_NAME)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if os.path.exists(path) and remove_if_abandoned(path, confirm_after_s=poll_s):
                say(f"removed {path}: a build lock left by a process that was killed while loading "
                    "DeepSpeed's CPU communication op")
            done.wait(poll_s)

    watcher = threading.Thread(target=watch, name="build-lock-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
