"""Pretraining entry: megatron-core SSA GPT model in a DeepSpeed engine (ZeRO 0-3, TP x DP).

    python -m ssa_megatron.training.pretrain --num-layers 2 --hidden-size 128 ... \
        --data-path PREFIX --deepspeed-config examples/ds_zero1.json --save runs/x

Data flows: .bin/.idx → megatron-core GPTDataset → ResumableSampler → micro-batches; each
micro-batch draws its SSA branch from (seed, iteration, micro-batch); DeepSpeed accumulates and
steps; the alignment loss reaches the weights through the autoscaler (model/align_loss.py).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from ssa_megatron import engine_patches
from ssa_megatron.console import record_for_launcher
from ssa_megatron.errors import ConfigError
from ssa_megatron.model.runtime import document_packed_seq_params, forward_params, masked_lm_loss
from ssa_megatron.training.arguments import parse_eval_mode
from ssa_megatron.training.diagnostics import Diagnostics


class TrainResult(dict):
    """What run() returns: per-iteration losses etc. (tests read it)."""


@dataclass
class TrainState:
    """Where a run stands: the counters a checkpoint records and the open logging window."""

    iteration: int = 0
    consumed: int = 0  # training samples consumed; the loader resumes after them
    window_loss: float = 0.0  # summed step losses since the last log line
    window_iters: int = 0
    window_time: float = 0.0

    def advance(self, global_batch_size: int, step_loss: float, step_time: float) -> None:
        self.iteration += 1
        self.consumed += global_batch_size
        self.window_loss += step_loss
        self.window_iters += 1
        self.window_time += step_time

    def close_window(self) -> None:
        self.window_loss, self.window_iters, self.window_time = 0.0, 0, 0.0


def _log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _to_device(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    dev = _device()
    return {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def align_backward_scale(engine, gas: int) -> float:
    """What DeepSpeed multiplies the main loss by before backward (1/GAS, fp16 loss scale)."""
    scale = 1.0 / gas if engine.scale_wrt_gas else 1.0
    if engine.fp16_enabled():
        opt = engine.optimizer
        scale *= float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 1.0)))
    return scale


def lm_loss(engine, batch, config, branch=None, probe=None) -> torch.Tensor:
    """The micro-batch's weighted LM loss; ``config`` (the model's SSAConfig) gives the weight and
    whether packed documents stay apart. The boundaries, the SSA ``branch`` this micro-batch
    trains and an attention ``probe`` travel as the forward's ``packed_seq_params``."""
    tokens, labels = batch["tokens"], batch["labels"]
    packed = document_packed_seq_params(batch["position_ids"]) if config.reset_attention_mask else None
    packed = forward_params(packed, tokens.shape[-1], ssa_branch=branch, ssa_probe=probe)
    per_token = engine(tokens, batch["position_ids"], None, labels=labels, packed_seq_params=packed)
    return masked_lm_loss(per_token, batch["loss_mask"], config.lm_loss_weight)


