"""The paper's comparison at small scale: Full-Full, Sparse-Sparse and SSA trained with identical
data, steps, hyper-parameters and seeds, then evaluated with tools/evaluate.py.

    python tools/paper_comparison.py --data-path DATA/english_text_document --out runs/compare \
        --seeds 1 2 --train-iters 1500

Runs every (system, seed) as its own training process followed by its evaluation, one run per
GPU at a time (longest first, the next run starts on whichever GPU frees up): held-out
perplexity in full and sparse mode over a block_counts sweep, dropped attention mass per layer
and the full/sparse gap. With --deadline the runs still going save and stop at that time; the
same command run again resumes them from their checkpoints and skips what is done, so a study
can span several sessions.
Writes OUT/summary.json and OUT/summary.md (mean and spread over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

from ssa_megatron.study.runner import command_changes, one_spelling_of_paths, record_command
from ssa_megatron.study.runner import run_queue, visible_devices  # noqa: F401 (tests use both)

from ssa_megatron.checkout import checkout_root
from ssa_megatron.study.paper_report import (claims, common_seeds, markdown_claims,  # noqa: F401
                                             markdown_matched, markdown_paired,
                                             markdown_selection_gaps, markdown_summary,
                                             matched_train_losses, paired_ratios, selection_gaps)
from ssa_megatron.study.recipes import (BLOCK_SIZE, MEAN_RECIPE, PAPER_SCORE, PAPER_SSA, PRESETS,
                                        RECIPE_DRAW, SEQUENCE_DRAW, shape_flags)
from ssa_megatron.training import result_record

ROOT = checkout_root()  # its examples/ and tools/, and the PYTHONPATH of the runs it starts
SYSTEMS = {"full-full": "full", "sparse-sparse": "sparse", "nsa": "nsa", "ssa": "ssa",
           "ssa-recipe": "ssa", "ssa-recipe-fp25": "ssa", "ssa-recipe-late-sparse": "ssa",
           "ssa-recipe-sparse-end": "ssa", "ssa-recipe-select": "ssa", "ssa-recipe-select-proj": "ssa",
           "ssa-recipe-moment2": "ssa", "ssa-recipe-sub4": "ssa"}
# "ssa" is SSA as published (one branch per micro-batch, full branch with probability 0.5);
# "ssa-recipe" draws it per sequence (probability 0.5, the mean score: the recipe of sessions
# 11-20), "ssa-recipe-sub4" adds the sub4 block score (the trainer's defaults since session 21), "ssa-recipe-fp25"
# per sequence with probability 0.25; "ssa-recipe-late-sparse" / "ssa-recipe-sparse-end" keep the
# recipe to mid-run, then lower the probability linearly to 0.1 / 0 at the end;
# "ssa-recipe-select" is the recipe plus the selection alignment loss (weight 1) on q and k,
# "ssa-recipe-select-proj" the same loss (weight 0.1) on a learned selection map alone,
# "ssa-recipe-moment2" the recipe selecting with the moment2 score; "nsa"
# (compression + selection + window, three gates) has one mode: its "full" column
# what runs when --systems is not given: the paper's systems, the shipped recipe and the
# mean-score recipe it replaced (the other candidates run when named)
DEFAULT_SYSTEMS = ("full-full", "sparse-sparse", "nsa", "ssa", "ssa-recipe", "ssa-recipe-sub4")
SYSTEM_FLAGS = {"ssa": PAPER_SSA,
                "ssa-recipe": MEAN_RECIPE,
                "ssa-recipe-fp25": [*SEQUENCE_DRAW, "--ssa-full-prob", "0.25", *PAPER_SCORE],
                "ssa-recipe-late-sparse": [*MEAN_RECIPE, "--ssa-full-prob-schedule", "0:0.5,0.5:0.5,1.0:0.1"],
                "ssa-recipe-sparse-end": [*MEAN_RECIPE, "--ssa-full-prob-schedule", "0:0.5,0.5:0.5,1.0:0.0"],
                "ssa-recipe-select": [*MEAN_RECIPE, "--ssa-select-align-coef", "1.0"],
                "ssa-recipe-moment2": [*RECIPE_DRAW, "--ssa-selection-score", "moment2"],
                "ssa-recipe-sub4": [*RECIPE_DRAW, "--ssa-selection-score", "sub4"],
                # AdamW moves the map the same for any weight; a small one keeps its gradient
                # from eating into the model's under the global gradient-norm clip
                "ssa-recipe-select-proj": [*MEAN_RECIPE, "--ssa-select-proj", "--ssa-select-align-coef", "0.1"]}
# relative step cost, to start the longest runs first (SSA runs both branches every step)
COST = {"ssa": 1.7, "nsa": 1.5, "full": 1.0, "sparse": 0.9}  # by attention mode
FINAL_LOSS_STEPS = 10  # the final train loss is the mean over this many last steps


def model_flags(args) -> list:
    return shape_flags(vars(args))


def parse_variants(specs) -> dict:
    """``NAME=FLAGS`` ablation systems: {name: trainer flags}; FLAGS must name --attention-mode."""
    variants = {}
    for spec in specs or []:
        name, sep, flags = spec.partition("=")
        flags = shlex.split(flags)
        if not sep or not name or name in SYSTEMS or "--attention-mode" not in flags:
            raise SystemExit(f"error: --variant {spec!r}: write NAME=FLAGS with a new NAME and FLAGS "
                             "that include --attention-mode, e.g. "
                             "'ssa-alpha0=--attention-mode ssa --ssa-align-coef 0'")
        variants[name] = flags
    return variants


def attention_mode(args, system: str) -> str:
    if system in SYSTEMS:
        return SYSTEMS[system]
    flags = args.variants[system]
    return flags[flags.index("--attention-mode") + 1]


def train_command(args, system: str, seed: int, out: str) -> list:
    mode_flags = ["--attention-mode", SYSTEMS[system], *SYSTEM_FLAGS.get(system, [])] if system in SYSTEMS else []
    return [sys.executable, "-m", "ssa_megatron.training.pretrain", *model_flags(args),
            *mode_flags, "--seed", str(seed),
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--train-iters", str(args.train_iters), "--lr", str(args.lr),
            "--min-lr", str(args.lr / 10 if args.min_lr is None else args.min_lr),
            *(["--lr-warmup-iters", str(args.lr_warmup_iters)] if args.lr_warmup_iters is not None
              else ["--lr-warmup-fraction", str(args.lr_warmup_fraction)]),
            "--weight-decay", "0.1", "--clip-grad", "1.0",
            *(["--bf16"] if args.bf16 else []),
            "--data-path", args.data_path, "--split", args.split, "--num-workers", "2",
            "--deepspeed-config", os.path.join(ROOT, "examples", "ds_zero1.json"),
            "--log-interval", str(args.log_interval), "--save", os.path.join(out, "checkpoint"),
            "--tensorboard-dir", os.path.join(out, "tensorboard"),
            "--result-json", os.path.join(out, "train.json"),
            *(["--exit-interval", str(args.stop_at)] if args.stop_at else []),
            *args.variants.get(system, [])]


def eval_command(args, out: str) -> list:
    return [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--checkpoint",
            os.path.join(out, "checkpoint"), "--data-path", args.data_path,
            "--split-name", "valid", "--seq-length", str(args.seq_length),
            *(["--bf16"] if args.bf16 else []), "--micro-batch-size", "4",
            "--block-counts", *[str(b) for b in args.sweep], "--max-windows", str(args.eval_windows),
            "--json", os.path.join(out, "eval.json"), "--plot", os.path.join(out, "eval.png"),
            *(["--dense-layers", *map(str, args.eval_dense_layers)] if args.eval_dense_layers else []),
            *(["--selections", *args.eval_selections] if args.eval_selections else []),
            *args.eval_extra]


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def last_step(args) -> int:
    """Where the runs end: --train-iters, or --stop-at (a truncated study, same lr schedule)."""
    return min(args.train_iters, args.stop_at) if args.stop_at else args.train_iters


TRAIN_COMMAND = "train_command.txt"  # the flags a run was started with (checked when it continues)
# flags that may change between the parts of one run: where it stops (--stop-at), how often it
# logs, where the checkout is
OPERATIONAL_FLAGS = ("--exit-interval", "--log-interval", "--deepspeed-config", "--num-workers")


def changed_runs(args, runs: dict) -> list:
    """``out: first differing flags`` for each run folder that was started with other training
    flags than this invocation gives it: continuing or skipping it would mix two settings."""
    changed = []
    for (system, seed), out in runs.items():
        diff = command_changes(os.path.join(out, TRAIN_COMMAND), train_command(args, system, seed, out)[1:],
                               ignoring=OPERATIONAL_FLAGS)
        if diff:
            changed.append(f"{out}: {', '.join(diff)}")
    return changed


def train_step(args, system: str, seed: int, out: str):
    """The training command of one run; resumes from its own checkpoint, skips a finished run."""
    def make():
        done = _read_json(os.path.join(out, "train.json"))
        if done and done.get("iteration", 0) >= last_step(args):
            return None
        cmd = train_command(args, system, seed, out)
        record_command(os.path.join(out, TRAIN_COMMAND), cmd[1:])
        if os.path.isfile(os.path.join(out, "checkpoint", "latest")):
            if done:  # keep the earlier part's per-step record next to the resumed one
                result_record.set_aside(os.path.join(out, "train.json"))
            cmd += ["--load", os.path.join(out, "checkpoint")]
        return cmd
    return make


def eval_step(args, out: str):
    """The evaluation of a run's final checkpoint, unless eval.json is newer than it."""
    def make():
        latest = os.path.join(out, "checkpoint", "latest")
        result = os.path.join(out, "eval.json")
        if not os.path.isfile(latest) or args.skip_eval:
            return None
        if os.path.isfile(result) and os.path.getmtime(result) > os.path.getmtime(latest):
            return None
        return eval_command(args, out)
    return make


