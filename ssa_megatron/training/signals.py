"""Graceful stop: SIGTERM / SIGUSR1 (Slurm's pre-time-limit warning) → save at the next step."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopSignal:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def any_rank_received(self) -> bool:
        """True on every rank once any rank got the signal (ranks must stop at the same step)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