def _dp_mean(values: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps
    if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
        values = values.to(_device())
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        values = values / ps.get_data_parallel_world_size()
    return values.cpu()


def evaluate(engine, loader_iter, eval_iters: int, config) -> Optional[float]:
    if loader_iter is None:
        return None
    engine.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for _ in range(eval_iters):
            try:
                batch = next(loader_iter)
            except StopIteration:
                break
            total += float(lm_loss(engine, _to_device(batch), config))
            n += 1
    engine.train()
    if n == 0:
        return None
    return float(_dp_mean(torch.tensor([total / n], dtype=torch.float64))[0])


def evaluate_modes(engine, loader_iter, eval_iters: int, config, modes) -> Dict[str, float]:
    """Validation loss in each (mode, block_counts) of ``modes`` on the same micro-batches."""
    from ssa_megatron.model.attention import SSACoreAttention, set_inference_mode
    if loader_iter is None:  # no validation split
        return {}
    batches = []
    for _ in range(eval_iters):
        try:
            batches.append(next(loader_iter))
        except StopIteration:
            break
    if not batches:
        return {}
    layers = [m for m in engine.module.modules() if isinstance(m, SSACoreAttention)]
    saved = [(m.inference_mode, m.block_counts) for m in layers]
    losses = {}
    try:
        for mode, block_counts in modes:
            set_inference_mode(engine.module, mode, block_counts)
            label = mode if block_counts is None else f"{mode}:{block_counts}"
            losses[label] = evaluate(engine, iter(batches), len(batches), config)
            for m, (inference_mode, counts) in zip(layers, saved):
                m.inference_mode, m.block_counts = inference_mode, counts
    finally:
        for m, (inference_mode, counts) in zip(layers, saved):
            m.inference_mode, m.block_counts = inference_mode, counts
    return losses


def pipeline_topology(args, dp_size: int):
    """DeepSpeed's pipe topology; it must place every rank where megatron's parallel_state does."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from megatron.core import parallel_state as ps
    topo = PipeModelDataParallelTopology(num_pp=args.pipeline_model_parallel_size,
                                         num_mp=args.tensor_model_parallel_size, num_dp=dp_size)
    coord = topo.get_coord(dist.get_rank())
    ours = (ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
            ps.get_tensor_model_parallel_rank())
    if (coord.pipe, coord.data, coord.model) != ours:
        raise RuntimeError(f"rank {dist.get_rank()}: DeepSpeed places it at pipe/data/model "
                           f"{(coord.pipe, coord.data, coord.model)} but megatron at {ours}")
    return topo


def pipe_batches(loader_iter, args, iteration: int, recipe=None, consumed: int = 0):
    """Micro-batches as the pipe engine wants them: ((tokens, positions, branch), (labels, mask)).
    The branch is drawn exactly as without a pipeline (per micro-batch or per sequence)."""
    from megatron.core import parallel_state as ps

    from ssa_megatron.model.pipeline import branch_code
    from ssa_megatron.training.ssa_recipe import BranchRecipe, first_sample_of_micro
    recipe = recipe or BranchRecipe(args)
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    micro = 0
    while True:
        batch = next(loader_iter)
        code = branch_code(recipe.branch(iteration, micro, first_sample_of_micro(
            consumed, micro, args.micro_batch_size, dp_size, dp_rank), collapse=False))
        micro += 1
        yield ((batch["tokens"], batch["position_ids"], code), (batch["labels"], batch["loss_mask"]))


def evaluate_pipe(engine, loader_iter, args, gas: int) -> Optional[float]:
    if loader_iter is None:
        return None
    losses = []
    for _ in range(max(1, args.eval_iters // gas)):
        try:
            losses.append(float(engine.eval_batch(pipe_batches(loader_iter, args, 0))))
        except StopIteration:
            break
    engine.train()
    if not losses:
        return None
    return float(_dp_mean(torch.tensor([sum(losses) / len(losses)], dtype=torch.float64))[0])


def train_step(engine, train_iter, args, config, recipe, state: TrainState, gas: int,
               probe=None) -> float:
    """One optimizer step at ``state`` (which the caller advances): this iteration's alignment
    loss scale and weight, then ``gas`` micro-batches, each forward and backward on its own SSA
    branch, and DeepSpeed's step (the pipe engine's ``train_batch`` with PP > 1). ``probe``
    records the first micro-batch's attention. Returns this rank's mean LM loss of the step."""
    from megatron.core import parallel_state as ps

    from ssa_megatron.model.align_loss import AlignLossAutoScaler
    from ssa_megatron.training.ssa_recipe import first_sample_of_micro, set_align_coef

    AlignLossAutoScaler.set_loss_scale(align_backward_scale(engine, gas))
    coef = recipe.align_coef_at(state.iteration)
    if coef is not None:
        set_align_coef(engine.module, coef)
    if args.pipeline_model_parallel_size > 1:
        return float(engine.train_batch(pipe_batches(train_iter, args, state.iteration, recipe,
                                                     state.consumed)))
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    # only SSA layers take per-forward SSA data (megatron's own attention refuses the argument)
    ssa_layers = getattr(args, "layer_spec", "ssa") == "ssa"
    step_loss = 0.0
    for micro in range(gas):
        batch = _to_device(next(train_iter))
        branch = None
        if args.attention_mode == "ssa":
            branch = recipe.branch(state.iteration, micro, first_sample_of_micro(
                state.consumed, micro, args.micro_batch_size, dp_size, dp_rank))
        loss = lm_loss(engine, batch, config, branch,
                       probe.probe if probe is not None and micro == 0 and ssa_layers else None)
        engine.backward(loss)
        engine.step()
        step_loss += float(loss.detach()) / gas
    return step_loss


def build_engine(args, info, dp_size: int):
    """Model (GPTModel, or the pipeline model when PP > 1) wrapped in a DeepSpeed engine with
    AdamW (unless the JSON names another type; --lr etc. always set its hyper-parameters) and
    the Megatron-style LR schedule. Returns the engine, the DeepSpeed config, the parameter count
    of this rank and the model's SSAConfig."""
    import deepspeed

    from ssa_megatron.model.align_loss import AlignLossLoggingHelper
    from ssa_megatron.model.builder import build_config, build_gpt_model, padded_vocab_size
    from ssa_megatron.training.arguments import load_deepspeed_config
    from ssa_megatron.training.mpu import MegatronMPU
    from ssa_megatron.training.optim import lr_lambda, param_groups

    ds_config = load_deepspeed_config(args, dp_size)
    config = build_config(args)
    pipelined = args.pipeline_model_parallel_size > 1
    vocab = padded_vocab_size(info.vocab_size, args.tensor_model_parallel_size)
    if pipelined:
        from ssa_megatron.model.pipeline import build_pipeline_model
        topology = pipeline_topology(args, dp_size)
        model = build_pipeline_model(config, vocab, args.max_position_embeddings, args.rotary_base,
                                     topology, args.recompute_interval)
    else:
        layer_spec = None
        if args.layer_spec == "megatron-local":
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
            layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        model = build_gpt_model(config, info.vocab_size, args.max_position_embeddings, args.rotary_base,
                                layer_spec=layer_spec)
    if torch.cuda.is_available():
        model.cuda()
    if pipelined:
        from ssa_megatron.training.grad_norm import mark_pipeline_norm_ownership
        mark_pipeline_norm_ownership(model)
    AlignLossLoggingHelper.tracker.configure(args.num_layers)
    AlignLossLoggingHelper.selection_tracker.configure(args.num_layers)
    n_params = sum(p.numel() for p in model.parameters())
    schedule = lr_lambda(args)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, args.weight_decay),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config, mpu=None if pipelined else MegatronMPU(), dist_init_required=False)
    engine_patches.record_fp32_grad_norm(engine)
    return engine, ds_config, n_params, config


