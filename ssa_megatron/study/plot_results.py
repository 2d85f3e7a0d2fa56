"""PNG plots of saved GPU results (docs/results/), drawn from their JSON files.

    # one panel per bench_training.py call (ratios hold only within a call)
    python tools/plot_results.py throughput --out throughput.png docs/results/mfu_h200/*.json
    # per-step losses of trainer result JSONs (e.g. parallel layouts against one GPU)
    python tools/plot_results.py losses --out losses.png "one GPU=docs/results/1gpu_mb2.json" \
        "DP=2=docs/results/dp2_mb2.json"
"""
from __future__ import annotations

import argparse
import json
import os


def _load(path: str) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} does not exist")
    with open(path) as f:
        return json.load(f)


def throughput_rows(result: dict):
    """(variant, step ms, MFU or None, peak GB) of one bench_training.py JSON, skipping errors."""
    rows = []
    for name, r in result.get("results", {}).items():
        if "step_ms" in r:
            rows.append((name, r["step_ms"], r.get("mfu"), r.get("peak_memory_gb")))
    if not rows:
        raise SystemExit("error: no measured variant in a throughput JSON (is it bench_training.py's --json?)")
    return rows


def plot_throughput(plt, paths, out: str) -> None:
    panels = []
    for path in paths:
        result = _load(path)
        panels.append((path, result, throughput_rows(result)))
    height = 1.2 + sum(0.45 * len(rows) + 0.6 for _, _, rows in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, height), squeeze=False)
    for ax, (path, result, rows) in zip(axes[:, 0], panels):
        names = [r[0] for r in rows]
        mfu = [100 * (r[2] or 0.0) for r in rows]
        bars = ax.barh(range(len(rows)), mfu, color=["tab:orange" if "ssa" in n else
                                                     "tab:green" if "sparse" in n else "tab:blue"
                                                     for n in names])
        for bar, (name, ms, _, gb) in zip(bars, rows):
            ax.text(bar.get_width() + 0.5, bar.get_y() + bar.get_height() / 2,
                    f"{ms:.1f} ms/step, {gb:.1f} GB", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 75)
        ax.axvline(40, color="k", lw=0.6, ls="--")
        ax.set_title(f"{result.get('card', '?')}: {os.path.basename(path)} (one call)", fontsize=9)
        ax.set_xlabel("MFU % (dense-model FLOPs; SSA/sparse: dense-equivalent)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_losses(plt, specs, out: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for spec in specs:
        # a label may itself hold '=' (e.g. "DP=2"): the path is what follows the last one
        label, sep, path = spec.rpartition("=")
        if not sep or not label:
            raise SystemExit(f"error: {spec!r}: write LABEL=RESULT_JSON")
        r = _load(path)
        if not r.get("lm_loss"):
            raise SystemExit(f"error: {path} has no per-step lm_loss")
        steps = r.get("iterations") or list(range(1, len(r["lm_loss"]) + 1))
        ax.plot(steps, r["lm_loss"], marker="o", ms=3, lw=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("train LM loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("throughput", allow_abbrev=False, help="bench_training.py JSONs: MFU and step time per variant")
    t.add_argument("jsons", nargs="+")
    t.add_argument("--out", required=True)
    lo = sub.add_parser("losses", allow_abbrev=False, help="trainer result JSONs: per-step loss curves")
    lo.add_argument("runs", nargs="+", metavar="LABEL=RESULT_JSON")
    lo.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if args.kind == "throughput":
        plot_throughput(plt, args.jsons, args.out)
    else:
        plot_losses(plt, args.runs, args.out)
    print(f"wrote {args.out}")
    return 0

