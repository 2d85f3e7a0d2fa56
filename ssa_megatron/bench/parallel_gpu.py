"""Two GPUs (NCCL): DP=2, TP=2 and PP=2 runs of a small SSA model against one GPU.

    python tools/bench_parallel_gpu.py --out results/

Checks that the first steps' losses of each layout match the one-GPU run with the same samples
per step and the same per-micro-batch branch draws (bf16 tolerance), and measures DP=2 scaling:
tokens/s of DP=2 over one GPU with the same per-GPU micro-batch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile

from ssa_megatron.bench.training import write_synthetic_dataset

from ssa_megatron.checkout import checkout_root

ROOT = checkout_root()  # its examples/ and tools/, and the PYTHONPATH of the runs it starts

# name: (GPUs, micro-batch, global batch, extra flags). Pairs compared share samples per step
# and micro-batch indices (the branch draw is per (iteration, micro-batch)).
LAYOUTS = {
    "1gpu_mb4": (1, 4, 4, []),
    "dp2_mb2": (2, 2, 4, []),
    "tp2_mb4": (2, 4, 4, ["--tensor-model-parallel-size", "2"]),
    "1gpu_mb2x2": (1, 2, 4, []),
    "pp2_mb2x2": (2, 2, 4, ["--pipeline-model-parallel-size", "2"]),
    "1gpu_mb2": (1, 2, 2, []),
    "tp2pp2_mb2x2": (4, 2, 4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
}
COMPARE = [("dp2_mb2", "1gpu_mb4"), ("tp2_mb4", "1gpu_mb4"), ("pp2_mb2x2", "1gpu_mb2x2"),
           ("tp2pp2_mb2x2", "1gpu_mb2x2")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="results")
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-gpus", type=int, default=None)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch
    card = torch.cuda.get_device_name()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "synthetic")
        write_synthetic_dataset(data, 32000, args.iters * 4 * args.seq_length * 2)
        for name, (gpus, mbs, gbs, extra) in LAYOUTS.items():
            if gpus > (args.max_gpus or torch.cuda.device_count()):
                continue
            path = os.path.join(args.out, f"{name}.json")
            cmd = ["torchrun", f"--nproc-per-node={gpus}", "--master-port=29611", "-m",
                   "ssa_megatron.training.pretrain", "--num-layers", str(args.layers),
                   "--hidden-size", str(args.hidden), "--ffn-hidden-size", str(4 * args.hidden),
                   "--num-attention-heads", str(args.heads), "--num-query-groups", str(args.kv_heads), "--seq-length",
                   str(args.seq_length), "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs),
                   "--train-iters", str(args.iters), "--bf16", "--lr", "3e-4", "--lr-warmup-iters", "0",
                   "--log-interval", "4", "--data-path", data, "--split", "100,0,0",
                   "--deepspeed-config", os.path.join(ROOT, "examples", "ds_zero1.json"),
                   "--result-json", path, *extra]
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONPATH=ROOT))
            with open(os.path.join(args.out, f"{name}.log"), "w") as f:
                f.write(proc.stdout[-20000:] + proc.stderr[-20000:])
            if proc.returncode != 0 or not os.path.isfile(path):
                results[name] = {"error": (proc.stdout + proc.stderr).strip().splitlines()[-1][:300]}
                continue
            with open(path) as f:
                results[name] = json.load(f)
    print(f"\n{card}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv heads, seq {args.seq_length}, bf16")
    print(f"{'layout':<14}{'losses (first 5 steps)':<48}{'median step ms':>16}{'tokens/s':>12}")
    speed = {}
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<14}{r['error']}")
            continue
        steps = sorted(r["step_time"][2:])
        ms = 1000 * steps[len(steps) // 2]
        speed[name] = r["tokens_per_iteration"] / (ms / 1000)
        losses = " ".join(f"{x:.4f}" for x in r["lm_loss"][:5])
        print(f"{name:<14}{losses:<48}{ms:>16.1f}{speed[name]:>12,.0f}")
    for a, b in COMPARE:
        if a in speed and b in speed:
            diff = max(abs(x - y) for x, y in zip(results[a]["lm_loss"][:5], results[b]["lm_loss"][:5]))
            print(f"{a} vs {b}: max |loss diff| over 5 steps {diff:.4f} ({'within' if diff < 0.02 else 'OUTSIDE'} bf16 tolerance 0.02)")
    if "dp2_mb2" in speed and "1gpu_mb2" in speed:
        print(f"DP=2 scaling at the same per-GPU micro-batch: {speed['dp2_mb2'] / speed['1gpu_mb2']:.2f}x (target >= 1.8x)")
    with open(os.path.join(args.out, "parallel.json"), "w") as f:
        json.dump({"card": card, "results": results}, f)
    return 0