def _window_mean(tracker, groups: dict):
    """(per-layer means of this logging window, their mean over the layers that logged, NaN when
    none did); the tracker starts the next window."""
    per_layer = tracker.per_layer(**groups)
    seen = per_layer[~torch.isnan(per_layer)]
    tracker.reset()
    return per_layer, (float(seen.mean()) if seen.numel() else float("nan"))


def log_window(args, engine, state: TrainState, logger, result: TrainResult, grad_norm: float,
               tflop_per_iteration: float) -> None:
    """The log line and TensorBoard scalars of the iterations since the last one: LM loss (DP
    mean), alignment (and selection) loss per layer, lr, gradient norm, throughput."""
    from megatron.core import parallel_state as ps

    from ssa_megatron.model.align_loss import AlignLossLoggingHelper
    groups = dict(
        pp_group=ps.get_pipeline_model_parallel_group() if args.pipeline_model_parallel_size > 1 else None,
        tp_group=ps.get_tensor_model_parallel_group(), dp_group=ps.get_data_parallel_group(),
        device=_device() if dist.get_backend() == "nccl" else None)
    per_layer, align = _window_mean(AlignLossLoggingHelper.tracker, groups)
    select = float("nan")
    if args.ssa_select_align_coef:
        _, select = _window_mean(AlignLossLoggingHelper.selection_tracker, groups)
        result.setdefault("select_loss", []).append(select)
    avg_loss = float(_dp_mean(torch.tensor([state.window_loss / state.window_iters], dtype=torch.float64))[0])
    iterations_per_s = state.window_iters / state.window_time
    tokens_per_s = args.global_batch_size * args.seq_length * iterations_per_s
    result["align_loss"].append(align)
    logger.log_train(state.iteration, avg_loss, align, per_layer, engine.get_lr()[0], grad_norm, tokens_per_s,
                     tflop_per_iteration * iterations_per_s / dist.get_world_size(), state.consumed,
                     1000 / iterations_per_s, select_loss=select)
    state.close_window()


