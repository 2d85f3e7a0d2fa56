"""How far runs that should be alike spread: window means of the per-step train loss, the first
step a run leaves a reference run by more than a threshold, and the largest gradient norm in a
window, for runs that differ only in GPU summation order (replicates) or in one setting.

    python tools/replicate_spread.py --reference w2a \\
        w2a=docs/results/robust_h100/w2a_seed1 w2b=docs/results/robust_h100/w2b_seed1 ...

Each run is a trainer output folder with train.json (resumed parts joined). Window means, not
single steps, are compared: one step's loss swings by ~0.1 nats between replicates.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Sequence, Tuple

from ssa_megatron.study.paper_comparison import step_losses

Window = Tuple[int, int]


def parse_window(text: str) -> Window:
    first, sep, last = text.partition("-")
    try:
        window = (int(first), int(last if sep else first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write FIRST-LAST steps, e.g. 51-150") from None
    if window[0] < 1 or window[1] < window[0]:
        raise argparse.ArgumentTypeError(f"{text!r}: steps from 1, FIRST <= LAST")
    return window


def window_mean(series: Dict[int, float], window: Window) -> Optional[float]:
    """Mean over the steps of ``window`` (inclusive); None unless the run has every one."""
    steps = range(window[0], window[1] + 1)
    if any(s not in series for s in steps):
        return None
    return sum(series[s] for s in steps) / len(steps)


def first_departure(series: Dict[int, float], reference: Dict[int, float],
                    threshold: float) -> Optional[int]:
    """The first step both runs have where they differ by more than ``threshold``."""
    for step in sorted(set(series) & set(reference)):
        if abs(series[step] - reference[step]) > threshold:
            return step
    return None


def spread(runs: Dict[str, str], windows: Sequence[Window], reference: Optional[str] = None,
           threshold: float = 0.005, grad_window: Optional[Window] = None) -> dict:
    """{"runs": [per-run row], "spread": {window: max - min of the window means}}."""
    losses, grads = {}, {}
    for name, path in runs.items():
        loss, _ = step_losses(path)
        if not loss:
            raise ValueError(f"{path} has no train.json with per-step losses")
        losses[name] = loss
        grads[name] = {s: g for s, g in (step_losses(path, "grad_norm")[0] or {}).items() if g is not None}
    reference = reference or next(iter(runs))
    if reference not in runs:
        raise ValueError(f"--reference {reference!r} is not one of the runs ({', '.join(runs)})")
    rows: List[dict] = []
    for name in runs:
        row = {"run": name, "windows": {f"{a}-{b}": window_mean(losses[name], (a, b)) for a, b in windows}}
        if name != reference:
            row["first_departure"] = first_departure(losses[name], losses[reference], threshold)
        if grad_window:
            norms = [grads[name][s] for s in range(grad_window[0], grad_window[1] + 1) if s in grads[name]]
            row["max_grad_norm"] = max(norms) if norms else None
        rows.append(row)
    spreads = {}
    for a, b in windows:
        means = [r["windows"][f"{a}-{b}"] for r in rows if r["windows"][f"{a}-{b}"] is not None]
        spreads[f"{a}-{b}"] = max(means) - min(means) if len(means) > 1 else None
    return {"reference": reference, "threshold": threshold,
            "grad_window": list(grad_window) if grad_window else None, "runs": rows, "spread": spreads}


def format_table(report: dict) -> str:
    names = list(report["spread"])
    grad = report["grad_window"]
    head = (["run"] + [f"loss {w}" for w in names]
            + [f"first step > {report['threshold']} from {report['reference']}"]
            + ([f"max grad norm {grad[0]}-{grad[1]}"] if grad else []))
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in report["runs"]:
        cells = [r["run"]] + [fmt(r["windows"][w]) for w in names]
        cells.append("-" if r["run"] == report["reference"] else
                     ("none" if r["first_departure"] is None else str(r["first_departure"])))
        if grad:
            cells.append(fmt(r["max_grad_norm"], 2))
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["spread (max - min)"] + [fmt(report["spread"][w]) for w in names] + ["", ""][:1 + bool(grad)]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    p.add_argument("--reference", default=None, help="the run the others are compared with "
                                                     "(default: the first)")
    p.add_argument("--windows", nargs="+", type=parse_window,
                   default=[(21, 30), (31, 50), (51, 150), (141, 150)], metavar="FIRST-LAST")
    p.add_argument("--threshold", type=float, default=0.005,
                   help="nats: a run has left the reference at the first step it differs by more")
    p.add_argument("--grad-window", type=parse_window, default=(30, 36), metavar="FIRST-LAST")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.runs:
        label, sep, path = spec.rpartition("=")
        if not sep or not label:
            p.error(f"{spec!r}: write LABEL=RUN_DIR")
        runs[label] = path
    try:
        report = spread(runs, args.windows, args.reference, args.threshold, args.grad_window)
    except ValueError as err:
        p.exit(1, f"error: {err}\n")
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
