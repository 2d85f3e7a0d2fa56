r"""Does an SSA training step give the same loss and gradients with the Triton kernels as with
the plain-PyTorch reference, on a real model and real text?

    python tools/check_backend_parity.py --checkpoint runs/compare100/full-full_seed1/checkpoint \
        --data-path runs/english/english_text_document --micro-batch-size 2

Loads a checkpoint (any attention mode: every layer is switched to SSA training, both branches
plus the alignment loss), takes one micro-batch of held-out windows and, for each drawn branch
(full, sparse) and each loss (LM + alignment; alignment alone, i.e. LM weight 0), runs forward
and backward once per backend. Prints, per case, the loss difference and the worst relative
gradient difference over the parameter tensors (||g_triton - g_ref|| / ||g_ref||), and exits 1
when a case exceeds --tolerance. The alignment-only case isolates the sparse kernels' backward
under the tiny upstream gradients the alignment loss sends them on full-drawn steps.
On a GPU the model runs in bf16; without one, in fp32 on the CPU with the kernels under the
Triton interpreter (TRITON_INTERPRET=1, set here), slow but exact: use a tiny checkpoint.
"""
from __future__ import annotations

import json
import os

import torch


def _layers(model):
    from ssa_megatron.model.attention import SSACoreAttention
    return [m for m in model.modules() if isinstance(m, SSACoreAttention)]


def _grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def run_case(model, tokens, labels, position_ids, backend: str, mode: str, lm_weight: float):
    from ssa_megatron.model import forward_params
    from ssa_megatron.model.align_loss import AlignLossAutoScaler, AlignLossLoggingHelper
    from ssa_megatron.ops import dispatch

    AlignLossAutoScaler.set_loss_scale(1.0)
    AlignLossLoggingHelper.tracker.reset()
    model.zero_grad(set_to_none=True)
    with dispatch.attention_backend(backend):
        per_token = model(tokens, position_ids, None, labels=labels,
                          packed_seq_params=forward_params(seq_length=tokens.shape[-1], ssa_branch=mode))
        lm = per_token.float().mean()
        (lm * lm_weight).backward()
        align = AlignLossLoggingHelper.tracker.per_layer()
    return lm.item(), [float(x) for x in align], _grads(model)


def _mean(values) -> float:
    return sum(values) / max(1, len(values))


def compare(a, b):
    """Worst relative gradient difference over tensors whose reference gradient is not zero,
    the tensor it occurs in, and how many tensors differ in which ones carry a gradient."""
    worst, where = 0.0, None
    for name, ref in b.items():
        norm = ref.norm().item()
        if name not in a or norm == 0.0:
            continue
        rel = (a[name] - ref).norm().item() / norm
        if not rel <= worst:  # NaN counts as worst
            worst, where = rel, name
    return worst, where, len(set(a) ^ set(b))


def build_parser():
    from ssa_megatron.console import make_parser
    p = make_parser(prog="check_backend_parity.py", description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-path", required=True, help="prefix of the .bin/.idx corpus")
    p.add_argument("--split", default="98,2,0")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=None, help="default: the training length")
    p.add_argument("--align-coef", type=float, default=None, help="default: the checkpoint's")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="worst relative gradient difference allowed (bf16 noise is ~1e-2)")
    p.add_argument("--json", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    device = "cuda" if on_gpu else "cpu"

    from ssa_megatron.eval.data import batch_windows, indexed_stream, make_windows
    from ssa_megatron.eval.model import init_single_process_or_dp, load_model
    from ssa_megatron.model.align_loss import AlignLossLoggingHelper

    init_single_process_or_dp()
    model, spec, meta = load_model(args.checkpoint, bf16=on_gpu, device=device)
    length = args.seq_length or spec["train_seq_length"]
    layers = _layers(model)
    for layer in layers:
        layer.attention_mode = "ssa"
        if args.align_coef is not None:
            layer.align_coef = args.align_coef
    AlignLossLoggingHelper.tracker.configure(len(layers))
    model.train()
    stream = indexed_stream(args.data_path, args.split, "valid")
    windows = make_windows(len(stream), length)[: args.micro_batch_size]
    tokens, labels, _ = batch_windows(stream, windows, length)
    tokens, labels = tokens.to(device), labels.to(device)
    position_ids = torch.arange(length, device=device).unsqueeze(0).expand_as(tokens)

    where_run = torch.cuda.get_device_name() if on_gpu else "CPU (Triton interpreter)"
    report, ok = {"checkpoint": args.checkpoint, "device": where_run, "tokens": int(tokens.numel()),
                  "dtype": "bf16" if on_gpu else "fp32", "cases": []}, True
    print(f"{where_run}: {len(layers)} SSA layers, {tokens.shape[0]} x {length} tokens, "
          f"{report['dtype']}")
    print(f"{'branch':>7} {'loss':>12} | {'lm triton':>10} {'lm ref':>10} | {'align triton':>12} "
          f"{'align ref':>12} | {'worst grad rel':>14}  tensor")
    for mode in ("full", "sparse"):
        for lm_weight, label in ((1.0, "lm+align"), (0.0, "align")):
            lt, at, gt = run_case(model, tokens, labels, position_ids, "triton", mode, lm_weight)
            lr, ar, gr = run_case(model, tokens, labels, position_ids, "reference", mode, lm_weight)
            worst, where, mismatched = compare(gt, gr)
            case_ok = worst <= args.tolerance and mismatched == 0 and abs(lt - lr) < 0.02
            ok &= case_ok
            print(f"{mode:>7} {label:>12} | {lt:10.5f} {lr:10.5f} | {_mean(at):12.4e} {_mean(ar):12.4e} | "
                  f"{worst:14.3e}  {where}{'' if case_ok else '  <-- FAIL'}")
            report["cases"].append({"branch": mode, "loss": label, "lm_triton": lt, "lm_reference": lr,
                                    "align_triton": at, "align_reference": ar, "worst_grad_rel": worst,
                                    "worst_tensor": where, "grad_sets_differ": mismatched, "ok": case_ok})
    report["ok"] = ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print("parity: " + ("OK" if ok else "FAILED"))
    from ssa_megatron.training.distributed import destroy_distributed
    destroy_distributed()
    return 0 if ok else 1
