#!/usr/bin/env python3
"""The paper's comparison at small scale: Full-Full, Sparse-Sparse and SSA trained with identical
data, steps, hyper-parameters and seeds, then evaluated with tools/evaluate.py.

    python tools/paper_comparison.py --data-path DATA/english_text_document --out runs/compare \
        --seeds 1 2 --gpus 4

Runs every (system, seed) as its own training process, spread round-robin over the GPUs (several
small models share a GPU), then evaluates each final checkpoint: held-out perplexity in full and
sparse mode over a block_counts sweep, dropped attention mass per layer and the full/sparse gap.
Writes OUT/summary.json and OUT/summary.md (mean and spread over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = {"full-full": "full", "sparse-sparse": "sparse", "ssa": "ssa"}


def model_flags(args) -> list:
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--ffn-hidden-size", str(args.ffn_hidden_size), "--num-attention-heads", str(args.heads),
            "--num-query-groups", str(args.kv_heads), "--seq-length", str(args.seq_length),
            "--ssa-block-size", "16", "--ssa-block-counts", str(args.block_counts)]


def train_command(args, system: str, seed: int, out: str) -> list:
    return [sys.executable, "-m", "ssa_megatron.training.pretrain", *model_flags(args),
            "--attention-mode", SYSTEMS[system], "--seed", str(seed),
            "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size", str(args.global_batch_size),
            "--train-iters", str(args.train_iters), "--lr", str(args.lr), "--min-lr", str(args.lr / 10),
            "--lr-warmup-fraction", "0.02", "--weight-decay", "0.1", "--clip-grad", "1.0",
            *(["--bf16"] if args.bf16 else []),
            "--data-path", args.data_path, "--split", args.split, "--num-workers", "2",
            "--deepspeed-config", os.path.join(ROOT, "examples", "ds_zero1.json"),
            "--log-interval", str(args.log_interval), "--save", os.path.join(out, "checkpoint"),
            "--tensorboard-dir", os.path.join(out, "tensorboard"),
            "--result-json", os.path.join(out, "train.json")]


def eval_command(args, out: str) -> list:
    return [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--checkpoint",
            os.path.join(out, "checkpoint"), "--data-path", args.data_path,
            "--split-name", "valid", "--seq-length", str(args.seq_length),
            *(["--bf16"] if args.bf16 else []), "--micro-batch-size", "4",
            "--block-counts", *[str(b) for b in args.sweep], "--max-windows", str(args.eval_windows),
            "--json", os.path.join(out, "eval.json"), "--plot", os.path.join(out, "eval.png"),
            *args.eval_extra]


def run_all(jobs, gpus: int, log_name: str, deadline: float = None):
    """Run (out_dir, command) jobs concurrently, job i on GPU i % gpus. Past ``deadline``
    seconds the jobs get SIGTERM: the trainer saves at its next step and exits."""
    procs = []
    for i, (out, cmd) in enumerate(jobs):
        env = dict(os.environ, PYTHONPATH=ROOT, MASTER_PORT=str(29700 + i))
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
        log = open(os.path.join(out, log_name), "w")
        procs.append((out, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    start = time.time()
    stopped = False
    while any(proc.poll() is None for _, proc, _ in procs):
        if deadline and not stopped and time.time() - start > deadline:
            for _, proc, _ in procs:
                if proc.poll() is None:
                    proc.terminate()
            stopped = True
            print(f"deadline {deadline:.0f} s reached: asked the runs still going to save and stop",
                  flush=True)
        time.sleep(2)
    failed = []
    for out, proc, log in procs:
        if proc.returncode not in (0, 3):  # 3: stopped by the signal after saving
            failed.append(out)
        log.close()
    return failed


def summarise(args, runs) -> dict:
    table = {}
    for system in args.systems:
        per_seed = []
        for seed in args.seeds:
            path = os.path.join(runs[(system, seed)], "eval.json")
            if os.path.isfile(path):
                with open(path) as f:
                    per_seed.append(json.load(f))
        table[system] = per_seed
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--systems", nargs="*", default=list(SYSTEMS))
    p.add_argument("--seeds", nargs="*", type=int, default=[1, 2])
    p.add_argument("--gpus", type=int, default=None, help="GPUs to spread jobs over (default: all)")
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
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--split", default="98,2,0")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--sweep", nargs="*", type=int, default=[2, 4, 8, 16, 32])
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--eval-extra", nargs="*", default=[])
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--train-deadline", type=float, default=None,
                   help="seconds; then every run still training saves and stops (reported)")
    args = p.parse_args(argv)
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
    t0 = time.time()
    if not args.skip_train:
        jobs = [(out, train_command(args, s, seed, out)) for (s, seed), out in runs.items()]
        with open(os.path.join(args.out, "commands.txt"), "w") as f:
            f.writelines(" ".join(cmd[1:]) + "\n" for _, cmd in jobs)
        failed = run_all(jobs, gpus, "train.log", args.train_deadline)
        print(f"training: {len(jobs) - len(failed)}/{len(jobs)} runs finished in {time.time() - t0:.0f} s"
              + (f"; failed: {failed}" if failed else ""), flush=True)
    t1 = time.time()
    jobs = [(out, eval_command(args, out)) for out in runs.values()
            if os.path.isfile(os.path.join(out, "checkpoint", "latest"))]
    with open(os.path.join(args.out, "commands.txt"), "a") as f:
        f.writelines(" ".join(cmd[1:]) + "\n" for _, cmd in jobs)
    failed = run_all(jobs, gpus, "eval.log")
    print(f"evaluation: {len(jobs) - len(failed)}/{len(jobs)} finished in {time.time() - t1:.0f} s"
          + (f"; failed: {failed}" if failed else ""), flush=True)
    summary = summarise(args, runs)
    train = {}
    for (system, seed), out in runs.items():
        path = os.path.join(out, "train.json")
        if os.path.isfile(path):
            with open(path) as f:
                r = json.load(f)
            train[f"{system}_seed{seed}"] = {"iterations": r["iteration"],
                                            "final_lm_loss": r["lm_loss"][-1],
                                            "tokens": r["tokens_per_iteration"] * r["iteration"],
                                            "median_step_s": statistics.median(r["step_time"])}
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"train": train, "eval": summary, "args": vars(args)}, f, indent=1)
    table = markdown_summary(args, train, summary)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


def _mean_spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {(max(values) - min(values)) / 2:.3f}"


def _ppl(result, mode, block_counts=None):
    for r in result.get("perplexity", []):
        if r["mode"] == mode and (mode == "full" or r["block_counts"] == block_counts):
            return r["ppl"]
    return None


def markdown_summary(args, train, evals) -> str:
    """Mean ± half-range over seeds per system."""
    sweep = args.sweep
    head = (["system", "tokens/model", "final train loss", "valid ppl full"]
            + [f"ppl sparse k={k}" for k in sweep]
            + [f"dropped mass k={args.block_counts}", f"full-sparse gap k={args.block_counts}"])
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
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
