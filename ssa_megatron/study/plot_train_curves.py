"""Train-loss curves of several runs (each a trainer output folder with train.json, resumed
parts joined) in one PNG: the moving average of the per-step loss, and each run minus the first
(or, with --paired, each second run of a pair minus the first: runs of one seed that saw the same
samples, so the data's own step-to-step swings cancel).

    python tools/plot_train_curves.py --out curves.png \
        "Full-Full=docs/results/compare100/full-full_seed1" "SSA=docs/results/compare100/ssa_seed1"
"""
from __future__ import annotations

import argparse

import numpy as np

from ssa_megatron.study.paper_comparison import step_losses


def moving_average(steps, values, window: int):
    steps, values = np.asarray(steps), np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) < window:
        return steps, values
    kernel = np.ones(window) / window
    return steps[window - 1:], np.convolve(values, kernel, mode="valid")


def load_runs(specs):
    runs = []
    for spec in specs:
        # as in plot_results.py: a label may hold '=', the path follows the last one
        label, sep, path = spec.rpartition("=")
        if not sep or not label:
            raise SystemExit(f"error: {spec!r}: write LABEL=RUN_DIR")
        losses, _ = step_losses(path)
        if not losses:
            raise SystemExit(f"error: {path} has no train.json with per-step losses")
        steps = sorted(losses)
        runs.append((label, steps, [losses[s] for s in steps]))
    return runs


def up_to(runs, max_step):
    """The runs of :func:`load_runs` cut after ``max_step`` (None: whole)."""
    if not max_step:
        return runs
    return [(label, [s for s in steps if s <= max_step],
             [v for s, v in zip(steps, values) if s <= max_step]) for label, steps, values in runs]


def differences(runs, paired: bool):
    """(index of the run in ``runs``, label, steps, run minus its baseline) for each compared
    run: every run after the first against the first, or with ``paired`` the second run of each
    consecutive pair against the first of it; only the steps both runs logged (a pair without
    common steps is left out)."""
    if paired and len(runs) % 2:
        raise SystemExit("error: --paired takes the runs as pairs BASELINE RUN; give an even number")
    pairs = [(i, i + 1) for i in range(0, len(runs), 2)] if paired else \
        [(0, i) for i in range(1, len(runs))]
    out = []
    for b, i in pairs:
        (base_label, base_steps, base_values), (label, steps, values) = runs[b], runs[i]
        base = dict(zip(base_steps, base_values))
        common = [(s, v - base[s]) for s, v in zip(steps, values) if s in base]
        if common:
            out.append((i, f"{label} - {base_label}", [s for s, _ in common], [d for _, d in common]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--smooth", type=int, default=25, help="moving-average window in steps")
    p.add_argument("--title", default="")
    p.add_argument("--max-step", type=int, default=None, help="plot steps up to this one only")
    p.add_argument("--ymax", type=float, default=6.0, help="top of the loss axis")
    p.add_argument("--paired", action="store_true",
                   help="runs come as pairs BASELINE RUN (e.g. two systems on one seed); the lower "
                        "panel shows each RUN minus its BASELINE instead of every run minus the first")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = up_to(load_runs(args.runs), args.max_step)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    diffs = differences(runs, args.paired)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, steps, values) in enumerate(runs):
        x, y = moving_average(steps, values, args.smooth)  # one color per run in both panels
        top.plot(x, y, label=label, lw=1.2, color=colors[i % len(colors)])
    for i, label, steps, values in diffs:  # each difference in its run's colour
        x, y = moving_average(steps, values, args.smooth)
        bottom.plot(x, y, label=label, lw=1.2, color=colors[i % len(colors)])
    top.set_ylabel(f"train LM loss ({args.smooth}-step mean)")
    top.set_ylim(top=min(top.get_ylim()[1], args.ymax))
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.axhline(0.0, color="k", lw=0.6)
    bottom.set_xlabel("step")
    bottom.set_ylabel("difference (nats)")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    if args.title:
        top.set_title(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0

