"""tools/convert_checkpoint.py: convert between ssa_megatron checkpoints and Hugging Face.

    # megatron (any TP, ZeRO 0-3) -> HF directory (config, safetensors, model code, tokenizer)
    python tools/convert_checkpoint.py to-hf --input runs/x/checkpoints --output hf/x
    # HF (ours, the SSA paper's layout, Llama 2/3/3.1, Mistral, Qwen2/3, Phi-3) -> megatron, TP=2
    python tools/convert_checkpoint.py from-hf --input hf/x --output ckpt/x-tp2 \
        --tensor-model-parallel-size 2
    # the trainer's model flags to continue pretraining a converted model at a longer context
    python tools/convert_checkpoint.py continue-flags --input ckpt/x-tp2 --seq-length 32768
    # re-layout a checkpoint to another TP size (weights only)
    python tools/convert_checkpoint.py relayout --input ckpt/x --output ckpt/x-tp4 \
        --tensor-model-parallel-size 4

from-hf and relayout write weights-only checkpoints: ``--load`` them to continue pretraining
(fresh optimizer, iteration 0). from-hf prints the model flags the trainer needs for the import
(shape, RoPE, --untie-embeddings-and-output-weights, --add-qkv-bias, --use-rope-scaling ...).
What an SSA model cannot compute (sliding windows, mixture-of-experts, other RoPE types) is
refused in one line naming the config field. Recipe: examples/continued_pretraining.sh.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    from ssa_megatron.console import make_parser
    p = make_parser(description="Convert ssa_megatron checkpoints to/from Hugging Face.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-hf", help="megatron checkpoint -> HF directory")
    a.add_argument("--input", required=True, help="--save directory or one iter_XXXXXXX directory")
    a.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    a.add_argument("--output", required=True)
    a.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype; auto: the precision the checkpoint trained in (--bf16: "
                        "bfloat16, --fp16: float16, otherwise float32)")
    a.add_argument("--max-shard-size", default="5GB")
    a.add_argument("--inference-mode", default=None, choices=["full", "sparse"])
    a.add_argument("--block-counts", type=int, default=None)
    b = sub.add_parser("from-hf", help="HF directory -> megatron checkpoint")
    b.add_argument("--input", required=True)
    b.add_argument("--output", required=True)
    b.add_argument("--tensor-model-parallel-size", type=int, default=1)
    b.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    b.add_argument("--attention-mode", default=None, help="recorded training mode (default: config's / ssa)")
    f = sub.add_parser("continue-flags", help="the trainer's model flags to continue pretraining "
                                              "a converted model at a new context (one line)")
    f.add_argument("--input", default=None, help="the converted checkpoint (from-hf --output)")
    f.add_argument("--resume-from", default=None,
                   help="the run's own --save directory: once it holds a checkpoint, its flags as "
                        "it trained (--input is then not read)")
    f.add_argument("--seq-length", type=int, default=None,
                   help="the new context; default: 4 x the model's, at most 32768")
    f.add_argument("--rope", default="auto", choices=["auto", "scaling", "base", "keep"],
                   help="auto: scaling beyond the model's context, else keep; scaling: the RoPE "
                        "scaled by seq-length / context (llama3 from the context for a plain "
                        "model, the factor multiplied for one that scales already); base: theta "
                        "x --rope-base-factor; keep: as imported")
    f.add_argument("--rope-base-factor", type=float, default=8.0)
    c = sub.add_parser("relayout", help="megatron checkpoint -> another TP layout")
    c.add_argument("--input", required=True)
    c.add_argument("--tag", default=None)
    c.add_argument("--output", required=True)
    c.add_argument("--tensor-model-parallel-size", type=int, required=True)
    c.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from ssa_megatron.convert import api
    from ssa_megatron.convert.layout import ConversionError
    from ssa_megatron.errors import ConfigError
    args = build_parser().parse_args(argv)
    try:
        if args.command == "to-hf":
            source, notes = api.megatron_to_hf(args.input, args.output, args.tag, args.dtype,
                                       args.max_shard_size, args.inference_mode, args.block_counts)
            for n in notes:
                print(f"note: {n}", file=sys.stderr)
        elif args.command == "from-hf":
            flavour = api.hf_to_megatron_checkpoint(args.input, args.output,
                                                    args.tensor_model_parallel_size,
                                                    args.pipeline_model_parallel_size,
                                                    args.attention_mode)
            print(f"imported {flavour} model")
            print("train it with these model flags (and --load " + args.output + "): "
                  + " ".join(api.training_flags(args.output)))
        elif args.command == "continue-flags":
            from ssa_megatron.convert.continued import continued_flags
            try:
                flags, summary = continued_flags(args.input, args.seq_length, args.rope,
                                                 args.rope_base_factor, args.resume_from)
            except ValueError as err:
                raise ConversionError(str(err)) from None
            print(summary, file=sys.stderr)
            print(" ".join(flags))
            return 0
        else:
            source = api.relayout(args.input, args.output, args.tensor_model_parallel_size,
                         args.pipeline_model_parallel_size, args.tag)
    except ConfigError as err:  # ConversionError, a checkpoint's or a tokenizer's error
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}" + (f" (from {source})" if args.command in ("to-hf", "relayout") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