def step_losses(out: str, key: str = "lm_loss"):
    """The per-step series ``key`` of the run in folder ``out`` (its train.json and earlier
    parts): :func:`result_record.read_series`."""
    return result_record.read_series(os.path.join(out, "train.json"), key)


def train_record(losses, records):
    """Summary of a run's joined record (:func:`step_losses`): steps, final loss, tokens, time."""
    if not losses:
        return None
    last = records[-1]
    tail = [losses[k] for k in sorted(losses)[-FINAL_LOSS_STEPS:]]
    times = [x for r in records for x in r.get("step_time", [])]
    missing = sorted(set(range(1, max(losses) + 1)) - set(losses))
    return {"iterations": last["iteration"], "parts": len(records),
            "final_lm_loss": sum(tail) / len(tail),
            "tokens": last["tokens_per_iteration"] * last["iteration"],
            "median_step_s": statistics.median(times) if times else None,
            **({"steps_without_record": len(missing)} if missing else {})}


def run_evals(runs) -> dict:
    """{(system, seed): the run's eval.json, or None before its evaluation}, each read once."""
    return {key: _read_json(os.path.join(out, "eval.json")) for key, out in runs.items()}


def summarise(args, evals) -> dict:
    """{system: [eval.json of each evaluated seed]} from :func:`run_evals`."""
    return {system: [evals[(system, seed)] for seed in args.seeds if evals[(system, seed)]]
            for system in args.systems}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-path", required=True)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--systems", nargs="*", default=None,
                   help=f"default: {' '.join(DEFAULT_SYSTEMS)} and every --variant; also: "
                        f"{' '.join(s for s in SYSTEMS if s not in DEFAULT_SYSTEMS)}")
    p.add_argument("--variant", nargs="*", default=[], metavar="NAME=FLAGS",
                   help="an ablation system: the same recipe plus these trainer flags (last wins), "
                        "e.g. 'ssa-alpha0=--attention-mode ssa --ssa-align-coef 0'")
    p.add_argument("--seeds", nargs="*", type=int, default=[1, 2])
    p.add_argument("--gpus", type=int, default=None, help="GPUs to spread jobs over (default: all)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named setting (study/recipes.py): its model, batch, steps and lr schedule "
                        "become the defaults; flags given as well still win. small: the quality "
                        "issue's small setting")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--ffn-hidden-size", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--block-counts", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--train-iters", type=int, default=600)
    p.add_argument("--stop-at", type=int, default=None,
                   help="end every run at this step (a short diagnostic study); the lr schedule "
                        "still spans --train-iters, so the steps compare with full-length runs")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak lr (cosine to lr/10); the documented studies ran at 1e-3")
    p.add_argument("--min-lr", type=float, default=None, help="where the cosine ends (default: lr/10)")
    p.add_argument("--lr-warmup-fraction", type=float, default=0.02,
                   help="linear warm-up over this fraction of --train-iters, for every system; the "
                        "documented studies ran at 0.02 unless they say otherwise")
    p.add_argument("--lr-warmup-iters", type=int, default=None,
                   help="linear warm-up over this many steps instead of --lr-warmup-fraction")
    p.add_argument("--split", default="98,2,0")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--sweep", nargs="*", type=int, default=[2, 4, 8, 16, 32])
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--eval-extra", nargs="*", default=[])
    p.add_argument("--eval-dense-layers", type=int, nargs="*", default=[], metavar="N",
                   help="also evaluate sparse mode with the first N layers in full attention "
                        "(evaluate.py --dense-layers); summary.md adds their k = --block-counts column")
    p.add_argument("--eval-selections", nargs="*", default=[], metavar="NAME",
                   help="also evaluate sparse mode under these block selections (evaluate.py "
                        "--selections: oracle, recentN, mean, moment2, quest, subN); summary.md adds their k = --block-counts column")
    p.add_argument("--paired-against", nargs="+", default=None, metavar="SYSTEM",
                   help="summary.md's same-seed pair tables: one per system named here (each "
                        "other system's valid ppl against this one's, seed by seed; default: "
                        "full-full when it is among --systems)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--in-order", action="store_true",
                   help="start the runs seed by seed, each seed's in the order of --systems, "
                        "rather than the longest first")
    p.add_argument("--jobs-per-gpu", type=int, default=1,
                   help="runs sharing one GPU at a time (1: one after the other, the fastest)")
    p.add_argument("--deadline", "--train-deadline", type=float, default=None,
                   help="seconds; then running jobs save and stop and no new one starts; run the "
                        "same command again to resume them from their checkpoints")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        setting = dict(PRESETS[preset])
        setting["lr_warmup_iters"] = setting.pop("warmup_iters")
        parser.set_defaults(**setting)
    args = parser.parse_args(argv)
    given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)}
    if preset and "--lr-warmup-fraction" in given and "--lr-warmup-iters" not in given:
        args.lr_warmup_iters = None  # the flag given wins over the preset's warm-up
    args.variants = parse_variants(args.variant)
    if args.systems is None:
        args.systems = list(DEFAULT_SYSTEMS) + list(args.variants)
    if any(n < 1 for n in args.eval_dense_layers):
        raise SystemExit("error: --eval-dense-layers takes layer counts >= 1")
    from ssa_megatron.ops.selection_variants import selection_names_error
    unknown = selection_names_error(args.eval_selections, BLOCK_SIZE)
    if unknown:
        raise SystemExit(f"error: --eval-selections: {unknown}")
    unknown = [s for s in args.systems if s not in SYSTEMS and s not in args.variants]
    if unknown:
        raise SystemExit(f"error: unknown system(s) {unknown}: choose from {list(SYSTEMS)} or "
                         "define them with --variant NAME=FLAGS")
    if args.paired_against is None:
        args.paired_against = ["full-full"] if "full-full" in args.systems else []
    unpaired = [s for s in args.paired_against if s not in args.systems]
    if unpaired:
        raise SystemExit(f"error: --paired-against {unpaired}: name systems of --systems "
                         f"({' '.join(args.systems)})")
    one_spelling_of_paths(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    gpus = args.gpus
    if gpus is None:
        import torch
        gpus = torch.cuda.device_count()
    runs = {}
    for system in args.systems:
        for seed in args.seeds:
            out = os.path.join(args.out, f"{system}_seed{seed}")
            os.makedirs(out, exist_ok=True)
            runs[(system, seed)] = out
    changed = [] if args.skip_train else changed_runs(args, runs)
    if changed:
        print(f"error: {len(changed)} run folder(s) in {args.out} were started with other training flags "
              f"(first: {changed[0]}); give another --out, or delete their {TRAIN_COMMAND} to continue "
              "them under the new flags", file=sys.stderr)
        return 2
    t0 = time.time()
    order = run_order(args, runs)
    jobs = []
    for (system, seed), out in order:
        steps = [] if args.skip_train else [("train.log", train_step(args, system, seed, out))]
        jobs.append((out, steps + [("eval.log", eval_step(args, out))]))
    if not (args.skip_train and args.skip_eval):  # a summary of runs made elsewhere runs nothing
        with open(os.path.join(args.out, "commands.txt"), "a") as f:
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M')}: {' '.join(sys.argv)}\n")
            for (system, seed), out in order:  # what each run does unless already done
                if not args.skip_train:
                    f.write(" ".join(train_command(args, system, seed, out)[1:]) + "\n")
                if not args.skip_eval:
                    f.write(" ".join(eval_command(args, out)[1:]) + "\n")
    failed, stopped = run_queue(jobs, gpus, args.jobs_per_gpu, args.deadline)
    print(f"{len(jobs) - len(failed) - len(stopped)}/{len(jobs)} runs done in "
          f"{time.time() - t0:.0f} s" + (f"; failed (see their logs): {failed}" if failed else "")
          + (f"; stopped before the end (run the same command again to resume): {stopped}"
             if stopped else ""), flush=True)
    evals = run_evals(runs)
    summary = summarise(args, evals)
    records = {key: step_losses(out) for key, out in runs.items()}
    train = {f"{system}_seed{seed}": train_record(*records[(system, seed)]) for system, seed in runs}
    train = {k: v for k, v in train.items() if v}
    matched = matched_train_losses(args, {key: losses for key, (losses, _) in records.items()})
    seeds = common_seeds(args, evals)
    ticks = claims(args, {system: [evals[(system, seed)] for seed in seeds] for system in args.systems})
    paired = {ref: paired_ratios(args, evals, ref) for ref in args.paired_against}
    against_full = paired["full-full"] if "full-full" in paired else paired_ratios(args, evals)
    gaps = selection_gaps(args, evals)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"train": train, "eval": summary, "claims": ticks, "claims_seeds": seeds,
                   "matched_train_loss": matched, "paired_log_ratios": against_full,
                   "paired_log_ratios_against": paired,
                   "selection_gaps": gaps, "args": vars(args)}, f, indent=1)
    table = "\n\n".join(part for part in (markdown_summary(args, train, summary),
                                          markdown_claims(args, ticks, seeds),
                                          *(markdown_paired(args, table, ref)
                                            for ref, table in paired.items()),
                                          markdown_selection_gaps(args, gaps),
                                          markdown_matched(args, matched)) if part)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 1 if failed else 0


def run_order(args, runs: dict) -> list:
    """``runs`` ({(system, seed): out}) in the order they start: the longest first (best use of
    several GPUs), or with --in-order seed by seed, each seed's systems in the order of
    --systems, so that a study spread over sessions completes one seed of every system first."""
    items = list(runs.items())
    if args.in_order:
        return sorted(items, key=lambda item: args.seeds.index(item[0][1]))  # stable: systems kept
    return sorted(items, key=lambda item: -COST.get(attention_mode(args, item[0][0]), 1.0))