def evaluate_now(args, engine, valid_iter, config, eval_modes, gas: int, logger, result: TrainResult,
                 iteration: int) -> None:
    """Validation loss (per --eval-modes branch when given, PP = 1), logged and recorded."""
    pipelined = args.pipeline_model_parallel_size > 1
    if eval_modes and not pipelined:
        losses = evaluate_modes(engine, valid_iter, args.eval_iters, config, eval_modes)
        for mode, val in losses.items():
            logger.log_eval(iteration, val, mode)
        if losses:
            result.setdefault("valid_loss_modes", []).append(dict(iteration=iteration, **losses))
        return
    val = (evaluate_pipe(engine, valid_iter, args, gas) if pipelined
           else evaluate(engine, valid_iter, args.eval_iters, config))
    if val is not None:
        logger.log_eval(iteration, val)
        result.setdefault("valid_loss", []).append(val)


def _finished_checkpoint(args):
    """(path, iteration, its ssa_meta) of the checkpoint ``--load`` resumes from when it is
    already at --train-iters (nothing is left to train, so no model is built), else None. Read
    from ``latest`` (or --load-iteration) without verifying the files: a resume that trains on
    verifies them when it loads, and one without a readable ssa_meta.json takes that path."""
    from ssa_megatron.training import checkpoint_format as fmt
    if not args.load:
        return None
    tag = fmt.tag_for(args.load_iteration) if args.load_iteration is not None else fmt.read_latest(args.load)
    iteration = fmt.iteration_of(tag) if tag else None
    if iteration is None or iteration < args.train_iters or not os.path.isdir(os.path.join(args.load, tag)):
        return None
    try:
        meta = fmt.read_meta(os.path.join(args.load, tag))
    except fmt.CheckpointError:
        return None
    return os.path.join(args.load, tag), iteration, meta


