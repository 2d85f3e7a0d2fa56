"""The evaluation result as a table (stdout), a JSON file and a PNG."""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from typing import List


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict) -> str:
    lines: List[str] = []
    ppl = result.get("perplexity") or []
    if ppl:
        lines.append("perplexity")
        w = max(6, *(len(r["mode"]) for r in ppl))
        lines.append(f"  {'length':>7} {'rope':>5} {'mode':>{w}} {'blocks':>6} {'tokens':>10} "
                     f"{'nll':>8} {'ppl':>10}")
        for r in ppl:
            lines.append(f"  {r['seq_length']:>7} {_fmt(r['rope_scaling_factor'], '.2g'):>5} "
                         f"{r['mode']:>{w}} {r['block_counts'] or '-':>6} {r['tokens']:>10} "
                         f"{r['nll']:>8.4f} {r['ppl']:>10.3f}")
    sp = result.get("sparsity")
    if sp:
        bcs = [str(b) for b in sp["block_counts"]]
        lines.append(f"attention sparsity at length {sp['seq_length']} ({sp['windows']} windows): "
                     "dropped mass / heads with top-k >= 90% / alignment gap")
        lines.append(f"  {'layer':>5} " + " ".join(f"{'k=' + b:>22}" for b in bcs))
        rows = [(str(e["layer"]), e["by_block_counts"]) for e in sp["per_layer"]]
        rows.append(("mean", sp["mean"]))
        for name, by in rows:
            cells = [f"{_fmt(by[b]['dropped_mass'])}/{_fmt(by[b]['topk_ge90_heads'], '.2f')}/"
                     f"{_fmt(by[b]['alignment_gap'])}" for b in bcs]
            lines.append(f"  {name:>5} " + " ".join(f"{c:>22}" for c in cells))
    nd = result.get("needle")
    if nd:
        lines.append("needle in a haystack: retrieval accuracy")
        depths = sorted({r["depth"] for r in nd["summary"]})
        lines.append(f"  {'length':>7} {'mode':>12} " + " ".join(f"{'d=' + format(d, 'g'):>7}" for d in depths)
                     + f" {'all':>6}")
        keys = sorted({(r["length"], r["mode"], r["block_counts"] or 0) for r in nd["summary"]})
        for length, mode, bc in keys:
            rs = {r["depth"]: r for r in nd["summary"]
                  if r["length"] == length and r["mode"] == mode and (r["block_counts"] or 0) == bc}
            name = mode if not bc else f"{mode}@{bc}"
            accs = [rs[d]["accuracy"] if d in rs else None for d in depths]
            n = sum(rs[d]["samples"] for d in rs)
            total = sum(rs[d]["accuracy"] * rs[d]["samples"] for d in rs) / max(n, 1)
            lines.append(f"  {length:>7} {name:>12} " + " ".join(f"{_fmt(a, '.2f'):>7}" for a in accs)
                         + f" {total:>6.2f}")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    """Atomic write (a temp file renamed into place)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".eval-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_plot(result: dict, path: str) -> None:
    """PNG: perplexity vs block_counts (sparse per length, full as a dashed level) and dropped
    mass per layer (one line per block budget)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib "
                           "(or pip install -e .[plots])") from None
    sp = result.get("sparsity")
    ncols = 2 if sp else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    ppl = result.get("perplexity") or []
    keys = sorted({(r["seq_length"], r["rope_scaling_factor"] or 1.0) for r in ppl})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (length, factor) in enumerate(keys):
        c = colors[i % len(colors)]
        label = f"L={length}" + (f", rope x{factor:g}" if factor != 1.0 else "")
        rows = [r for r in ppl if r["seq_length"] == length and (r["rope_scaling_factor"] or 1.0) == factor]
        curves = sorted({r["mode"] for r in rows if r["block_counts"]},  # sparse, sparse+denseN
                        key=lambda m: (len(m), m))
        for mode, marker in zip(curves, itertools.cycle(("o-", "s:", "^-.", "v--", "d-"))):
            pts = sorted((r["block_counts"], r["ppl"]) for r in rows if r["mode"] == mode)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker, color=c, label=f"{mode} {label}")
        for r in rows:
            if not r["block_counts"]:
                ax.axhline(r["ppl"], color=c, linestyle="--", label=f"{r['mode']} {label}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block_counts (blocks of %s tokens)" % result.get("block_size", 16))
    ax.set_ylabel("perplexity")
    ax.set_title(result.get("name", "perplexity vs block budget"))
    ax.legend(fontsize=7)
    if sp:
        ax = axes[0][1]
        layers = [e["layer"] for e in sp["per_layer"]]
        for bc in sp["block_counts"]:
            ys = [e["by_block_counts"][str(bc)]["dropped_mass"] for e in sp["per_layer"]]
            ax.plot(layers, ys, "o-", label=f"k={bc}")
        ax.set_xticks(layers)
        ax.set_xlabel("layer")
        ax.set_ylabel("dropped attention mass (1 - mass in selected blocks)")
        ax.set_title(f"dropped mass per layer, L={sp['seq_length']}")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".eval-", suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
