"""Training throughput of the SSA recipe on one GPU: full / ssa / sparse attention and
megatron-core's stock local layer as the outside baseline, measured by the trainer itself.

    python tools/bench_training.py --num-layers 16 --seq-length 8192 --iters 8

Each variant runs in its own process (a clean GPU), on a synthetic dataset of random tokens
(throughput does not depend on the text). Reports step time, tokens/s, peak memory and MFU:
model FLOPs per token from ssa_megatron/training/flops.py (dense formula: 6 x matmul parameters
+ causal full attention; the sparse branch counts as free) over the card's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from ssa_megatron.checkout import checkout_root

ROOT = checkout_root()  # its examples/ and tools/, and the PYTHONPATH of the runs it starts
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
VARIANTS = {
    "full": ["--attention-mode", "full"],
    "ssa": ["--attention-mode", "ssa"],  # the trainer's recipe: the sub4 block score
    "ssa-mean": ["--attention-mode", "ssa", "--ssa-selection-score", "mean"],  # the paper's score
    "sparse": ["--attention-mode", "sparse"],
    "megatron-local": ["--attention-mode", "full", "--layer-spec", "megatron-local"],
}


def write_synthetic_dataset(prefix: str, vocab: int, tokens: int) -> None:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from ssa_megatron.data.metadata import write_synthetic_record
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    doc_len = 4096
    documents = tokens // doc_len + 1
    for _ in range(documents):
        doc = rng.integers(0, vocab - 1, doc_len)
        builder.add_document(torch.from_numpy(np.append(doc, vocab - 1)), [doc_len + 1])
    builder.finalize(prefix + ".idx")
    write_synthetic_record(prefix, vocab, vocab - 1, documents, documents * (doc_len + 1))


def variant_flags(args, name: str) -> list:
    """A named variant, or a custom one given as --custom NAME='FLAGS' (flags appended last win)."""
    if name in args.custom_variants:
        return args.custom_variants[name]
    return VARIANTS[name]


PROFILE_CODE = (
    "import torch; prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, "
    "torch.profiler.ProfilerActivity.CUDA], schedule=torch.profiler.schedule(wait=3, warmup=1, "
    "active=2)); prof.start(); r=run(parse_args(sys.argv[1:]), before_step=lambda e, i: prof.step()); "
    "prof.stop(); print(prof.key_averages().table(sort_by='self_device_time_total', row_limit=35, max_name_column_width=60), "
    "file=sys.stderr); ")


def run_variant(args, name: str, data: str, profile: bool = False) -> dict:
    flags = ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
             "--ffn-hidden-size", str(args.ffn_hidden_size), "--num-attention-heads", str(args.heads),
             "--num-query-groups", str(args.kv_heads), "--seq-length", str(args.seq_length),
             "--micro-batch-size", str(args.micro_batch_size), "--global-batch-size",
             str(args.micro_batch_size * args.gas), "--train-iters", str(args.iters), "--bf16",
             "--lr", "1e-4", "--log-interval", str(args.iters), "--data-path", data,
             "--split", "100,0,0", "--deepspeed-config", os.path.join(ROOT, "examples", "ds_zero1.json"),
             "--num-workers", "2", *variant_flags(args, name)]
    code = ("import json,sys; from ssa_megatron.training.arguments import parse_args; "
            "from ssa_megatron.training.pretrain import run; "
            + (PROFILE_CODE if profile else "r=run(parse_args(sys.argv[1:])); ") +
            "r.pop('engine'); print('RESULT ' + json.dumps({k: v for k, v in r.items() "
            "if isinstance(v, (int, float, list, str))}))")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True, text=True, env=env)
    if profile:
        table = proc.stderr[proc.stderr.find("-----"):] if "-----" in proc.stderr else proc.stderr[-3000:]
        print(f"\nprofile of {name} (steps 5-6, sorted by self GPU time):\n{table}", flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stdout + proc.stderr)[-1500:]
    return {"error": "OOM" if "out of memory" in tail.lower() else tail.strip().splitlines()[-1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--ffn-hidden-size", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--gas", type=int, default=1,
                   help="gradient-accumulation steps per optimizer step (global = micro x gas)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--custom", nargs="*", default=[], metavar="NAME=FLAGS",
                   help="extra variants, e.g. full-gas4='--attention-mode full --global-batch-size 4'")
    p.add_argument("--profile", nargs="*", default=[], metavar="VARIANT",
                   help="also run these variants under torch.profiler and print their top kernels")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.custom_variants = {}
    for spec in args.custom:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            p.error(f"--custom {spec!r}: write NAME='FLAGS'")
        args.custom_variants[name] = flags.split()
        if name not in args.variants:
            args.variants.append(name)
    if args.profile and args.iters < 6:
        p.error("--profile records steps 5-6: use --iters 6 or more")
    unknown = [v for v in args.variants + args.profile if v not in VARIANTS and v not in args.custom_variants]
    if unknown:
        p.error(f"unknown variants {unknown}: pick from {sorted(VARIANTS)} or define them with --custom")
    import torch
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in card), None)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "synthetic")
        write_synthetic_dataset(data, args.vocab,
                                args.iters * args.micro_batch_size * args.gas * args.seq_length * 2)
        results = {name: run_variant(args, name, data) for name in args.variants}
        for name in args.profile:
            run_variant(args, name, data, profile=True)
    print(f"\n{card}: {args.num_layers} layers, hidden {args.hidden_size}, heads {args.heads}/{args.kv_heads}, "
          f"seq {args.seq_length}, micro-batch {args.micro_batch_size} x {args.gas} accumulation, "
          "bf16, ZeRO-1; "
          f"median of steps {args.warmup + 1}..{args.iters}")
    print(f"{'variant':<16}{'step ms':>10}{'tokens/s':>12}{'peak GB':>10}{'TFLOP/s':>10}{'MFU':>8}{'vs full':>9}")
    base = None
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<16}  {r['error']}")
            continue
        steps = sorted(r["step_time"][args.warmup:]) or sorted(r["step_time"])
        ms = 1000 * steps[len(steps) // 2]
        tps = r["tokens_per_iteration"] / (ms / 1000)
        tflops = r["flops_per_token"] * tps / 1e12
        r.update(step_ms=ms, tokens_per_s=tps, tflops=tflops, mfu=tflops / peak if peak else None)
        base = tps if name == "full" else base
        ratio = f"{base / tps:.2f}x" if base else "-"  # time per token against full's
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        print(f"{name:<16}{ms:>10.1f}{tps:>12,.0f}{r.get('peak_memory_gb', 0):>10.1f}{tflops:>10.1f}{mfu:>8}{ratio:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "args": vars(args), "results": results}, f, indent=1)
    return 0

