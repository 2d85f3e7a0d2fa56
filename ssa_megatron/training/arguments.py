"""Command-line flags, named as in Megatron-LM, plus DeepSpeed and SSA flags."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from ssa_megatron.console import make_parser, record_for_launcher
from ssa_megatron.model.config import ConfigError, check_parallel_layout, check_ssa_settings
from ssa_megatron.model.options import check_model_options, model_options
from ssa_megatron.model.recipe_defaults import (RECIPE_SELECTION_SCORE, recipe_default,
                                                recipe_selection_score)
from ssa_megatron.model.shape import OPTIONS, SIZE, SSA, ModelShape, add_shape_flags


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(description="Pretrain a GPT model with SSA attention (megatron-core layers, "
                                "DeepSpeed engine).\nFlags are named as in Megatron-LM.")
    # the model's shape: one flag per field of model/shape.py's ModelShape
    m = p.add_argument_group("network size")
    o = p.add_argument_group("model options of imported architectures "
                             "(tools/convert_checkpoint.py from-hf prints the ones a model needs)")
    s = p.add_argument_group("SSA attention")
    add_shape_flags({SIZE: m, OPTIONS: o, SSA: s})
    _leave_selection_score_to_the_recipe(p)
    m.add_argument("--seq-length", type=int, required=True,
                   help="training context in tokens; a multiple of --ssa-block-size")
    s.add_argument("--ssa-align-coef", type=float, default=recipe_default("ssa_align_coef"),
                   help="alpha: weight of the alignment loss (mean over layers)")
    s.add_argument("--ssa-full-prob", type=float, default=recipe_default("ssa_full_prob"),
                   help="probability that a sequence (or micro-batch, with --ssa-branch-draw "
                        "micro-batch) trains the full branch; the paper and the recipe use 0.5 "
                        "(0.25 was better on one seed and worse on the next: docs/RESULTS.md)")
    s.add_argument("--ssa-branch-draw", default=recipe_default("ssa_branch_draw"), choices=["sequence", "micro-batch"],
                   help="SSA training: draw the full/sparse branch once per sequence (both branches "
                        "run anyway; each sequence keeps its own output: the robust recipe, see "
                        "docs/RESULTS.md) or once per micro-batch (the paper's recipe, which leaves "
                        "most small runs in a worse basin)")
    s.add_argument("--ssa-full-prob-schedule", default=None, metavar="ITER:P,...",
                   help="full-branch probability over training, linear between points (an ITER "
                        "with a dot is a fraction of --train-iters), e.g. '0:1.0,0.1:1.0,0.2:0.5'; "
                        "overrides --ssa-full-prob")
    s.add_argument("--ssa-align-coef-schedule", default=None, metavar="ITER:ALPHA,...",
                   help="alignment-loss weight over training, same format; overrides --ssa-align-coef")
    s.add_argument("--ssa-select-align-coef", type=float, default=recipe_default("ssa_select_align_coef"),
                   help="weight of the selection alignment loss (mean over layers; 0: off): "
                        "KL from full attention's mass per block to SSA's block scores on sampled "
                        "query rows, so the selection learns where attention goes "
                        "(ops/selection_loss.py, docs/RESULTS.md)")
    s.add_argument("--ssa-select-align-rows", type=int, default=recipe_default("ssa_select_align_rows"),
                   help="query rows per sequence and layer the selection alignment loss samples")
    s.add_argument("--ssa-gate-init", default=recipe_default("ssa_gate_init"), choices=["normal", "zero"],
                   help="gate projection init: normal (std --init-method-std) or zero (every gate "
                        "starts at 0.5)")
    s.add_argument("--layer-spec", default="ssa", choices=["ssa", "megatron-local"],
                   help="megatron-local: megatron-core's stock local GPT layer (outside baseline; "
                        "no gate, no SSA; PP=1 only)")
    s.add_argument("--lm-loss-weight", type=float, default=recipe_default("lm_loss_weight"),
                   help="weight of the LM cross entropy (0: alignment loss alone, for ablations)")

    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=int, default=1, help="sequences per forward pass and rank")
    t.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per optimizer step (gradient accumulation fills the rest); "
                        "default --micro-batch-size x data-parallel size")
    t.add_argument("--train-iters", type=int, required=True, help="optimizer steps")
    lr = p.add_argument_group("learning rate")
    lr.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    lr.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    lr.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"],
                    help="decay from --lr to --min-lr after the warmup")
    lr.add_argument("--lr-warmup-fraction", type=float, default=0.01,
                    help="linear warmup over this fraction of --train-iters")
    lr.add_argument("--lr-warmup-iters", type=int, default=None,
                    help="linear warmup over N steps (instead of --lr-warmup-fraction)")
    reg = p.add_argument_group("regularization and optimizer")
    reg.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    reg.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    reg.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    reg.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    reg.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clipping (0: off)")
    prec = p.add_argument_group("mixed precision")
    prec.add_argument("--bf16", action="store_true", help="bf16 weights and activations")
    prec.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling")
    t.add_argument("--seed", type=int, default=1234,
                   help="seed of the weights, the data order and the branch draws")
    par = p.add_argument_group("distributed and DeepSpeed")
    par.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="TP: ranks sharing each layer; must divide --num-query-groups")
    par.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                     help="PP: pipeline stages; must divide --num-layers")
    par.add_argument("--deepspeed-config", default=None,
                   help="stock DeepSpeed JSON (ZeRO stage etc.); batch sizes come from the flags")
    par.add_argument("--zero-stage", type=int, default=None, help="ZeRO stage 0-3; overrides the JSON's")
    t.add_argument("--recompute-interval", type=int, default=0,
                   help="pipeline: checkpoint activations every N layers (0: off)")
    t.add_argument("--recompute-activations", action="store_true",
                   help="PP=1: recompute every transformer layer in backward (megatron-core's "
                        "full recompute); with PP > 1 use --recompute-interval")
    t.add_argument("--bias-swiglu-fusion", action=argparse.BooleanOptionalAction, default=None,
                   help="megatron-core's fused SwiGLU (torch.compile); default: on with CUDA")
    t.add_argument("--cross-entropy-loss-fusion", action=argparse.BooleanOptionalAction,
                   default=None, help="megatron-core's fused cross entropy (native impl, "
                                      "torch.compile; bf16 only); default: on with CUDA and --bf16")
    t.add_argument("--use-cpu-initialization", action="store_true", default=None,
                   help="init weights on the CPU from one master copy (default on without CUDA)")

    d = p.add_argument_group("data and dataloader")
    d.add_argument("--data-path", nargs="*", default=None, metavar="[WEIGHT] PREFIX",
                   help="prefix of .bin/.idx, or a blend: 0.7 a 0.3 b")
    d.add_argument("--split", default="969,30,1",
                   help="train,valid,test weights of the documents")
    d.add_argument("--data-cache-path", default=None,
                   help="where megatron-core caches the sample indices; default next to the data")
    d.add_argument("--reset-position-ids", action="store_true",
                   help="restart positions after each EOD (implied by --reset-attention-mask)")
    d.add_argument("--reset-attention-mask", action="store_true",
                   help="keep the documents of a packed sequence apart (attention and selection)")
    d.add_argument("--eod-mask-loss", action="store_true", help="no loss on EOD tokens")
    d.add_argument("--num-workers", type=int, default=1, help="data-loader worker processes")

    c = p.add_argument_group("checkpointing")
    c.add_argument("--save", default=None,
                   help="checkpoint directory; if it holds checkpoints already, the run resumes from "
                        "it (see --start-over)")
    c.add_argument("--load", default=None, help="resume from (or start from the weights of) this "
                                                "checkpoint directory; default: --save when it has one")
    c.add_argument("--allow-tokenizer-change", action="store_true",
                   help="start from an imported model although the data was tokenized with another "
                        "tokenizer than the model's (refused by default)")
    c.add_argument("--load-iteration", "--ckpt-step", dest="load_iteration", type=int, default=None,
                   help="load iter_N of the --load directory instead of the newest intact one")
    c.add_argument("--start-over", action="store_true",
                   help="move the checkpoints already in --save aside (into DIR/set_aside_<time>/, "
                        "never deleted) and start a new run there")
    c.add_argument("--max-skipped-steps", type=int, default=10,
                   help="save and stop after this many optimizer steps in a row were skipped for a "
                        "non-finite loss or gradient norm (0: never stop)")
    c.add_argument("--save-interval", type=int, default=None,
                   help="save every N iterations (and at the end) into --save")
    c.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving, with --save) when iteration %% N == 0")
    c.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints; default: all")
    log = p.add_argument_group("logging and validation")
    log.add_argument("--log-interval", type=int, default=10, help="print and log every N iterations")
    log.add_argument("--eval-interval", type=int, default=None,
                     help="validation loss every N iterations; default: none")
    log.add_argument("--eval-iters", type=int, default=10, help="micro-batches per validation")
    log.add_argument("--tensorboard-dir", default=None, help="TensorBoard event files (rank 0)")
    log.add_argument("--result-json", default=None,
                   help="write per-iteration losses, step times and memory here at the end (rank 0)")
    c.add_argument("--eval-modes", nargs="+", default=None, metavar="MODE",
                   help="evaluate the validation loss in each of these modes (full, sparse, or "
                        "sparse:K for K blocks per query) on the same windows at every "
                        "--eval-interval; default: the model's own mode only")
    c.add_argument("--diagnostics-interval", type=int, default=0,
                   help="every N iterations (and every iteration up to --diagnostics-dense-until), "
                        "record per-layer attention diagnostics (entropies, kept mass, logits, "
                        "q/k norms, gates, update norms) to --diagnostics-json and TensorBoard")
    c.add_argument("--diagnostics-dense-until", type=int, default=50)
    c.add_argument("--diagnostics-json", default=None,
                   help="JSON-lines file of the diagnostics (default: SAVE/diagnostics.jsonl)")
    return p


def _leave_selection_score_to_the_recipe(parser: argparse.ArgumentParser) -> None:
    """--ssa-selection-score defaults to None here, so that validate_args can tell a score left
    out (the recipe's, or a resumed run's own) from one asked for."""
    action = next(a for a in parser._actions if a.dest == "ssa_selection_score")
    action.default = None
    action.help += (f"; default: {RECIPE_SELECTION_SCORE} for a new --attention-mode ssa run (the "
                    "recipe; mean where 4 does not divide --ssa-block-size or with "
                    "--ssa-select-align-coef), mean otherwise; a resumed run keeps its checkpoint's")


def resolve_selection_score(args: argparse.Namespace) -> None:
    """Fill a --ssa-selection-score left out with the recipe's score for this run's flags;
    ``args._selection_score_defaulted`` remembers it (the trainer then lets a resumed
    checkpoint's own score win: training/ssa_recipe.py)."""
    if getattr(args, "ssa_selection_score", None) is not None:
        return
    args.ssa_selection_score = recipe_selection_score(args.attention_mode, args.ssa_block_size,
                                                      args.ssa_select_align_coef, args.ssa_select_proj)
    args._selection_score_defaulted = True


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        validate_args(args)
    except ConfigError as err:
        record_for_launcher(f"error: {err}")
        parser.exit(2, f"error: {err}\n")
    return args


def fill_model_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The model-shape flags whose default depends on other flags (--kv-channels stays unset:
    checkpoints record it so)."""
    shape = ModelShape.from_args(args)
    for name in ("num_query_groups", "ffn_hidden_size", "max_position_embeddings"):
        if getattr(args, name) is None:
            setattr(args, name, shape[name])
    return args


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults and refuse layouts that cannot work (one line each, saying what to change)."""
    import torch

    fill_model_defaults(args)
    if args.use_cpu_initialization is None:
        args.use_cpu_initialization = not torch.cuda.is_available()
    # the fused kernels compile with Triton (torch.compile): on by default on GPUs only
    if args.bias_swiglu_fusion is None:
        args.bias_swiglu_fusion = torch.cuda.is_available()
    if args.cross_entropy_loss_fusion is None:
        args.cross_entropy_loss_fusion = torch.cuda.is_available() and bool(args.bf16)
    if args.cross_entropy_loss_fusion and not args.bf16:
        raise ConfigError("--cross-entropy-loss-fusion rounds the logit gradients to bf16 "
                          "(megatron-core's native kernel): use it with --bf16, or drop it")
    if args.bf16 and args.fp16:
        raise ConfigError("choose one of --bf16 and --fp16")
    check_ssa_settings(args.attention_mode, args.ssa_block_size, args.ssa_block_counts,
                       args.ssa_full_prob, args.inference_mode, args.nsa_window_size)
    check_model_options(model_options(args))
    if args.hidden_size % args.num_attention_heads and args.kv_channels is None:
        raise ConfigError(f"--hidden-size {args.hidden_size} is not divisible by "
                          f"--num-attention-heads {args.num_attention_heads}; set --kv-channels")
    check_parallel_layout(args.num_attention_heads, args.num_query_groups,
                          args.tensor_model_parallel_size, args.seq_length, args.ssa_block_size)
    if args.num_attention_heads % args.tensor_model_parallel_size:
        raise ConfigError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                          f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    if args.num_layers % args.pipeline_model_parallel_size:
        raise ConfigError(f"--num-layers {args.num_layers} is not divisible by "
                          f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}")
    if args.layer_spec != "ssa" and (args.pipeline_model_parallel_size > 1 or args.reset_attention_mask):
        raise ConfigError("--layer-spec megatron-local is a PP=1 baseline without packing; "
                          "drop --pipeline-model-parallel-size / --reset-attention-mask")
    if args.reset_attention_mask:
        # documents are told apart by their restarting positions (RoPE is relative, so the
        # restart itself changes no attention score)
        args.reset_position_ids = True
    elif args.reset_position_ids:
        raise ConfigError("--reset-position-ids alone changes nothing for a RoPE model; add "
                          "--reset-attention-mask to keep packed documents apart")
    if not args.data_path:
        raise ConfigError("no training data: pass --data-path PREFIX (the .bin/.idx prefix that "
                          "tools/preprocess_data.py wrote), or a blend: --data-path 0.7 A 0.3 B")
    if args.deepspeed_config is not None and not os.path.isfile(args.deepspeed_config):
        raise ConfigError(f"--deepspeed-config {args.deepspeed_config} does not exist")
    if args.pipeline_model_parallel_size > 1:
        stage = args.zero_stage
        if stage is None and args.deepspeed_config:
            with open(args.deepspeed_config) as f:
                try:
                    stage = json.load(f).get("zero_optimization", {}).get("stage", 0)
                except json.JSONDecodeError:
                    stage = None
        if stage is not None and stage > 1:
            raise ConfigError(f"ZeRO stage {stage} cannot run with --pipeline-model-parallel-size "
                              f"{args.pipeline_model_parallel_size} (DeepSpeed allows only ZeRO-0/1 with "
                              "pipeline parallelism): use ZeRO-1, or --pipeline-model-parallel-size 1")
    resolve_selection_score(args)
    check_recipe_flags(args)
    if args.save_interval is not None and args.save is None:
        raise ConfigError("--save-interval needs --save DIR")
    if args.load_iteration is not None and args.load is None and args.save is None:
        raise ConfigError("--load-iteration needs --load DIR (or --save DIR that holds checkpoints)")
    if args.micro_batch_size < 1 or args.train_iters < 1:
        raise ConfigError("--micro-batch-size and --train-iters must be positive")
    return args


def check_recipe_flags(args: argparse.Namespace) -> None:
    """Schedules parse, evaluation modes name real modes, diagnostics have a layout they support."""
    from ssa_megatron.model.runtime import PiecewiseLinear
    for flag, lo, hi in (("ssa_full_prob_schedule", 0.0, 1.0), ("ssa_align_coef_schedule", 0.0, None)):
        spec = getattr(args, flag)
        if spec is None:
            continue
        name = "--" + flag.replace("_", "-")
        try:
            values = [v for _, v in PiecewiseLinear(spec, args.train_iters, name).points]
        except ValueError as err:
            raise ConfigError(str(err))
        if any(v < lo or (hi is not None and v > hi) for v in values):
            raise ConfigError(f"{name} {spec!r}: values must lie in [{lo}, {hi if hi is not None else 'inf'}]")
    if args.ssa_select_align_coef < 0 or args.ssa_select_align_rows < 1:
        raise ConfigError("--ssa-select-align-coef must be >= 0 and --ssa-select-align-rows >= 1")
    if args.ssa_select_align_coef and args.attention_mode != "ssa":
        raise ConfigError("--ssa-select-align-coef trains SSA's selection beside its full branch: "
                          "it needs --attention-mode ssa")
    if args.ssa_selection_score != "mean" and args.attention_mode not in ("ssa", "sparse"):
        raise ConfigError(f"--ssa-selection-score {args.ssa_selection_score} scores SSA's block "
                          "selection: it needs --attention-mode ssa or sparse")
    if args.ssa_select_proj and args.ssa_selection_score != "mean":
        raise ConfigError(f"--ssa-select-proj is trained by the selection alignment loss, which "
                          f"trains the mean score only: it cannot go with --ssa-selection-score "
                          f"{args.ssa_selection_score}; drop one of the two")
    if args.ssa_selection_score != "mean" and args.ssa_select_align_coef:
        raise ConfigError("--ssa-select-align-coef (and --ssa-select-proj) train the mean score's "
                          "block probabilities: drop them, or keep --ssa-selection-score mean")
    from ssa_megatron.ops.reference import sub_parts, sub_parts_error
    parts = sub_parts(args.ssa_selection_score)
    if parts and sub_parts_error(parts, args.ssa_block_size):
        raise ConfigError(f"--ssa-selection-score {args.ssa_selection_score} splits each block into "
                          f"{parts} sub-blocks: use an --ssa-block-size that {parts} divides")
    head_dim = args.kv_channels or args.hidden_size // args.num_attention_heads
    if args.ssa_selection_score == "moment2" and head_dim > 64:
        raise ConfigError(f"--ssa-selection-score moment2 runs the selection kernel at twice the "
                          f"head dim, and {head_dim} x 2 is past what it has been checked at "
                          "(128): use heads of at most 64 channels, or the mean score")
    if args.ssa_select_proj and not args.ssa_select_align_coef:
        raise ConfigError("--ssa-select-proj is trained by the selection alignment loss alone: "
                          "add --ssa-select-align-coef (e.g. 1.0)")
    for mode in args.eval_modes or []:
        parse_eval_mode(mode)
    if args.eval_modes and args.pipeline_model_parallel_size > 1:
        raise ConfigError("--eval-modes needs --pipeline-model-parallel-size 1 (the pipeline "
                          "evaluates the model's own mode only); drop --eval-modes")
    if args.diagnostics_interval and args.pipeline_model_parallel_size > 1:
        raise ConfigError("--diagnostics-interval needs --pipeline-model-parallel-size 1 "
                          "(the probe records layers on one rank)")


def parse_eval_mode(mode: str):
    """``full`` / ``sparse`` / ``sparse:K`` -> (mode, block_counts or None)."""
    name, _, k = mode.partition(":")
    if name not in ("full", "sparse") or (k and (not k.isdigit() or int(k) < 1)) or (k and name == "full"):
        raise ConfigError(f"--eval-modes {mode!r}: use full, sparse or sparse:K (K blocks per query)")
    return name, int(k) if k else None


def load_deepspeed_config(args: argparse.Namespace, dp_size: int) -> dict:
    """The user's DeepSpeed JSON with batch sizes, precision, clipping and the optimizer's
    hyper-parameters taken from the flags."""
    cfg = {}
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as err:
                raise ConfigError(f"--deepspeed-config {args.deepspeed_config} is not valid JSON: {err}")
    gbs = args.global_batch_size or args.micro_batch_size * dp_size
    if gbs % (args.micro_batch_size * dp_size):
        raise ConfigError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size "
                          f"{args.micro_batch_size} x data-parallel size {dp_size}")
    args.global_batch_size = gbs
    cfg["train_batch_size"] = gbs
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    cfg["gradient_accumulation_steps"] = gbs // (args.micro_batch_size * dp_size)
    cfg["gradient_clipping"] = args.clip_grad
    cfg.setdefault("steps_per_print", 10 ** 9)
    cfg.setdefault("wall_clock_breakdown", False)
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if args.zero_stage is not None:
        zero["stage"] = args.zero_stage
    # The flags own the optimizer's hyper-parameters as they own batch sizes and precision (a
    # JSON "optimizer" block may pick the type and its other settings, not a second lr).
    optimizer = cfg.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True,
                                                                          "adam_w_mode": True}})
    params = optimizer.setdefault("params", {})
    flags = {"lr": args.lr, "weight_decay": args.weight_decay}
    if any(family in str(optimizer.get("type", "")).lower() for family in ("adam", "lamb")):
        flags.update(betas=[args.adam_beta1, args.adam_beta2], eps=args.adam_eps)
    overridden = [f"{key} {params[key]} -> {value}" for key, value in flags.items()
                  if key in params and params[key] != value]
    if overridden:
        print(f"note: the flags set the optimizer's {', '.join(overridden)} "
              f"(not {args.deepspeed_config})", file=sys.stderr, flush=True)
    params.update(flags)
    cfg["bf16"] = {"enabled": bool(args.bf16)}
    if args.fp16:
        cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": True}
    else:
        cfg.pop("fp16", None)
    if args.pipeline_model_parallel_size > 1 and zero.get("stage", 0) > 1:
        raise ConfigError(f"ZeRO stage {zero['stage']} cannot run with pipeline parallelism "
                          "(DeepSpeed allows only ZeRO-0/1 with PP > 1): set the stage to 0 or 1 "
                          "or use --pipeline-model-parallel-size 1")
    return cfg
