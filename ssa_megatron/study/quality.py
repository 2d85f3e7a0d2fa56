"""The SSA quality study (issue: SSA training is bistable): many seeds of small models side by
side on one GPU, every run logging attention diagnostics from step 0, then a summary that
classifies each SSA run by its gap to Full-Full and compares good and bad runs.

The small setting (study/recipes.py) follows the independent plain-PyTorch study it reproduces,
with AdamW (0.9, 0.95), wd 0.1, clip 1, bf16, alpha 10. 600 x 4 x 4096 = 9.8M tokens: under one
pass of the english corpus's train split.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import statistics
import sys
from typing import Dict, List, Optional

from ssa_megatron.study.recipes import MEAN_RECIPE, PAPER_SCORE, PAPER_SSA, SEQUENCE_DRAW, SMALL_SETTING, shape_flags

# Named recipes: trainer flags on top of the small setting (--bf16 unless the name says fp32).
VARIANTS: Dict[str, List[str]] = {
    "full-full": ["--attention-mode", "full"],
    "sparse-sparse": ["--attention-mode", "sparse"],
    "ssa-step": ["--attention-mode", "ssa", *PAPER_SSA],
    "ssa-seq": ["--attention-mode", "ssa", *MEAN_RECIPE],
    "ssa-step-fp32": ["--attention-mode", "ssa", *PAPER_SSA],
    "full-full-fp32": ["--attention-mode", "full"],
    "ssa-step-qknorm": ["--attention-mode", "ssa", *PAPER_SSA, "--qk-layernorm"],
    "ssa-step-fullwarm": ["--attention-mode", "ssa", *PAPER_SSA,
                          "--ssa-full-prob-schedule", "0:1.0,100:1.0,150:0.5"],
    "ssa-step-gate0": ["--attention-mode", "ssa", *PAPER_SSA, "--ssa-gate-init", "zero"],
    "ssa-seq-qknorm": ["--attention-mode", "ssa", *MEAN_RECIPE, "--qk-layernorm"],
    "full-full-qknorm": ["--attention-mode", "full", "--qk-layernorm"],
    "ssa-step-alpha0": ["--attention-mode", "ssa", *PAPER_SSA, "--ssa-align-coef", "0"],
    "ssa-seq-align1": ["--attention-mode", "ssa", *MEAN_RECIPE, "--ssa-align-coef", "1"],
    "ssa-seq-full75": ["--attention-mode", "ssa", *SEQUENCE_DRAW, "--ssa-full-prob", "0.75", *PAPER_SCORE],
    "ssa-seq-full25": ["--attention-mode", "ssa", *SEQUENCE_DRAW, "--ssa-full-prob", "0.25", *PAPER_SCORE],
    # the recipe to mid-run, then more sparse sequences (the large comparison's late-sparse run)
    "ssa-seq-late-sparse": ["--attention-mode", "ssa", *MEAN_RECIPE,
                            "--ssa-full-prob-schedule", "0:0.5,0.5:0.5,1.0:0.1"],
    # the recipe plus the selection alignment loss (ops/selection_loss.py)
    "ssa-seq-select": ["--attention-mode", "ssa", *MEAN_RECIPE, "--ssa-select-align-coef", "1.0"],
    "ssa-seq-select-proj": ["--attention-mode", "ssa", *MEAN_RECIPE, "--ssa-select-proj",
                            "--ssa-select-align-coef", "0.1"],
}

FINAL_WINDOW = 100  # the final train loss: mean over the last this-many steps
BAD_GAP = 0.08  # nats above the Full-Full mean (final window) that make an SSA run "bad"
DIAGNOSTIC_KEYS = ("entropy_full", "entropy_sparse", "kept_mass", "max_logit", "q_norm", "k_norm",
                   "gate_mean", "gate_saturated", "output_gap")


def parse_variants(specs) -> Dict[str, List[str]]:
    """``NAME=FLAGS`` recipes added to (or replacing) the named ones."""
    out = dict(VARIANTS)
    for spec in specs or []:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: --variant {spec!r}: write NAME=FLAGS, e.g. "
                             "'ssa-lowlr=--attention-mode ssa --lr 5e-4'")
        out[name] = shlex.split(flags)
    return out


def train_command(name: str, flags: List[str], seed: int, run_dir: str, data_path: str,
                  setting: Optional[dict] = None, eval_iters: int = 16,
                  diagnostics_interval: int = 10, extra: Optional[List[str]] = None) -> List[str]:
    s = dict(SMALL_SETTING, **(setting or {}))
    precision = [] if "fp32" in name else ["--bf16"]
    return [sys.executable, "-m", "ssa_megatron.training.pretrain", *shape_flags(s),
            "--micro-batch-size", str(s["micro_batch_size"]),
            "--global-batch-size", str(s["global_batch_size"]),
            "--train-iters", str(s["train_iters"]), "--lr", str(s["lr"]), "--min-lr", str(s["min_lr"]),
            "--lr-warmup-iters", str(s["warmup_iters"]), "--weight-decay", "0.1",
            "--clip-grad", "1.0", *precision, "--seed", str(seed),
            "--data-path", data_path, "--split", "98,2,0", "--num-workers", "1",
            "--no-bias-swiglu-fusion", "--no-cross-entropy-loss-fusion",
            "--log-interval", "10", "--eval-interval", str(s["train_iters"]),
            "--eval-iters", str(eval_iters), "--eval-modes", "full", "sparse:8", "sparse:16",
            "--diagnostics-interval", str(diagnostics_interval), "--diagnostics-dense-until", "60",
            "--diagnostics-json", os.path.join(run_dir, "diagnostics.jsonl"),
            "--result-json", os.path.join(run_dir, "train.json"),
            *flags, *(extra or [])]


def plan_jobs(groups: Dict[str, List[int]]) -> List[tuple]:
    """(name, seed) pairs interleaved across groups, lowest seeds first, so a deadline that cuts
    the queue leaves every group with some seeds."""
    jobs, depth = [], max((len(s) for s in groups.values()), default=0)
    for i in range(depth):
        for name, seeds in groups.items():
            if i < len(seeds):
                jobs.append((name, seeds[i]))
    return jobs


# ---------------------------------------------------------------------------------------------
# Summary


def read_run(run_dir: str) -> Optional[dict]:
    """A run's record with its per-step losses and gradient norms over every part (a resumed
    run's earlier parts included), and its diagnostics; None before its first logged step."""
    from ssa_megatron.training.result_record import read_series
    losses, records = read_series(os.path.join(run_dir, "train.json"))
    if not losses:
        return None
    norms, _ = read_series(os.path.join(run_dir, "train.json"), "grad_norm")
    steps = sorted(losses)
    result = dict(records[-1], lm_loss=[losses[s] for s in steps],
                  grad_norm=[(norms or {}).get(s) for s in steps])
    diag = []
    dpath = os.path.join(run_dir, "diagnostics.jsonl")
    if os.path.isfile(dpath):
        with open(dpath) as f:
            diag = [json.loads(line) for line in f if line.strip()]
    result["diagnostics"] = diag
    return result


