"""The paper comparison's report (study/paper_comparison.py): train losses matched by step and
branch, the paper's three claims per system, same-seed pairs against Full-Full, each block
selection's loss against full mode, and the markdown tables of OUT/summary.md."""
from __future__ import annotations

import math
import statistics

PUBLISHED_FULL_PROB = 0.5  # SSA as published draws the full branch with this probability


def matched_train_losses(args, per_run, window: int = 100) -> dict:
    """Mean train loss per run ({(system, seed): {iteration: loss}}) over the last ``window``
    steps that every run recorded. Runs of one seed share the samples of every step and the
    branch draw of every micro-batch, so the steps are also split by the branch SSA drew (a
    partial study whose runs stopped early can still be compared at equal steps)."""
    from ssa_megatron.model.runtime import draw_mode
    per_run = {key: v for key, v in per_run.items() if v}
    if not per_run:
        return {}
    common = sorted(set.intersection(*(set(v) for v in per_run.values())))[-window:]
    if not common:
        return {}
    gas = max(1, args.global_batch_size // args.micro_batch_size)  # one GPU per run
    table = {"steps": [common[0], common[-1]], "count": len(common)}
    for (system, seed), losses in per_run.items():
        entry = {"all": statistics.mean(losses[k] for k in common)}
        if gas == 1:  # with accumulation a step mixes both branches
            for mode in ("full", "sparse"):
                # iteration k ran with the draw of the 0-based step k - 1
                picked = [losses[k] for k in common if draw_mode(seed, k - 1, 0, PUBLISHED_FULL_PROB) == mode]
                if picked:
                    entry[mode + "_steps"] = statistics.mean(picked)
        table[f"{system}_seed{seed}"] = entry
    return table


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def _ppl(result, mode, block_counts=None):
    """The run's valid ppl in ``mode``; a model without a full/sparse switch (NSA) evaluates in its
    one "natural" mode, shown as its full column."""
    for r in result.get("perplexity", []):
        if mode == "full" and r["mode"] in ("full", "natural"):
            return r["ppl"]
        if r["mode"] == mode and r["block_counts"] == block_counts:
            return r["ppl"]
    return None


def markdown_matched(args, matched) -> str:
    if not matched:
        return ""
    lo, hi = matched["steps"]
    lines = [f"Train loss at equal steps {lo}-{hi} (mean ± half-range over seeds; the runs of a "
             "seed saw the same samples and, for SSA as published, the branch drawn for each step; "
             "the recipes draw per sequence, so their split is by the published draw, not their own):", "",
             "| system | all steps | steps drawn full | steps drawn sparse |", "| --- | --- | --- | --- |"]
    for system in args.systems:
        rows = [matched.get(f"{system}_seed{seed}") for seed in args.seeds]
        rows = [r for r in rows if r]
        if rows:
            cells = [_mean_spread([r.get(key) for r in rows]) for key in ("all", "full_steps", "sparse_steps")]
            lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _is_natural(result) -> bool:
    """Whether the run was evaluated in its one "natural" mode (NSA: no full/sparse switch)."""
    return any(r["mode"] == "natural" for r in result.get("perplexity", []))


def _sparse_ppl(result, block_counts, trained_counts):
    """A run's ppl when it attends sparsely with this budget: its sparse mode, or, for a model
    that is sparse by construction (NSA), its one mode at the budget it was trained with."""
    if _is_natural(result):
        return _ppl(result, "full") if block_counts == trained_counts else None
    return _ppl(result, "sparse", block_counts)


def claims(args, evals, reference: str = "full-full", tolerance: float = 0.01) -> dict:
    """Per system of --systems (means over the seeds in ``evals``: pass the seeds evaluated for
    every system, :func:`common_seeds`), the paper's three claims and the quality issue's
    goals, each True / False / None (not measurable: a number of this system or of one it is
    compared with is missing; a model that is sparse by construction, NSA, has no dropped mass
    and no sparse ppl away from its trained budget, and is left out of those comparisons):

    * best_sparse: its sparse ppl at --block-counts below every other system's;
    * close_to_full: its full-mode ppl at most ``tolerance`` above ``reference``'s full mode;
    * lowest_dropped_mass: its dropped attention mass at --block-counts below every other's;
    * sparse_k8_k16_best: its sparse ppl at k = 8 and 16 below every other system's at that k;
    * sparse_k16_near_full: its sparse ppl at k = 16 at most ``tolerance`` above ``reference``'s
      full mode."""
    k = args.block_counts
    means = {}
    for system in args.systems:
        results = evals.get(system) or []
        if not results:
            continue
        mass = [r.get("sparsity", {}).get("mean", {}).get(str(k), {}).get("dropped_mass") for r in results]
        means[system] = {"full": _mean([_ppl(r, "full") for r in results]),
                         "mass": _mean(mass), "natural": any(map(_is_natural, results)),
                         **{f"sparse{b}": _mean([_sparse_ppl(r, b, k) for r in results])
                            for b in sorted({k, 8, 16})}}

    def by_design(m, key):  # a number a sparse-by-construction model does not have
        return m["natural"] and (key == "mass" or key != f"sparse{k}")

    def lowest(system, key):
        mine = means[system][key]
        if mine is None:
            return None
        others = []
        for name in args.systems:
            if name == system:
                continue
            m = means.get(name)
            if m is None or (m[key] is None and not by_design(m, key)):
                return None  # a competitor's number is missing: not decidable yet
            if m[key] is not None:
                others.append(m[key])
        return None if not others else all(mine < o for o in others)

    def near(value):
        ref = means.get(reference, {}).get("full")
        return None if value is None or ref is None else value <= ref * (1 + tolerance)

    out = {}
    for system, m in means.items():
        best = [lowest(system, f"sparse{b}") for b in (8, 16)]
        out[system] = {"best_sparse": lowest(system, f"sparse{k}"),
                       "close_to_full": near(m["full"]),
                       "lowest_dropped_mass": lowest(system, "mass"),
                       "sparse_k8_k16_best": None if None in best else all(best),
                       "sparse_k16_near_full": near(m["sparse16"])}
    return out


def common_seeds(args, evals) -> list:
    """The seeds evaluated for every system (:func:`run_evals`): claims compare systems on the
    same seeds."""
    return [seed for seed in args.seeds if all(evals[(system, seed)] for system in args.systems)]


def markdown_claims(args, table, seeds) -> str:
    """The :func:`claims` table as markdown."""
    if not table:
        return ""
    mark = {True: "✓", False: "✗", None: "-"}
    k = args.block_counts
    lines = [f"Claims and goals (means over seeds {', '.join(map(str, seeds))}, the ones evaluated "
             f"for every system; sparse ppl at k = {k} unless named; "
             "NSA's one mode counts as its sparse mode at its trained budget; 'near' = within 1 % of "
             "full-full's full mode):",
             "", "| system | best sparse ppl | full mode near full-full | lowest dropped mass "
             "| sparse k=8 and 16 best | sparse k=16 near full-full |", "| --- | --- | --- | --- | --- | --- |"]
    for system in args.systems:
        if system in table:
            row = table[system]
            lines.append(f"| {system} | " + " | ".join(mark[row[key]] for key in (
                "best_sparse", "close_to_full", "lowest_dropped_mass", "sparse_k8_k16_best",
                "sparse_k16_near_full")) + " |")
    return "\n".join(lines)


def markdown_summary(args, train, evals) -> str:
    """Mean ± half-range over seeds per system."""
    sweep = args.sweep
    head = (["system", "tokens/model", "final train loss", "valid ppl full"]
            + [f"ppl sparse k={k}" for k in sweep]
            + [f"dropped mass k={args.block_counts}", f"full-sparse gap k={args.block_counts}"]
            + [f"ppl sparse k={args.block_counts}, first {n} layer(s) full" for n in args.eval_dense_layers]
            + [f"ppl sparse k={args.block_counts}, {s} selection" for s in args.eval_selections])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for system in args.systems:
        runs = [train.get(f"{system}_seed{seed}") for seed in args.seeds]
        results = evals.get(system, [])
        k = str(args.block_counts)
        sp = [r.get("sparsity", {}).get("mean", {}).get(k, {}) for r in results]
        row = [system, _mean_spread([r["tokens"] / 1e6 for r in runs if r]) + "M",
               _mean_spread([r["final_lm_loss"] for r in runs if r]),
               _mean_spread([_ppl(r, "full") for r in results])]
        row += [_mean_spread([_ppl(r, "sparse", b) for r in results]) for b in sweep]
        row += [_mean_spread([x.get("dropped_mass") for x in sp]),
                _mean_spread([x.get("alignment_gap") for x in sp])]
        if args.eval_dense_layers:
            from ssa_megatron.eval.perplexity import hybrid_mode  # the records' mode names
            row += [_mean_spread([_ppl(r, hybrid_mode(n), args.block_counts) for r in results])
                    for n in args.eval_dense_layers]
        if args.eval_selections:
            from ssa_megatron.eval.perplexity import selection_mode
            row += [_mean_spread([_ppl(r, selection_mode(s), args.block_counts) for r in results])
                    for s in args.eval_selections]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _log_ratios(pairs):
    """[ln(a / b)] of the (a, b) pairs where both are there."""
    return [math.log(a / b) for a, b in pairs if a is not None and b is not None]


def _percent(logs):
    """'mean %' of exp(mean ln ratio) - 1, with the sd over seeds of the ln ratio (as a %)."""
    if not logs:
        return "-"
    mean = f"{100 * (math.exp(statistics.mean(logs)) - 1):+.2f} %"
    return mean if len(logs) == 1 else f"{mean} (sd {100 * statistics.pstdev(logs):.2f})"


def paired_ratios(args, evals, reference: str = "full-full") -> dict:
    """Same-seed pairs against ``reference`` (runs of one seed saw the same samples, so the
    seeds' own spread cancels): for each other system, the seeds both evaluated and per column
    the ln ratios of that system's valid ppl to the reference's: full mode to full mode, sparse
    at each budget of --sweep to the reference's sparse mode at that budget, and sparse at
    --block-counts to the reference's full mode (the quality issue's goal). ``evals``:
    {(system, seed): eval.json or None}. Empty without the reference."""
    if reference not in args.systems:
        return {}
    k = args.block_counts
    out = {}
    for system in args.systems:
        if system == reference:
            continue
        seeds = [s for s in args.seeds if evals.get((system, s)) and evals.get((reference, s))]
        pairs = [(evals[(system, s)], evals[(reference, s)]) for s in seeds]
        row = {"seeds": seeds, "full": _log_ratios((_ppl(a, "full"), _ppl(b, "full")) for a, b in pairs)}
        for b in args.sweep:
            row[f"sparse k={b}"] = _log_ratios((_ppl(x, "sparse", b), _ppl(y, "sparse", b)) for x, y in pairs)
        row[f"sparse k={k} / {reference} full"] = _log_ratios(
            (_ppl(a, "sparse", k), _ppl(b, "full")) for a, b in pairs)
        out[system] = row
    return out


def markdown_paired(args, table, reference: str = "full-full") -> str:
    if not table:
        return ""
    columns = [c for c in next(iter(table.values())) if c != "seeds"]
    lines = [f"Same-seed pairs against {reference} (mean over common seeds of ln(system / {reference}) "
             "as a percentage, its sd over seeds in brackets):", "",
             "| system | seeds | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 2)]
    for system, row in table.items():
        lines.append(f"| {system} | {' '.join(map(str, row['seeds'])) or '-'} | "
                     + " | ".join(_percent(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def selection_gaps(args, evals) -> dict:
    """{system: {selection: {budget: mean over evaluated seeds of ln(sparse ppl / full ppl)}}}
    for the model's own selection ("own") and each --eval-selections one: how much each block
    selection loses against the same model's full mode (the oracle's loss bounds the others')."""
    from ssa_megatron.eval.perplexity import selection_mode
    modes = {"own": "sparse", **{s: selection_mode(s) for s in args.eval_selections}}
    out = {}
    for system in args.systems:
        results = [evals[(system, s)] for s in args.seeds if evals.get((system, s))]
        out[system] = {}
        for name, mode in modes.items():
            gaps = {b: _log_ratios((_ppl(r, mode, b), _ppl(r, "full")) for r in results) for b in args.sweep}
            out[system][name] = {b: statistics.mean(logs) if logs else None for b, logs in gaps.items()}
    return out


def markdown_selection_gaps(args, table) -> str:
    if not args.eval_selections or not table:
        return ""
    lines = ["Sparse mode's valid loss above the same model's full mode (nats, mean over evaluated "
             "seeds), per block selection:", "",
             "| system | selection | " + " | ".join(f"k={b}" for b in args.sweep) + " |",
             "|" + " --- |" * (len(args.sweep) + 2)]
    for system, rows in table.items():
        for name, gaps in rows.items():
            lines.append(f"| {system} | {name} | " + " | ".join(
                "-" if gaps[b] is None else f"{gaps[b]:+.4f}" for b in args.sweep) + " |")
    return "\n".join(lines)
