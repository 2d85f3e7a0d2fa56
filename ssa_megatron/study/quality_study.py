r"""SSA quality study: many seeds of small SSA / Full-Full models side by side on one GPU, with
attention diagnostics from step 0, then a summary of which runs land where Full-Full does.

    python tools/ssa_quality_study.py run --data-path runs/english/english_text_document \
        --out runs/quality --groups full-full:1-4 ssa-step:1-8 ssa-seq:1-8 --jobs-per-gpu 8
    python tools/ssa_quality_study.py summarize --out runs/quality

Recipes are named in ssa_megatron/study/quality.py (VARIANTS); --variant NAME=FLAGS adds one.
A run whose train.json exists is skipped, so the same command continues a study.
"""
from __future__ import annotations

import json
import os
import sys
import time

from ssa_megatron.study import quality
from ssa_megatron.study.runner import command_changes, one_spelling_of_paths, record_command, run_queue


def parse_seeds(text: str):
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    return seeds


def parse_groups(specs, variants):
    """[(name, seeds)] in the order given (a name may appear twice, e.g. seeds 1-4 early and 5-8
    late in an --in-order queue)."""
    groups = []
    for spec in specs:
        name, sep, seeds = spec.partition(":")
        if name not in variants or not sep:
            raise SystemExit(f"error: --groups {spec!r}: write NAME:SEEDS (e.g. ssa-seq:1-8) with NAME "
                             f"one of {', '.join(variants)} or added with --variant")
        groups.append((name, parse_seeds(seeds)))
    return groups


def queue_order(groups, in_order: bool):
    if in_order:
        return [(name, seed) for name, seeds in groups for seed in seeds]
    merged = {}
    for name, seeds in groups:
        merged.setdefault(name, []).extend(seeds)
    return quality.plan_jobs(merged)


def cmd_run(args) -> int:
    variants = quality.parse_variants(args.variant)
    groups = parse_groups(args.groups, variants)
    setting = json.loads(args.setting) if args.setting else None
    jobs = []
    one_spelling_of_paths(args)
    planned = [(name, seed, os.path.join(args.out, f"{name}_seed{seed}"),
                quality.train_command(name, variants[name], seed, os.path.join(args.out, f"{name}_seed{seed}"),
                                      args.data_path, setting, args.eval_iters, args.diagnostics_interval))
               for name, seed in queue_order(groups, args.in_order)]
    changed = [run_dir for _, _, run_dir, cmd in planned
               if command_changes(os.path.join(run_dir, "command.txt"), cmd[1:])]
    if changed:
        print(f"error: {len(changed)} run folder(s) in {args.out} were started with other flags (first: "
              f"{changed[0]}, see its command.txt); give another --out so one summary holds one setting",
              file=sys.stderr)
        return 2
    for name, seed, run_dir, cmd in planned:
        done = quality.read_run(run_dir)
        if done is not None and "stopped_at" not in done:
            continue
        os.makedirs(run_dir, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for stale in ("diagnostics.jsonl", "train.log"):  # a run cut short starts again from step 0;
            path = os.path.join(run_dir, stale)  # its records are kept beside, not deleted
            if os.path.exists(path):
                os.replace(path, f"{path}.previous-{stamp}")
        record_command(os.path.join(run_dir, "command.txt"), cmd[1:])
        jobs.append((run_dir, [("train.log", lambda cmd=cmd: cmd)]))
    print(f"{len(jobs)} runs to train, {args.jobs_per_gpu} at a time per GPU", flush=True)
    t0 = time.time()
    failed, stopped = run_queue(jobs, args.gpus, args.jobs_per_gpu, args.deadline, grace=30)
    print(f"done in {time.time() - t0:.0f} s; failed: {failed or 'none'}; cut short: {stopped or 'none'}",
          flush=True)
    return 1 if failed else 0


def collect(out: str):
    runs = {}
    for entry in sorted(os.listdir(out)):
        name, sep, seed = entry.rpartition("_seed")
        if not sep or not seed.isdigit():
            continue
        result = quality.read_run(os.path.join(out, entry))
        if result is not None:
            runs.setdefault(name, {})[int(seed)] = result
    return runs


def cmd_summarize(args) -> int:
    runs = collect(args.out)
    if not runs:
        print(f"error: no finished runs under {args.out}", file=sys.stderr)
        return 1
    summary = quality.summarize(runs, args.reference, args.bad_gap, at_step=args.at_step)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = quality.format_summary(summary)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    if args.plot:
        quality.plot_study(quality.comparable_runs(runs, args.at_step), summary, args.plot,
                           reference=args.reference)
        print(f"plot: {args.plot}")
    return 0


def build_parser():
    from ssa_megatron.console import make_parser
    p = make_parser(prog="ssa_quality_study.py", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train the runs (skips finished ones)", allow_abbrev=False)
    r.add_argument("--data-path", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--groups", nargs="+", required=True, metavar="NAME:SEEDS")
    r.add_argument("--variant", nargs="*", default=None, metavar="NAME=FLAGS")
    r.add_argument("--in-order", action="store_true",
                   help="start runs in the order --groups lists them (default: seed 1 of every "
                        "group, then seed 2, ...)")
    r.add_argument("--setting", default=None, help="JSON overriding the small setting's sizes")
    r.add_argument("--gpus", type=int, default=1)
    r.add_argument("--jobs-per-gpu", type=int, default=8)
    r.add_argument("--deadline", type=float, default=None, help="seconds; then runs stop")
    r.add_argument("--eval-iters", type=int, default=16)
    r.add_argument("--diagnostics-interval", type=int, default=10)
    s = sub.add_parser("summarize", help="tables of the finished runs", allow_abbrev=False)
    s.add_argument("--out", required=True)
    s.add_argument("--reference", default="full-full")
    s.add_argument("--bad-gap", type=float, default=quality.BAD_GAP)
    s.add_argument("--plot", default=None, help="PNG of loss gaps and diagnostics over steps")
    s.add_argument("--at-step", type=int, default=None,
                   help="compare every run that reached this step, cut there (runs stopped early)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_summarize(args)