def moving_average(values: List[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def final_loss(losses: List[float]) -> float:
    tail = losses[-FINAL_WINDOW:]
    return sum(tail) / len(tail)


def _mean_sd(values):
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def layer_mean(record: dict, key: str) -> Optional[float]:
    vals = []
    for layer in record.get("layers", []):
        v = layer.get(key)
        if v is None:
            continue
        vals.append(sum(v) / len(v) if isinstance(v, list) else v)
    return sum(vals) / len(vals) if vals else None


def onset_step(gap_curve: List[float], final_gap: float, share: float = 0.9) -> Optional[int]:
    """First step from which at least ``share`` of the smoothed gaps to Full-Full lie above half
    the final gap (a noisy curve may dip below it now and then)."""
    if final_gap <= 0:
        return None
    half = final_gap / 2
    above = [g > half for g in gap_curve]
    for i in range(len(above)):
        rest = above[i:]
        if rest[0] and sum(rest) >= share * len(rest):
            return i + 1
    return None


def comparable_runs(runs: Dict[str, Dict[int, dict]], at_step: Optional[int] = None):
    """Runs compared over the same steps: with ``at_step``, every run that reached it, cut there
    (its end-of-run validation dropped unless it ended there); otherwise the runs that reached
    the longest length (a run cut short by a deadline is left out)."""
    lengths = [len(r["lm_loss"]) for seeds in runs.values() for r in seeds.values() if r]
    target = at_step or max(lengths, default=0)
    out = {}
    for name, seeds in runs.items():
        for seed, r in seeds.items():
            if not r or len(r["lm_loss"]) < target:
                continue
            if len(r["lm_loss"]) > target:
                r = dict(r, lm_loss=r["lm_loss"][:target], grad_norm=r.get("grad_norm", [])[:target],
                         valid_loss_modes=None,
                         diagnostics=[d for d in r.get("diagnostics", []) if d["iteration"] <= target])
            out.setdefault(name, {})[seed] = r
    return out


def summarize(runs: Dict[str, Dict[int, dict]], reference: str = "full-full",
              bad_gap: float = BAD_GAP, probe_steps=(5, 10, 20, 30, 40, 50, 60, 100, 200, 400, 600),
              at_step: Optional[int] = None) -> dict:
    """Per run: final train loss, valid losses per mode, gap to the reference group's mean,
    good/bad; per group: mean and spread; diagnostics of good and bad SSA runs at probe steps."""
    runs = comparable_runs(runs, at_step)
    ref_runs = [r for r in runs.get(reference, {}).values() if r]
    ref_final = _mean_sd([final_loss(r["lm_loss"]) for r in ref_runs])[0] if ref_runs else None
    ref_curve = None
    if ref_runs:
        length = min(len(r["lm_loss"]) for r in ref_runs)
        ref_curve = [statistics.fmean(r["lm_loss"][i] for r in ref_runs) for i in range(length)]
    table, groups = [], {}
    for name, seeds in runs.items():
        rows = []
        for seed, r in sorted(seeds.items()):
            if not r:
                continue
            losses = r["lm_loss"]
            row = {"name": name, "seed": seed, "steps": len(losses), "final_train_loss": final_loss(losses)}
            modes = (r.get("valid_loss_modes") or [{}])[-1]
            row.update({f"valid_{k}": v for k, v in modes.items() if k != "iteration"})
            if ref_final is not None:
                row["gap"] = row["final_train_loss"] - ref_final
                row["basin"] = "bad" if row["gap"] > bad_gap else "good"
                n = min(len(losses), len(ref_curve))
                curve = moving_average([losses[i] - ref_curve[i] for i in range(n)], 20)
                row["onset_step"] = onset_step(curve, row["gap"]) if row["basin"] == "bad" else None
            row["max_grad_norm_first_100"] = max((g for g in r.get("grad_norm", [])[:100] if g is not None),
                                                 default=None)
            rows.append(row)
        table += rows
        if rows:
            g = {"runs": len(rows)}
            for key in ("final_train_loss", "gap", "valid_full", "valid_sparse:8", "valid_sparse:16"):
                g[key], g[key + "_sd"] = _mean_sd([row.get(key) for row in rows])
            if ref_final is not None:
                g["bad"] = sum(row["basin"] == "bad" for row in rows)
            groups[name] = g
    return {"reference": reference, "bad_gap": bad_gap, "runs": table, "groups": groups,
            "diagnostics": compare_diagnostics(runs, table, probe_steps)}


def compare_diagnostics(runs, table, probe_steps) -> dict:
    """Layer-mean diagnostics at ``probe_steps``, averaged over the runs of each (group, basin)."""
    out = {}
    for row in table:
        key = f"{row['name']}/{row.get('basin', 'all')}"
        r = runs[row["name"]][row["seed"]]
        by_step = {d["iteration"]: d for d in r.get("diagnostics", [])}
        for step in probe_steps:
            d = by_step.get(step)
            if d is None:
                continue
            cell = out.setdefault(key, {}).setdefault(str(step), {})
            for k in DIAGNOSTIC_KEYS:
                v = layer_mean(d, k)
                if v is not None:
                    cell.setdefault(k, []).append(v)
            for g, v in (d.get("update_norms") or {}).items():
                cell.setdefault("update_" + g, []).append(v)
            cell.setdefault("grad_norm", []).append(d.get("grad_norm"))
    return {key: {step: {k: statistics.fmean(v) for k, v in cell.items() if v}
                  for step, cell in steps.items()} for key, steps in out.items()}


def format_summary(summary: dict) -> str:
    lines = ["| recipe | runs | bad | final train loss | gap to Full-Full | valid ppl full | sparse k=8 | sparse k=16 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ppl(g, key):
        m, sd = g.get(key), g.get(key + "_sd")
        if m is None:
            return "-"
        return f"{math.exp(m):.1f} ± {math.exp(m) * sd:.1f}"
    for name, g in summary["groups"].items():
        gap = "-" if g.get("gap") is None else f"{g['gap']:+.3f} ± {g['gap_sd']:.3f}"
        lines.append(f"| {name} | {g['runs']} | {g.get('bad', '-')} | {g['final_train_loss']:.3f} ± "
                     f"{g['final_train_loss_sd']:.3f} | {gap} | {ppl(g, 'valid_full')} | "
                     f"{ppl(g, 'valid_sparse:8')} | {ppl(g, 'valid_sparse:16')} |")
    lines += ["", "| run | seed | steps | final train loss | gap | basin | onset | valid full | sparse k=16 | max grad norm (first 100) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["runs"]:
        def fmt(key, spec=".3f"):
            v = r.get(key)
            return "-" if v is None else format(v, spec)
        vf = r.get("valid_full")
        vs = r.get("valid_sparse:16")
        lines.append(f"| {r['name']} | {r['seed']} | {r['steps']} | {fmt('final_train_loss')} | "
                     f"{fmt('gap', '+.3f')} | {r.get('basin', '-')} | {r.get('onset_step') or '-'} | "
                     f"{'-' if vf is None else f'{math.exp(vf):.1f}'} | "
                     f"{'-' if vs is None else f'{math.exp(vs):.1f}'} | {fmt('max_grad_norm_first_100', '.2f')} |")
    return "\n".join(lines)


def plot_study(runs: Dict[str, Dict[int, dict]], summary: dict, path: str,
               keys=("kept_mass", "entropy_full", "max_logit", "q_norm", "gate_mean", "output_gap"),
               reference: str = "full-full") -> None:
    """One PNG: each run's smoothed train-loss gap to the Full-Full mean (colour by recipe, dashed
    when the run is in the bad basin), then the layer-mean diagnostics over steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    basin = {(r["name"], r["seed"]): r.get("basin") for r in summary["runs"]}
    ref = [r for r in runs.get(reference, {}).values() if r]
    n = min(len(r["lm_loss"]) for r in ref) if ref else 0
    ref_curve = [statistics.fmean(r["lm_loss"][i] for r in ref) for i in range(n)]
    names = list(runs)
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1 + (len(keys) + 2) // 3, 3, figsize=(16, 4 * (1 + (len(keys) + 2) // 3)))
    gap_ax = plt.subplot2grid(axes.shape, (0, 0), colspan=3, fig=fig)
    for name, seeds in runs.items():
        for seed, r in seeds.items():
            if (name, seed) not in basin or not ref_curve:
                continue
            m = min(len(r["lm_loss"]), n)
            curve = moving_average([r["lm_loss"][i] - ref_curve[i] for i in range(m)], 20)
            gap_ax.plot(range(1, m + 1), curve, color=colours[name], lw=1,
                        ls="--" if basin[(name, seed)] == "bad" else "-",
                        label=name if seed == min(seeds) else None)
    gap_ax.axhline(0, color="k", lw=0.5)
    gap_ax.set_xlabel("step")
    gap_ax.set_ylabel(f"train loss - {reference} mean (20-step avg)")
    gap_ax.legend(fontsize=8, ncol=4)
    for ax, key in zip(axes.flat[3:], keys):
        for name, seeds in runs.items():
            for seed, r in seeds.items():
                pts = [(d["iteration"], layer_mean(d, key)) for d in r.get("diagnostics", [])]
                pts = [(s, v) for s, v in pts if v is not None]
                if not pts or (name, seed) not in basin:
                    continue
                ax.plot(*zip(*pts), color=colours[name], lw=0.8,
                        ls="--" if basin[(name, seed)] == "bad" else "-")
        ax.set_title(key + " (layer mean)", fontsize=9)
        ax.set_xscale("symlog", linthresh=60)
    for ax in list(axes.flat[3 + len(keys):]):
        ax.axis("off")
    for ax in axes.flat[:3]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
