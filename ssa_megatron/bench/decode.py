"""Decode-step timing of the exported Hugging Face model (ssa_megatron/hf): sparse vs full mode
with a KV cache of --context tokens.

For each --heads layout (HQ/H/D) it builds the model (--layers, --hidden, --ffn, --vocab; random
weights in --dtype), fills every layer's cache (an SSACacheLayer, which also keeps the pooled
block keys) with --context random keys/values, and times one new token:

* attention: one layer's cache update + attention of the new token (full: SDPA over the cache;
  sparse: selection over the pooled keys + attention over the selected blocks, the three decode
  kernels on CUDA; sparse_unfused: the same math in torch ops, the path before those kernels);
* model: a whole forward step of the model (embedding, all layers, head) with that cache.

Each row prints median milliseconds for full and sparse, the ratio full / sparse, and the
predicted ratio of bytes read (KV cache + pooled keys; model rows add the weights), the card
named in the header. ``--cuda-graph`` also times CUDA-graph replays of the same steps (no launch
overhead: what a fused or graphed decoder would approach). On the CPU (``--device cpu``) it runs
the same code at a small size as a smoke test, timed with perf_counter.

Usage: python tools/bench_decode.py [--context 32768] [--heads 32/2/64,32/8/128] [--cuda-graph]
       [--json out.json]
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser():
    from ssa_megatron.console import make_parser
    p = make_parser(prog="bench_decode.py", description=__doc__)
    p.add_argument("--context", type=int, default=32768, help="tokens already in the KV cache")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument("--heads", default="32/2/64,32/8/128", help="comma list of HQ/H/D layouts")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--block-counts", type=int, default=16)
    p.add_argument("--selection-score", default="mean", choices=["mean", "moment2", "sub2", "sub4"],
                   help="the model's block score (moment2: the cache also keeps each block's key "
                        "variances, the scoring runs at twice the head dim; subN: the cache keeps "
                        "N sub-block means per block, the scoring reads N x the pooled keys)")
    p.add_argument("--select-proj", action="store_true",
                   help="the model has a learned selection map (random here): the scoring "
                        "queries are q + q P_h")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--rep", type=int, default=50, help="timed steps per row")
    p.add_argument("--cuda-graph", action="store_true", help="also time CUDA-graph replays")
    p.add_argument("--check-generation", action="store_true",
                   help="also decode 48 greedy tokens after a 1000-token prompt with a small "
                        "random model per layout and compare them with the uncached pass")
    p.add_argument("--json", default=None, help="write all numbers to this file")
    return p


def predicted_bytes(context, batch, h, d, block_size, block_counts, kv_bytes, pooled_bytes=4,
                    pooled_widths=1, map_bytes=0):
    """Bytes one layer reads per decode step: (full, sparse). Full reads the whole K and V cache;
    sparse reads the fp32 pooled keys (``pooled_widths`` x D per block: 2 for moment2, N for subN), K/V of
    block_counts blocks per kv head and ``map_bytes`` (a selection map's weights)."""
    full = 2 * context * batch * h * d * kv_bytes
    selected = min(block_counts * block_size, context)
    sparse = (context // block_size) * batch * h * d * pooled_bytes * pooled_widths \
        + 2 * selected * batch * h * d * kv_bytes + map_bytes
    return full, sparse


def _timer(device, cuda_graph_fn=None):
    def run(step, rep, cleanup):
        for _ in range(3):
            step()
            cleanup()
        times = []
        for _ in range(rep):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
            cleanup()
        return statistics.median(times)
    return run


def _graphed(step, cleanup):
    """A CUDA graph of one step (captured after a warm-up step); returns its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
        cleanup()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    cleanup()  # the Python side of the cache goes back; replays rewrite the same slot
    return graph.replay


NEAR_TIE = 0.05  # a swapped block's fp32 score within this share of the K-th place's: a near-tie


def selection_agreement(idx, scores, block_counts) -> dict:
    """The kernels' selected blocks ``idx`` [B, H, K] (-1 = empty) against the fp32 reference
    block scores ``scores`` [B, H, nb] (the reference's top-K by score, the current block at
    +inf): the share of (sequence, kv head) rows whose block *sets* equal the reference's, and
    the largest distance from the K-th reference score of any block that one side kept and the
    other did not, relative to that score (0.0 when every row agrees). TF32 scoring may swap
    near-ties; a larger distance means a wrong block."""
    ref = torch.topk(scores, min(block_counts, scores.shape[-1]), dim=-1)
    ref_idx = torch.where(ref.values > float("-inf"), ref.indices, torch.full_like(ref.indices, -1))
    kth = ref.values[..., -1].clamp(min=0.0)
    same, worst = 0, 0.0
    rows = idx.reshape(-1, idx.shape[-1]).tolist()
    for row, (got, want) in enumerate(zip(rows, ref_idx.reshape(-1, ref_idx.shape[-1]).tolist())):
        valid = [b for b in got if b != -1]
        if len(set(valid)) != len(valid) or len(valid) != sum(b != -1 for b in want):
            worst = float("inf")  # a block repeated, or fewer / more blocks than the reference keeps
            continue
        swapped = set(got) ^ set(want)
        swapped.discard(-1)
        if not swapped:
            same += 1
            continue
        flat = scores.reshape(-1, scores.shape[-1])[row]
        k = kth.reshape(-1)[row].item()
        if k == float("inf"):  # K = 1: only the current block, which nothing may displace
            worst = float("inf")
            continue
        for block in swapped:  # a block past the scored range is a future one: never a tie
            gap = abs(flat[block].item() - k) / max(k, 1e-30) if 0 <= block < flat.numel() else float("inf")
            worst = max(worst, gap)
    return {"check_indices_same": same / max(len(rows), 1), "check_swap_gap": worst}


def check_decode_kernels(q, k1, layer, ctx, block_size, block_counts, scale, score="mean",
                         q_select=None) -> dict:
    """The decode kernels against the reference math in fp32 on one step of the filled cache:
    the selected block sets (judged: equal to the reference's up to near-ties, see
    :func:`selection_agreement`), and the output's error against the reference attention over
    the kernels' own blocks, relative to its largest entry (judged). ``score`` and ``q_select``:
    the model's selection (modeling_ssa.selection_operands)."""
    from ssa_megatron.hf.modeling_ssa import selection_operands
    from ssa_megatron.ops import reference, triton_sparse_decode
    parts = reference.sub_parts(score) or 1
    if q.dim() == 3:
        q = q[:, None]  # [B, 1, HQ, D], as the model passes it (the kernel refuses more tokens)
    if q_select is not None and q_select.dim() == 3:
        q_select = q_select[:, None]
    kc, vc = layer.update(k1, k1)
    try:
        qs, pooled = selection_operands(q, q_select, kc, layer, block_size, score, scale)
        o, idx = triton_sparse_decode.sparse_decode_attention(
            q, kc, vc, pooled, ctx, block_size, block_counts, scale, return_indices=True, q_select=qs,
            parts=parts)
        scores = reference.pooled_block_scores((q if qs is None else qs).float(), pooled, ctx,
                                               block_size, (ctx + block_size) // block_size, scale,
                                               parts)[:, 0]
        ro = reference.sparse_attention_with_past(q.float(), kc.float(), vc.float(), idx[:, None],
                                                  ctx, block_size, scale)
    finally:
        layer.crop(-1)
    agreement = selection_agreement(idx, scores, block_counts)
    err = ((o.float() - ro).abs().max() / ro.abs().max()).item()
    return {**agreement, "check_rel_err": err,
            "check_ok": bool(err < 3e-2 and not torch.isnan(o).any() and agreement["check_swap_gap"] <= NEAR_TIE)}


def check_greedy_generation(device, dtype, hq, h, d, block_size, block_counts, mode="sparse",
                            prompt_len=1000, new_tokens=48, layers=2, hidden=256,
                            selection_score="mean", select_proj=False) -> dict:
    """Greedy decoding with the cache in ``mode`` (sparse: the decode kernels on CUDA) against
    the uncached forward pass over the whole sequence (sparse: the prefill kernels): the share of
    generated tokens that are the uncached pass's argmax, and the first position where they
    differ (None: all equal). A small random model with large weights, so argmax margins are
    wide; in bf16 the one-token and whole-sequence projections round differently, so full mode
    run the same way is the control that says how much of a difference is bf16's."""
    from ssa_megatron.hf.configuration_ssa import SSAConfig
    from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
    torch.manual_seed(0)
    cfg = SSAConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden,
                    num_hidden_layers=layers, num_attention_heads=hq, num_key_value_heads=h,
                    head_dim=d, block_size=block_size, block_counts=block_counts,
                    initializer_range=0.3, max_position_embeddings=prompt_len + new_tokens + 16,
                    ssa_selection_score=selection_score, ssa_select_proj=select_proj)
    with torch.device(device):
        model = SSAForCausalLM(cfg).to(dtype).eval()
    if select_proj:
        with torch.no_grad():
            for block in model.model.layers:
                block.self_attn.select_proj.normal_(0.0, 0.3)
    model.set_inference_mode(mode)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device)
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        whole = model(out, use_cache=False).logits[0, prompt_len - 1:-1].argmax(-1)
    same = whole == out[0, prompt_len:]
    first = None if bool(same.all()) else int((~same).nonzero()[0, 0])
    return {"generation_same": same.float().mean().item(), "generation_first_diff": first}


