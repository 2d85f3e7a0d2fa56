"""What keeps a run from destroying checkpoints: the save-directory lock, the resume / start-over
decision, and skipping optimizer steps whose loss or gradient norm is not finite.

* **Lock.** ``--save DIR`` holds ``DIR/run.lock`` (JSON: host, PID, the PID's start time, start
  time, Slurm job, command) for the whole run, created with O_EXCL by global rank 0 only (one lock
  per run; the other ranks learn the outcome by broadcast, so all of them stop together). A second
  run is refused in one line. A lock whose holder is gone is taken over with a log line: same host
  and that PID is dead or is another process now (its start time differs), or the same Slurm job
  (a requeued job's earlier attempt). A holder on another host cannot be checked and is refused.
* **Resume or start over.** A ``--save`` directory that holds checkpoints is only written by a run
  that loads from it: without ``--load`` the run resumes from it (auto-resume, one log line);
  ``--load ELSEWHERE`` is refused; ``--start-over`` moves the old checkpoints aside into
  ``DIR/set_aside_<time>/`` (renamed, never deleted).
* **Non-finite steps.** DeepSpeed's ZeRO, bf16 and fp16 optimizers already skip a step whose
  gradients are not finite (``overflow``; the LR schedule does not advance); for the plain fp32
  optimizer (ZeRO-0) :func:`ssa_megatron.engine_patches.guard_fp32_optimizer` gives it the same behaviour. :class:`NonFiniteSteps`
  counts skipped steps and stops the run after ``--max-skipped-steps`` in a row.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import socket
import sys
import time
from typing import List, Optional

from ssa_megatron import engine_patches
from ssa_megatron.training.checkpoint_format import (DIAGNOSTICS, LATEST, PARTIAL, CheckpointError,
                                                     broadcast_from_rank0, fsync_dir, iteration_of,
                                                     list_tags, read_latest)

LOCK = "run.lock"


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (tells a reused PID apart), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SaveDirLock:
    """``DIR/run.lock`` for one run (see the module docstring)."""

    def __init__(self, save_dir: str):
        self.save_dir = save_dir
        self.path = os.path.join(save_dir, LOCK)
        self.held = False

    def _describe(self, holder: dict) -> str:
        job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return (f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, "
                f"started {holder.get('started', '?')}{job}")

    def _holder_gone(self, holder: dict) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:
            return True  # this job's earlier attempt: Slurm runs one attempt at a time
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return True
        start = _process_start(pid)
        return holder.get("pid_start") is not None and start is not None and start != holder["pid_start"]

    def acquire(self) -> List[str]:
        """Take the lock; returns log lines. Raises CheckpointError if a live run holds it."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "slurm_job": os.environ.get("SLURM_JOB_ID"), "command": " ".join(sys.argv)[:1000]}
        notes: List[str] = []
        for attempt in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    json.dump(me, f)
                    f.flush()
                    os.fsync(f.fileno())
                fsync_dir(self.save_dir)
                self.held = True
                atexit.register(self.release)
                return notes
            try:
                with open(self.path) as f:
                    holder = json.load(f)
                if not isinstance(holder, dict):
                    raise ValueError
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, ValueError):
                # being written right now, or left empty by a holder killed while writing it
                try:
                    age = time.time() - os.path.getmtime(self.path)
                except OSError:
                    continue
                if age < 5:
                    time.sleep(0.25)
                    continue
                holder = {"host": "?", "pid": "?", "started": "? (unreadable lock file)"}
                gone = True
            else:
                gone = self._holder_gone(holder)
            if not gone:
                hint = (f"; if that run is gone, delete {self.path}"
                        if holder.get("host") != socket.gethostname() else "")
                raise CheckpointError(f"--save {self.save_dir} is in use by another run "
                                      f"({self._describe(holder)}): wait for it to end or use another "
                                      f"--save directory{hint}")
            stale = f"{self.path}.stale.{os.getpid()}"
            try:
                os.rename(self.path, stale)  # one taker wins; the others retry the O_EXCL create
            except FileNotFoundError:
                continue
            os.remove(stale)
            notes.append(f"took over the lock {self.path} of a run that is gone ({self._describe(holder)})")
        raise CheckpointError(f"could not take the lock {self.path}; is another run starting in "
                              f"--save {self.save_dir} right now?")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            with open(self.path) as f:
                holder = json.load(f)
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                os.remove(self.path)
        except (OSError, ValueError):
            pass


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def describe_checkpoints(save_dir: str) -> Optional[str]:
    """What ``save_dir`` holds ("iter_0000042 (latest)"), or None when it holds no checkpoint."""
    tags = list_tags(save_dir)
    latest = read_latest(save_dir) if os.path.isfile(os.path.join(save_dir, LATEST)) else None
    if latest is not None:
        return f"latest {latest}"
    if tags:
        return f"newest {tags[-1]}, no latest"
    return None


