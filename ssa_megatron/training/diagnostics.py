"""When and where the trainer records attention diagnostics (model/diagnostics.py)."""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

import torch.distributed as dist

from ssa_megatron.model.diagnostics import AttentionProbe, UpdateNorms
from ssa_megatron.training.checkpoint_format import DIAGNOSTICS


class _StepProbe:
    """One diagnostic iteration: the probed forward and the update norms of its optimizer step."""

    def __init__(self, model, measure_updates: bool):
        self.updates = UpdateNorms(model) if measure_updates else None
        self.probe = AttentionProbe()  # handed to the first micro-batch's forward


def _iteration(line: str) -> float:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, AttributeError, TypeError, KeyError):
        return float("inf")  # not a whole record: moved aside with the later ones


class Diagnostics:
    """Every ``--diagnostics-interval`` iterations, and every iteration up to
    ``--diagnostics-dense-until``, one JSON line per iteration (rank 0's layers and heads)."""

    def __init__(self, args, engine, ds_config):
        self.interval = args.diagnostics_interval
        self.dense_until = args.diagnostics_dense_until
        self.model = engine.module
        self.is_writer = not dist.is_initialized() or dist.get_rank() == 0
        zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.measure_updates = zero_stage < 3
        path = args.diagnostics_json
        if path is None and args.save:
            path = os.path.join(args.save, DIAGNOSTICS)
        self.path: Optional[str] = path if self.is_writer else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def resume_at(self, iteration: int) -> None:
        """A run resumed at ``iteration`` writes the iterations after it again: the records an
        interrupted run wrote past its last checkpoint (and a line cut off by a kill) move to
        ``<path>.past-<iteration>-<time>``, so the record holds each iteration once."""
        if not self.path or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept, past = [], []
        for line in lines:
            (kept if line.endswith("\n") and _iteration(line) <= iteration else past).append(line)
        if not past:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        with open(f"{self.path}.past-{iteration}-{stamp}", "w") as f:
            f.writelines(past)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def due(self, step: int) -> bool:
        """``step``: the 1-based number of the step about to run (the one its record is named by)."""
        return step <= self.dense_until or step % self.interval == 0

    def start(self, step: int) -> Optional[_StepProbe]:
        return _StepProbe(self.model, self.measure_updates) if self.due(step) else None

    def finish(self, step: _StepProbe, iteration: int, lm_loss: float, grad_norm: float,
               lr: float) -> Dict[str, object]:
        record = {"iteration": iteration, "lm_loss": lm_loss, "grad_norm": grad_norm, "lr": lr,
                  "layers": step.probe.summary() if step.probe is not None else []}
        if step.updates is not None:
            record["update_norms"] = step.updates.finish()
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record
