"""Graceful stop: SIGTERM / SIGUSR1 (Slurm's pre-time-limit warning) / SIGINT (Ctrl-C) → save at
the next step. A second Ctrl-C exits at once (exit 130) without saving and without a traceback;
the last complete checkpoint stays in force.

A signal can arrive before the training loop has built its ``StopSignal`` (Slurm's warning or a
preemption while the model, the data or a checkpoint is still loading). Without a handler Python
would die of it (SIGUSR1's default action is to terminate) and the job would not requeue. So the
Slurm launcher starts the trainer through this module:

    python -m ssa_megatron.training.signals ssa_megatron.training.pretrain <flags...>

which installs the handlers first (before torch is imported), then runs the target module as
``__main__``; a ``StopSignal`` created later starts with any signal received in the meantime.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, List, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# the first stop signal received before any StopSignal existed (install_early_handlers)
_early_received: Optional[int] = None


def _early_handle(signum, frame):
    global _early_received
    if _early_received is None:
        _early_received = signum


def install_early_handlers(signals=STOP_SIGNALS) -> None:
    """Remember SIGTERM/SIGUSR1 until the training loop asks (instead of dying of them)."""
    for sig in signals:
        signal.signal(sig, _early_handle)


class StopSignal:
    def __init__(self, signals=STOP_SIGNALS, interrupt: bool = True):
        self.received = _early_received
        self.interrupts = 0
        self.on_force_exit: List[Callable[[], None]] = []  # run before a second Ctrl-C exits
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if interrupt and threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def restore(self) -> None:
        """Give SIGINT back (Ctrl-C raises KeyboardInterrupt again in an in-process caller).
        SIGTERM/SIGUSR1 keep being remembered until the process exits (a late signal from a
        scheduler must not kill a run that is writing its result)."""
        previous = self._previous.pop(signal.SIGINT, None)
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum, frame):
        self.received = signum

    def _interrupt(self, signum, frame):
        self.interrupts += 1
        talk = os.environ.get("RANK", "0") == "0"
        if self.interrupts == 1:
            if self.received is None:
                self.received = signum
            if talk:
                print("Ctrl-C: saving a checkpoint after this step, then exiting "
                      "(Ctrl-C again exits at once without saving)", file=sys.stderr, flush=True)
            return
        if talk:
            print("second Ctrl-C: exiting now without saving; the last complete checkpoint is kept",
                  file=sys.stderr, flush=True)
        for callback in self.on_force_exit:
            try:
                callback()
            except Exception:
                pass
        os._exit(130)

    def any_rank_received(self) -> bool:
        """True on every rank once any rank got the signal (ranks must stop at the same step)."""
        import torch
        import torch.distributed as dist
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


def _run_module_with_early_handlers(argv) -> None:
    import runpy
    import sys
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m ssa_megatron.training.signals MODULE [ARGS...]\n"
                 "  e.g. python -m ssa_megatron.training.signals ssa_megatron.training.pretrain --help")
    # this file runs as __main__: install the handlers in the importable module, which
    # StopSignal (imported by the trainer) reads
    from ssa_megatron.training import signals as module
    module.install_early_handlers()
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    import sys
    _run_module_with_early_handlers(sys.argv[1:])