def run(args, fault_hook: Optional[Callable] = None,
        before_step: Optional[Callable] = None) -> TrainResult:
    """Train per ``args``. ``fault_hook(rank)`` runs inside each save (tests inject crashes);
    ``before_step(engine, iteration)`` runs after backward, before each optimizer step."""
    from megatron.core import parallel_state as ps

    from ssa_megatron.data.datasets import (build_datasets, check_data_files, index_fingerprints,
                                            make_loader, parse_blend, read_tokenizer_info)
    from ssa_megatron.model.align_loss import AlignLossLoggingHelper
    from ssa_megatron.model.shape import padded_vocab_size
    from ssa_megatron.training import checkpointing as ckpt
    from ssa_megatron.training.distributed import init_distributed
    from ssa_megatron.training.flops import flops_per_token
    from ssa_megatron.training.run_safety import NonFiniteSteps, prepare_save_dir
    from ssa_megatron.training.signals import StopSignal
    from ssa_megatron.training.ssa_recipe import (BranchRecipe, full_coverage_note,
                                                  keep_checkpoint_selection_score)
    from ssa_megatron.training.tb import TrainLogger

    prefixes, _ = parse_blend(args.data_path)
    check_data_files(prefixes)  # a truncated or mismatched .bin/.idx: one line, before anything runs
    info = read_tokenizer_info(prefixes, args.vocab_size)
    init_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed)
    guard = prepare_save_dir(args, _log)  # lock --save; auto-resume / --start-over / refuse
    finished = _finished_checkpoint(args)
    if finished:
        path, iteration, meta = finished
        # flags of another model are still refused in one line, as a load would refuse them
        ckpt.check_compatible(meta, args, path, padded_vocab_size(info.vocab_size, args.tensor_model_parallel_size))
        _log(f"nothing to train: the checkpoint {path} is at iteration {iteration}, --train-iters is "
             f"{args.train_iters} (raise --train-iters to continue)")
        guard.release()
        return TrainResult(lm_loss=[], align_loss=[], grad_norm=[], iterations=[], saved=[], step_time=[],
                           iteration=iteration)
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    data_description = {"data_path": args.data_path, "tokenizer": info.description,
                        "index_sha256": index_fingerprints(args.data_path)}
    chosen = ckpt.choose_checkpoint(args.load, args) if args.load else None
    if chosen is not None:
        ckpt.refuse_data_of_another_tokenizer(args.load, args, data_description, chosen)
        kept = keep_checkpoint_selection_score(args, chosen.meta)
        if kept:
            _log(kept)
    _log(f"building the model ({args.num_layers} layers x {args.hidden_size}) and its DeepSpeed engine")
    engine, ds_config, n_params, config = build_engine(args, info, dp_size)
    nonfinite = NonFiniteSteps(engine, args.max_skipped_steps)
    gas = ds_config["gradient_accumulation_steps"]

    if before_step is not None:
        engine_patches.call_before_optimizer_step(engine, lambda: before_step(engine, state.iteration))

    state = TrainState()
    if args.load:
        state.iteration, state.consumed = ckpt.load_checkpoint(engine, args.load, args, data_description,
                                                               chosen)
        if state.iteration:
            _log(f"resumed from {args.load} at iteration {state.iteration} "
                 f"({state.consumed} samples consumed)")
    resumed_at = state.iteration or None

    def save(hook=None) -> str:
        """Save this iteration unless it is saved already (by this run, or the one loaded)."""
        tag = ckpt.tag_for(state.iteration)
        if tag not in result["saved"] and state.iteration != resumed_at:
            result["saved"].append(ckpt.save_checkpoint(engine, args.save, state.iteration, state.consumed,
                                                        args, data_description, args.keep_last,
                                                        fault_hook=hook))
        return tag

    gbs = args.global_batch_size
    eval_samples = 0
    if args.eval_interval:
        eval_samples = (args.train_iters // args.eval_interval + 1) * args.eval_iters * gbs
    train_ds, valid_ds, _ = build_datasets(args, info, [args.train_iters * gbs, eval_samples, 0],
                                           data_description["index_sha256"])
    train_loader = make_loader(train_ds, state.consumed, args.micro_batch_size, dp_rank, dp_size,
                               args.num_workers)
    valid_loader = make_loader(valid_ds, 0, args.micro_batch_size, dp_rank, dp_size, 0) if eval_samples else None
    train_iter = iter(train_loader)
    valid_iter = iter(valid_loader) if valid_loader is not None else None

    logger = TrainLogger(args, is_writer=(dist.get_rank() == 0), first_step=state.iteration + 1)
    stop = StopSignal()
    stop.on_force_exit.append(guard.release)
    tflop_per_token = flops_per_token(args, padded_vocab_size(info.vocab_size, args.tensor_model_parallel_size)) / 1e12
    tokens_per_iter = gbs * args.seq_length
    result = TrainResult(lm_loss=[], align_loss=[], grad_norm=[], iterations=[], saved=[], step_time=[])
    _log(f"model: {n_params / 1e6:.2f}M parameters per rank, attention {args.attention_mode}; "
         f"ZeRO stage {ds_config['zero_optimization'].get('stage', 0)}; TP {args.tensor_model_parallel_size} "
         f"DP {dp_size}; global batch {gbs} = {args.micro_batch_size} x {gas} accumulation x {dp_size}")
    recipe = BranchRecipe(args)
    _log(recipe.describe(args))
    notes = [full_coverage_note(args)]
    if state.iteration >= args.train_iters:
        notes.append(f"nothing to train: the checkpoint is at iteration {state.iteration}, --train-iters "
                     f"is {args.train_iters} (raise --train-iters to continue)")
    for note in filter(None, notes):
        _log(note)
    diagnostics = Diagnostics(args, engine, ds_config) if args.diagnostics_interval else None
    if diagnostics is not None and state.iteration:
        diagnostics.resume_at(state.iteration)
    eval_modes = [parse_eval_mode(m) for m in args.eval_modes] if args.eval_modes else None

    AlignLossLoggingHelper.tracker.reset()
    AlignLossLoggingHelper.selection_tracker.reset()
    engine.train()
    while state.iteration < args.train_iters:
        if stop.any_rank_received():
            if args.save:
                if state.iteration == resumed_at and args.load != args.save:
                    _log(f"stop signal before the first step: nothing new to save (the last "
                         f"checkpoint is {args.load}/{ckpt.tag_for(state.iteration)}); exiting")
                else:
                    _log(f"stop signal: saved {args.save}/{save()}; exiting")
            result["stopped_at"] = state.iteration
            break
        t0 = time.time()
        probe = diagnostics.start(state.iteration + 1) if diagnostics is not None else None
        iter_loss = train_step(engine, train_iter, args, config, recipe, state, gas, probe)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        step_time = time.time() - t0
        state.advance(gbs, iter_loss, step_time)
        result["step_time"].append(step_time)
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        # every iteration: record the DP-mean loss so tests can compare layouts step by step
        step_loss = float(_dp_mean(torch.tensor([iter_loss], dtype=torch.float64))[0])
        result["lm_loss"].append(step_loss)
        result["grad_norm"].append(grad_norm)
        result["iterations"].append(state.iteration)
        warning = nonfinite.check(state.iteration, step_loss, grad_norm)
        if warning:
            _log(warning)
            result.setdefault("skipped_iterations", []).append(state.iteration)
            if nonfinite.exhausted:
                raise nonfinite.halt(state.iteration, state.consumed,
                                     f"{args.save}/{save()}" if args.save else None)
        if probe is not None:
            record = diagnostics.finish(probe, state.iteration, step_loss, grad_norm, engine.get_lr()[0])
            logger.log_diagnostics(state.iteration, record)

        if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
            log_window(args, engine, state, logger, result, grad_norm, tflop_per_token * tokens_per_iter)
        if args.eval_interval and state.iteration % args.eval_interval == 0:
            evaluate_now(args, engine, valid_iter, config, eval_modes, gas, logger, result, state.iteration)

        if args.save and ((args.save_interval and state.iteration % args.save_interval == 0)
                          or state.iteration == args.train_iters):
            _log(f"saved checkpoint {args.save}/{save(fault_hook)}")

        if (args.exit_interval and state.iteration % args.exit_interval == 0
                and state.iteration < args.train_iters):
            if args.save:
                save()
            _log(f"exiting at iteration {state.iteration} (--exit-interval {args.exit_interval})")
            break
    stop.restore()
    logger.close()
    if torch.cuda.is_available():
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    result["tokens_per_iteration"] = tokens_per_iter
    result["flops_per_token"] = tflop_per_token * 1e12
    result["iteration"] = state.iteration
    result["consumed_samples"] = state.consumed
    result["engine"] = engine
    guard.release()
    return result


def main(argv: Optional[List[str]] = None) -> int:
    from ssa_megatron.training.arguments import parse_args
    args = parse_args(argv)
    from ssa_megatron.training import result_record
    try:
        result = run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        record_for_launcher(f"error: {err}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the training loop took over SIGINT
        print("interrupted (Ctrl-C) before training started; no checkpoint was written",
              file=sys.stderr, flush=True)
        return 130
    if args.result_json and (not dist.is_initialized() or dist.get_rank() == 0):
        if result.get("iterations") or not os.path.exists(args.result_json):  # nothing trained: keep it
            moved = result_record.set_aside(args.result_json)
            if moved:
                print(f"kept the earlier --result-json record as {moved}", flush=True)
            result_record.write(args.result_json, result)
    from ssa_megatron.training.distributed import destroy_distributed
    destroy_distributed(barrier=True)
    return 0 if "stopped_at" not in result else 3


if __name__ == "__main__":
    sys.exit(main())