def generation_checks(device, dtype_name, hq, h, d, block_size, block_counts, **selection) -> dict:
    """check_greedy_generation in both modes, in the benchmark's dtype and in fp32. Judged: fp32
    (the selection sees the same scores on both paths up to summation order), where every token
    must match in both modes; the benchmark's dtype is reported beside full mode's control."""
    checks = {}
    for name in dict.fromkeys((dtype_name, "fp32")):
        for mode in ("full", "sparse"):
            checks[f"{mode}/{name}"] = check_greedy_generation(
                device, DTYPES[name], hq, h, d, block_size, block_counts, mode=mode, **selection)
    ok = all(c["generation_same"] == 1.0 for key, c in checks.items() if key.endswith("/fp32"))
    return {"generation": checks, "generation_ok": ok}


def bench_layout(args, hq, h, d):
    from ssa_megatron.hf.configuration_ssa import SSAConfig
    from ssa_megatron.hf.modeling_ssa import (SSAForCausalLM, full_attention_with_past,
                                              selection_operands, sparse_decode)
    from ssa_megatron.hf.ssa_cache import SSACacheLayer
    from ssa_megatron.ops import reference
    from transformers import DynamicCache
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    bs, bc, ctx, b = args.block_size, args.block_counts, args.context, args.batch
    if ctx % bs == bs - 1:
        ctx -= 1  # the timed token must not complete a block (a crop would drop its mean)
    torch.manual_seed(0)
    cfg = SSAConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                    num_hidden_layers=args.layers, num_attention_heads=hq, num_key_value_heads=h,
                    head_dim=d, block_size=bs, block_counts=bc, max_position_embeddings=ctx + 16,
                    ssa_selection_score=args.selection_score, ssa_select_proj=args.select_proj)
    moment2 = args.selection_score == "moment2"
    parts = reference.sub_parts(args.selection_score) or 1
    with torch.device(dev):
        model = SSAForCausalLM(cfg).to(dtype).eval()
    if args.select_proj:
        with torch.no_grad():
            for block in model.model.layers:
                block.self_attn.select_proj.normal_(0.0, 0.05)
    cache = DynamicCache(config=cfg)
    cache.layers = [SSACacheLayer(bs, squares=moment2, parts=parts) for _ in range(args.layers)]
    for layer in cache.layers:
        layer.update(torch.randn(b, h, ctx, d, device=dev, dtype=dtype),
                     torch.randn(b, h, ctx, d, device=dev, dtype=dtype))
    token = torch.randint(0, args.vocab, (b, 1), device=dev)
    q = torch.randn(b, 1, hq, d, device=dev, dtype=dtype)
    k1 = torch.randn(b, h, 1, d, device=dev, dtype=dtype)
    layer0 = cache.layers[0]
    attn0 = model.model.layers[0].self_attn

    def selection_query():  # a map's queries, computed in the timed step as the model does
        return attn0.selection_query(q) if args.select_proj else None
    scale = 1.0 / math.sqrt(d)
    timer = _timer(args.device)
    row = {"heads": f"{hq}/{h}/{d}", "context": ctx, "batch": b}
    kv_bytes = torch.finfo(dtype).bits // 8
    full_b, sparse_b = predicted_bytes(ctx, b, h, d, bs, bc, kv_bytes, pooled_widths=2 if moment2 else parts,
                                       map_bytes=hq * d * d * kv_bytes if args.select_proj else 0)
    n_params = sum(p.numel() for p in model.parameters())
    w_bytes = n_params * kv_bytes
    row["pred_attention_ratio"] = full_b / sparse_b
    row["pred_model_ratio"] = (w_bytes + args.layers * full_b) / (w_bytes + args.layers * sparse_b)
    row["params"] = n_params
    if args.device == "cuda":
        with torch.no_grad():
            row.update(check_decode_kernels(q, k1, layer0, ctx, bs, bc, scale,
                                            args.selection_score, selection_query()))

    def crop_one():
        layer0.crop(-1)

    def attention_step(mode):
        def step():
            kc, vc = layer0.update(k1, k1)
            if mode == "full":
                full_attention_with_past(q, kc, vc, ctx, scale)
            elif mode == "sparse":  # the decode kernels on CUDA
                sparse_decode(q, kc, vc, layer0, ctx, bs, bc, scale, selection_query(),
                              args.selection_score)
            else:  # "sparse_unfused": the reference math (torch ops), the path before the kernels
                qs, pooled = selection_operands(q, selection_query(), kc, layer0, bs,
                                                args.selection_score, scale)
                reference.sparse_decode_attention(q, kc, vc, pooled, ctx, bs, bc, scale, q_select=qs,
                                                  parts=parts)
        return step

    def model_step(mode):
        def step():
            model.config.inference_mode = mode
            model(token, cache=cache, use_cache=True)
        return step

    def crop_all():
        cache.crop(-1)

    with torch.no_grad():
        for what, make, cleanup, modes in (
                ("attention", attention_step, crop_one, ("full", "sparse", "sparse_unfused")),
                ("model", model_step, crop_all, ("full", "sparse"))):
            for mode in modes:
                row[f"{what}_{mode}_ms"] = timer(make(mode), args.rep, cleanup)
                if args.cuda_graph and args.device == "cuda":
                    try:
                        replay = _graphed(make(mode), cleanup)
                        row[f"{what}_{mode}_graph_ms"] = timer(replay, args.rep, lambda: None)
                    except RuntimeError as e:  # e.g. a host-to-device copy inside the step
                        row[f"{what}_graph_error"] = str(e).splitlines()[0][:200]
                        torch.cuda.synchronize()
            row[f"{what}_ratio"] = row[f"{what}_full_ms"] / row[f"{what}_sparse_ms"]
            if f"{what}_sparse_graph_ms" in row and f"{what}_full_graph_ms" in row:
                row[f"{what}_graph_ratio"] = row[f"{what}_full_graph_ms"] / row[f"{what}_sparse_graph_ms"]
    del model, cache
    return row


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_decode.py: --device cuda needs a CUDA GPU (use --device cpu for a smoke run)",
              file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"card: {card} | torch {torch.__version__} | {args.dtype} | context {args.context} | "
          f"batch {args.batch} | {args.layers} layers, hidden {args.hidden} | "
          f"block {args.block_size} x {args.block_counts} | selection {args.selection_score}"
          f"{' + map' if args.select_proj else ''}", flush=True)
    rows = []
    for spec in args.heads.split(","):
        hq, h, d = (int(x) for x in spec.split("/"))
        row = bench_layout(args, hq, h, d)
        if args.check_generation:
            row.update(generation_checks(args.device, args.dtype, hq, h, d, args.block_size,
                                         args.block_counts, selection_score=args.selection_score,
                                         select_proj=args.select_proj))
            cells = ", ".join(f"{key} {c['generation_same']:.3f} (first difference "
                              f"{c['generation_first_diff']})" for key, c in row["generation"].items())
            print(f"HQ{hq} H{h} D{d} greedy decoding with the cache vs the uncached pass, share of 48 "
                  f"tokens equal: {cells}: {'PASS' if row['generation_ok'] else 'FAIL'} (fp32 judged)",
                  flush=True)
        rows.append(row)
        graph = (f" | graphed full {row['attention_full_graph_ms']:.4f} sparse "
                 f"{row['attention_sparse_graph_ms']:.4f} ratio {row['attention_graph_ratio']:.2f}x"
                 if "attention_graph_ratio" in row else "")
        if "check_ok" in row:
            print(f"HQ{hq} H{h} D{d} decode kernels vs reference ({args.dtype} inputs): selected block "
                  f"sets identical for {row['check_indices_same']:.3f} of kv heads (swapped blocks "
                  f"within {row['check_swap_gap']:.1e} of the K-th score), output rel err "
                  f"{row['check_rel_err']:.1e}: {'PASS' if row['check_ok'] else 'FAIL'}", flush=True)
        print(f"HQ{hq} H{h} D{d} attention step (1 layer): full {row['attention_full_ms']:.4f} ms, "
              f"sparse {row['attention_sparse_ms']:.4f} ms, full/sparse {row['attention_ratio']:.2f}x "
              f"(bytes predict {row['pred_attention_ratio']:.1f}x; the unfused torch path "
              f"{row['attention_sparse_unfused_ms']:.4f} ms){graph}", flush=True)
        graph = (f" | graphed full {row['model_full_graph_ms']:.3f} sparse "
                 f"{row['model_sparse_graph_ms']:.3f} ratio {row['model_graph_ratio']:.2f}x"
                 if "model_graph_ratio" in row else
                 f" | no graph: {row['model_graph_error']}" if "model_graph_error" in row else "")
        print(f"HQ{hq} H{h} D{d} decode step (model, {row['params'] / 1e9:.2f}B params): full "
              f"{row['model_full_ms']:.3f} ms, sparse {row['model_sparse_ms']:.3f} ms, full/sparse "
              f"{row['model_ratio']:.2f}x (bytes predict {row['pred_model_ratio']:.2f}x){graph}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "args": vars(args), "rows": rows}, f,
                      indent=2)
    failed = [r["heads"] for r in rows if r.get("check_ok") is False or r.get("generation_ok") is False]
    if failed:
        print(f"bench_decode.py: the decode checks failed for {failed} (see above)", file=sys.stderr)
        return 1
    return 0