def set_aside(save_dir: str) -> str:
    """Move every checkpoint of ``save_dir``, ``latest`` and the diagnostics record into a new
    ``set_aside_<time>`` folder."""
    dest = os.path.join(save_dir, f"set_aside_{time.strftime('%Y%m%d-%H%M%S')}")
    n = 0
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(save_dir, f"set_aside_{time.strftime('%Y%m%d-%H%M%S')}_{n}")
    os.makedirs(dest)
    for name in os.listdir(save_dir):
        base = name.split(".replaced-")[0]
        if name in (LATEST, DIAGNOSTICS) or iteration_of(base) is not None:
            os.rename(os.path.join(save_dir, name), os.path.join(dest, name))
    fsync_dir(save_dir)
    return dest


class RunGuard:
    """The lock (on rank 0) and the resume decision of one run; ``release()`` at the end."""

    def __init__(self, lock: Optional[SaveDirLock]):
        self.lock = lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _decide(args, lock: SaveDirLock) -> dict:
    """Rank 0: lock ``--save``, then decide what to load. Returns {"load", "notes"} or {"error"}."""
    save = args.save
    notes: List[str] = []
    try:
        os.makedirs(save, exist_ok=True)
        notes += lock.acquire()
        load = args.load
        same = load is not None and _same_dir(load, save)
        held = describe_checkpoints(save)
        if args.start_over:
            if same:
                raise CheckpointError(f"--start-over moves the checkpoints of {save} aside, but --load "
                                      "names the same directory: drop --load (a launcher that always "
                                      "passes both, like slurm/, needs a new RUN_NAME instead)")
            if held:
                dest = set_aside(save)
                notes.append(f"--start-over: moved the earlier checkpoints of {save} ({held}) to {dest}")
        elif held and load is None:
            load = save
            notes.append(f"auto-resume: --save {save} holds checkpoints ({held}); resuming from it "
                         "(--start-over moves them aside to start again)")
        elif held and not same:
            raise CheckpointError(f"--save {save} already holds checkpoints ({held}) of another run, and "
                                  f"this run loads {load}: resume it with --load {save} (or no --load), "
                                  "start over with --start-over (moves them aside), or use a new --save")
        for name in os.listdir(save):
            if name.endswith(PARTIAL) and iteration_of(name[:-len(PARTIAL)]) is not None:
                shutil.rmtree(os.path.join(save, name), ignore_errors=True)
                notes.append(f"removed {save}/{name}, an unfinished save of an earlier run")
        return {"load": load, "notes": notes}
    except (CheckpointError, OSError) as err:
        lock.release()
        return {"error": str(err) if isinstance(err, CheckpointError) else
                f"cannot use --save {save}: {err}"}


def prepare_save_dir(args, log=print) -> RunGuard:
    """Lock ``args.save`` and settle ``args.load`` (auto-resume / start over / refuse) on every rank.

    Collective: global rank 0 decides, every rank applies the same decision or raises the same
    CheckpointError (so no rank goes on to build the model while another exits)."""
    import torch.distributed as dist
    if not args.save:
        if getattr(args, "start_over", False):
            raise CheckpointError("--start-over needs --save DIR (it moves DIR's checkpoints aside)")
        return RunGuard(None)
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock = SaveDirLock(args.save)
    decision = broadcast_from_rank0(_decide(args, lock) if rank == 0 else None)
    if decision.get("error"):
        raise CheckpointError(decision["error"])
    args.load = decision["load"]
    if rank == 0:
        for note in decision["notes"]:
            log(note)
    return RunGuard(lock if rank == 0 else None)


class NonFiniteSteps:
    """Counts optimizer steps skipped for a non-finite loss or gradient norm."""

    def __init__(self, engine, limit: int):
        self.engine = engine
        self.limit = limit
        self.in_a_row = 0
        self.total = 0
        self._seen = engine.skipped_steps
        engine_patches.guard_fp32_optimizer(engine)

    def check(self, iteration: int, loss: float, grad_norm: float) -> Optional[str]:
        """After each iteration (same values on every rank): a warning line when it was skipped."""
        skipped = self.engine.skipped_steps > self._seen
        self._seen = self.engine.skipped_steps
        # fp16 overflows are the loss scaler finding its scale (DeepSpeed reports those itself)
        bad = not math.isfinite(loss) or (skipped and not self.engine.fp16_enabled())
        if not bad:
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        self.total += 1
        what = "optimizer step skipped" if skipped else "step NOT skipped (gradients were finite)"
        return (f"warning: iteration {iteration}: loss {loss:.4g}, grad norm {grad_norm:.4g} is not finite: "
                f"{what} ({self.in_a_row} in a row, {self.total} in this run"
                + (f"; the run stops after {self.limit} in a row)" if self.limit else ")"))

    @property
    def exhausted(self) -> bool:
        return bool(self.limit) and self.in_a_row >= self.limit

    def halt(self, iteration: int, consumed: int, saved: Optional[str]) -> CheckpointError:
        """The one-line error that stops the run (raise it on every rank)."""
        where = f"; saved {saved}" if saved else " (no --save: nothing saved)"
        return CheckpointError(
            f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm, the last "
            f"at iteration {iteration} (after {consumed} samples){where}: lower --lr or check the data "
            "there, then resume, or go back to an earlier checkpoint with --load-iteration N "
            f"(--max-skipped-steps {self.limit} sets this limit)")
