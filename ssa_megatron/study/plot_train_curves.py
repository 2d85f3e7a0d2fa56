"""Train-loss curves of several runs (each a trainer output folder with train.json, resumed
parts joined) in one PNG: the moving average of the per-step loss, and each run minus the first.

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--smooth", type=int, default=25, help="moving-average window in steps")
    p.add_argument("--title", default="")
    p.add_argument("--max-step", type=int, default=None, help="plot steps up to this one only")
    p.add_argument("--ymax", type=float, default=6.0, help="top of the loss axis")
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = up_to(load_runs(args.runs), args.max_step)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    base_label, base_steps, base_values = runs[0]
    base = dict(zip(base_steps, base_values))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, steps, values) in enumerate(runs):
        color = colors[i % len(colors)]  # one color per run in both panels
        x, y = moving_average(steps, values, args.smooth)
        top.plot(x, y, label=label, lw=1.2, color=color)
        common = [s for s in steps if s in base]
        if i > 0 and common:
            diff = [v - base[s] for s, v in zip(steps, values) if s in base]
            x, y = moving_average(common, diff, args.smooth)
            bottom.plot(x, y, label=f"{label} - {base_label}", lw=1.2, color=color)
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

