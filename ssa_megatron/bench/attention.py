"""Benchmark SSA attention kernels against torch SDPA on one GPU.

1. Correctness in bf16 at small shapes (dense and packed): Triton selection vs the reference
   (as sets, near-ties allowed), Triton sparse attention output and dq/dk/dv vs the reference
   computed in fp32 on the same indices, alignment loss and its gradients; NaN checks.
2. Timings (median ms, triton.testing.do_bench) at B4 T8192 and B1 T32768 for
   (HQ32, H2, D64) and (HQ32, H8, D128): SDPA full causal fwd and fwd+bwd, our sparse branch
   (selection + sparse attention) fwd and fwd+bwd, the whole SSA attention (both branches +
   alignment loss) fwd+bwd, the NSA baseline (compression + selection + window 128, three gates;
   ops/nsa.py) fwd and fwd+bwd, sparse-only prefill (no grad), and fla-core's NSA selection kernel
   when importable. Ratios are against SDPA in the same run.
3. With ``--select-merge insert,sort``: the selection timed once per pass-2 merge strategy
   (``triton_selection.CONFIG["merge"]``) on the same inputs and card, columns ``select_<merge>``,
   and ``sel_merge_same``: the fraction of (token, kv head) index rows equal to the first
   strategy's (also checked on the bf16 correctness cases). ``--select-only`` skips every other
   timing.
4. With ``--sparse-forwards gather,block_major``: the sparse attention forward, the sparse branch
   fwd+bwd and the sparse prefill once per forward kernel (``triton_block_major.CONFIG
   ["sparse_forward"]``; the backward is the gather kernels' for both), columns
   ``<column>@<forward>``, and ``fwd_maxdiff@<forward>``, its bf16 output's largest difference to
   the gather forward's on the same indices.
5. With ``--decode``: one decode step at ``--decode-context`` tokens of a 1B-shape model for each
   ``--heads`` layout, full and sparse mode (``ssa_megatron/bench/decode.py``).
Last, the issue's target table (kernels v8): per layout and shape, the measured ratio beside its
target, the card named.

Usage: python tools/bench_attention.py [--shapes 4x8192,1x32768] [--json out.json]
       [--select-merge insert,sort] [--select-only] [--sparse-forwards gather,block_major]
       [--decode]
"""
from __future__ import annotations

import argparse
import contextlib
import json

import torch
import torch.nn.functional as F

from ssa_megatron.ops import reference as ref
from ssa_megatron.ops.kernel_config import override_config

BS, KC = 16, 16


def median_ms(fn, warmup=10, rep=50):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep)


def _merge_variants(q, k, merges, cs=None, timed=False):
    """Selection with each CONFIG["merge"] in ``merges`` (restored afterwards).

    Returns ({merge: ms or None}, fraction of (token, kv head) rows equal to the first merge's).
    """
    from ssa_megatron.ops import triton_selection as tsel
    ms, first, same = {}, None, 1.0
    for m in merges:
        with override_config(tsel.CONFIG, merge=m):
            idx = tsel.select_blocks(q, k, BS, KC, cs)
            if first is None:
                first = idx
            else:
                same = min(same, (idx == first).all(-1).float().mean().item())
            ms[m] = median_ms(lambda: tsel.select_blocks(q, k, BS, KC, cs)) if timed else None
    return ms, same


def _selection_agreement(q, k, cs, score):
    """Triton's selected block sets against the reference's on the same bf16 inputs (fp32
    scores) under ``score``: (current block in slot 0 everywhere, share of identical sets, the
    largest reference-score distance from the K-th score of a block in only one of two sets,
    the reference's indices)."""
    from ssa_megatron.ops import triton_selection as tsel
    b, t = q.shape[:2]
    it = tsel.select_blocks(q, k, BS, KC, cs, score=score)
    ir = ref.select_blocks(q, k, BS, KC, cs, score=score)
    slot0 = bool((it[..., 0] == ir[..., 0]).all())
    same = (torch.sort(it, dim=-1).values == torch.sort(ir, dim=-1).values).all(-1)
    worst = 0.0
    bad = (~same).nonzero()
    if bad.numel():  # where sets differ, the differing blocks must be near-ties
        segs = ref.segments(t, cs, b)
        for bi, ti, hi in bad[:200].tolist():
            a0 = [a for a, e in segs if a <= ti < e][0]
            sc = ref.chunk_scores(q[bi:bi + 1, ti:ti + 1], k[bi:bi + 1, a0:ti + 1], ti - a0,
                                  BS, None, score)[0, 0, hi]
            x = set(it[bi, ti, hi].tolist()) ^ set(ir[bi, ti, hi].tolist())
            x.discard(-1)
            kth = sc[ir[bi, ti, hi][ir[bi, ti, hi] >= 0].long()].min().item()
            # sets that differ only in empty slots hold different numbers of blocks: no tie
            worst = max(worst, max((abs(sc[j].item() - kth) for j in x), default=float("inf")))
    return slot0, same.float().mean().item(), worst, ir


def check_correctness(device, verbose=True, merges=()):
    from ssa_megatron.ops import dispatch, triton_alignment_loss
    from ssa_megatron.ops import triton_sparse_attention as tsp
    torch.manual_seed(0)
    ok = True
    rows = []
    cases = [(2, 1024, 32, 2, 64, None), (1, 1024, 32, 8, 128, None), (1, 1000, 16, 16, 64, None),
             (1, 1500, 32, 2, 64, [0, 100, 611, 1333, 1500]), (1, 777, 8, 8, 64, [0, 300, 777]),
             (1, 700, 32, 4, 64, [0, 17, 700])]
    for b, t, hq, h, d, cu in cases:
        cs = torch.tensor(cu, device=device, dtype=torch.int32) if cu else None
        q = torch.randn(b, t, hq, d, device=device, dtype=torch.bfloat16)
        k = torch.randn(b, t, h, d, device=device, dtype=torch.bfloat16)
        v = torch.randn(b, t, h, d, device=device, dtype=torch.bfloat16)
        # selection: sets vs the reference on the same bf16 inputs (fp32 scores)
        slot0, frac_same, worst, ir = _selection_agreement(q, k, cs, "mean")
        sel_ok = slot0 and (frac_same == 1.0 or worst < 2e-2)
        scored = {"sel_moment2": "not run: the trainer refuses moment2 above head dim 64"}
        if 2 * d <= 128:  # the moment2 score runs the same kernel at head dim 2 D
            m_slot0, m_same, m_worst, _ = _selection_agreement(q, k, cs, "moment2")
            sel_ok &= m_slot0 and (m_same == 1.0 or m_worst < 2e-2)
            scored = dict(sel_moment2="checked", sel_moment2_same_frac=round(m_same, 4),
                          sel_moment2_worst_tie=m_worst)
        # the subN scores: pass 2 sums each block's sub-block probabilities
        s_slot0, s_same, s_worst, _ = _selection_agreement(q, k, cs, "sub4")
        sel_ok &= s_slot0 and (s_same == 1.0 or s_worst < 2e-2)
        scored.update(sel_sub4_same_frac=round(s_same, 4), sel_sub4_worst_tie=s_worst)
        merge_same = None
        if len(merges) > 1:  # every merge strategy must give the same indices
            merge_same = _merge_variants(q, k, merges, cs)[1]
            sel_ok &= merge_same == 1.0
        # sparse attention on the reference indices: bf16 kernel vs fp32 reference
        qr, kr, vr = (x.detach().float().requires_grad_() for x in (q, k, v))
        qt, kt, vt = (x.detach().clone().requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q)
        ot = tsp.sparse_attention(qt, kt, vt, ir, BS, cs)
        ot.backward(do)
        orf = ref.sparse_attention(qr, kr, vr, ir, BS, cs)
        orf.backward(do.float())
        errs = []
        for a, r_ in ((ot, orf), (qt.grad, qr.grad), (kt.grad, kr.grad), (vt.grad, vr.grad)):
            errs.append(((a.float() - r_).abs().max() / r_.abs().max().clamp_min(1e-6)).item())
        nan = any(torch.isnan(x).any().item() for x in (ot, qt.grad, kt.grad, vt.grad))
        att_ok = (not nan) and max(errs) < 3e-2
        # alignment loss fused vs reference
        of = torch.randn_like(q, requires_grad=True)
        os_ = torch.randn_like(q, requires_grad=True)
        la = triton_alignment_loss.alignment_loss(of, os_)
        ga = torch.autograd.grad(la, (of, os_))
        lr = ref.alignment_loss(of, os_)
        gr = torch.autograd.grad(lr, (of, os_))
        al_err = max(abs(la.item() - lr.item()) / abs(lr.item()),
                     *[((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
                       for x, y in zip(ga, gr)])
        al_ok = al_err < 1e-2
        # full attention through the dispatch (SDPA, GQA, packed docs one by one)
        ff = dispatch.full_attention(q, k, v, cs)
        fr = ref.full_attention(q.float(), k.float(), v.float(), cs)
        full_err = ((ff.float() - fr).abs().max() / fr.abs().max()).item()
        al_ok &= full_err < 3e-2
        # NSA compression and window branches: SDPA path (bf16) vs the fp32 reference
        from ssa_megatron.ops import nsa
        nsa_err = 0.0
        for fn in (lambda x, y, z, i: nsa.compression_attention(x, y, z, BS, cs, impl=i),
                   lambda x, y, z, i: nsa.sliding_window_attention(x, y, z, 128, cs, impl=i)):
            a_, r_ = fn(q, k, v, "sdpa").float(), fn(q.float(), k.float(), v.float(), "reference")
            nsa_err = max(nsa_err, ((a_ - r_).abs().max() / r_.abs().max()).item())
        al_ok &= nsa_err < 3e-2
        ok &= sel_ok and att_ok and al_ok
        rows.append(dict(shape=f"B{b} T{t} HQ{hq} H{h} D{d}" + (f" docs{len(cu) - 1}" if cu else ""),
                         sel_same_frac=round(frac_same, 4), sel_worst_tie=worst, **scored,
                         rel_err_o_dq_dk_dv=[float(f"{e:.2e}") for e in errs], nan=nan,
                         align_rel_err=float(f"{al_err:.1e}"), full_rel_err=float(f"{full_err:.1e}"),
                         nsa_cmp_win_rel_err=float(f"{nsa_err:.1e}"),
                         **({} if merge_same is None else {"sel_merge_same": merge_same}),
                         ok=bool(sel_ok and att_ok and al_ok)))
        if verbose:
            print("check", rows[-1], flush=True)
    return ok, rows


def _expanded(q, k, v, do):
    """[B, HQ, T, D] leaves with kv expanded to the query heads, and dO in that layout."""
    g = q.shape[2] // k.shape[2]
    qh = q.detach().transpose(1, 2).contiguous().requires_grad_()
    kh = k.detach().transpose(1, 2).repeat_interleave(g, 1).contiguous().requires_grad_()
    vh = v.detach().transpose(1, 2).repeat_interleave(g, 1).contiguous().requires_grad_()
    return (qh, kh, vh), do.transpose(1, 2).contiguous()


def _time_full(leaves, doh, prefix):
    """SDPA full causal fwd and fwd+bwd on ``leaves`` (whatever backend is in force)."""
    def f():
        return F.scaled_dot_product_attention(*leaves, is_causal=True)

    out = {prefix + "_fwd": median_ms(f)}
    out[prefix + "_fwdbwd"] = median_ms(lambda: torch.autograd.grad(f(), leaves, doh))
    return out


def time_sdpa(q, k, v, do):
    """The baseline: SDPA full causal on [B, HQ, T, D] with kv expanded to the query heads, fwd
    and fwd+bwd, on SDPA's own backend choice (cuDNN on an H200 with torch 2.11)."""
    return _time_full(*_expanded(q, k, v, do), "sdpa")


def time_sdpa_backends(q, k, v, do):
    """SDPA full causal fwd and fwd+bwd per backend (flash, cuDNN, memory-efficient), on the
    same expanded contiguous tensors as ``time_sdpa``; "n/a" where a backend refuses them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = q.shape[2] // k.shape[2]
    expanded, doh = _expanded(q, k, v, do)
    out = {}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        tag = "sdpa_" + name.split("_")[0].lower()
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                out.update(_time_full(expanded, doh, tag))
        except (RuntimeError, AttributeError) as exc:
            out[tag + "_fwd"] = f"n/a ({str(exc)[:60]})"
    # the full branch's ways to call SDPA from the model's [B, T, H, D] tensors (gradients
    # reach those tensors, so layout copies and the kv expansion's sum are included)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ways = {
        "gqa_strided": lambda a, b_, c: F.scaled_dot_product_attention(
            a.transpose(1, 2), b_.transpose(1, 2), c.transpose(1, 2), is_causal=True,
            enable_gqa=True),
        "gqa_contiguous": lambda a, b_, c: F.scaled_dot_product_attention(
            a.transpose(1, 2).contiguous(), b_.transpose(1, 2).contiguous(),
            c.transpose(1, 2).contiguous(), is_causal=True, enable_gqa=True),
        "expanded_strided": lambda a, b_, c: F.scaled_dot_product_attention(
            a.transpose(1, 2), b_.transpose(1, 2).repeat_interleave(g, 1),
            c.transpose(1, 2).repeat_interleave(g, 1), is_causal=True),
    }
    for name, way in ways.items():
        out[f"full_{name}_fwdbwd"] = median_ms(
            lambda: torch.autograd.grad(way(*leaves), leaves, doh))
    return out


def gpu_header(tool):
    """The card and versions, printed and returned as the JSON output's first fields; None
    (after saying so) where there is no CUDA GPU."""
    if not torch.cuda.is_available():
        print(f"{tool}: needs a CUDA GPU (run the CPU tests for correctness instead)")
        return None
    import triton
    name = torch.cuda.get_device_name(0)
    print(f"GPU: {name} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    return {"gpu": name, "torch": torch.__version__, "triton": triton.__version__}


def time_shape(b, t, hq, h, d, device, want_fla=True, merges=(), select_only=False,
               sdpa_backends=False, sdpa_forced=contextlib.nullcontext, sparse_forwards=()):
    from ssa_megatron.ops import dispatch, side_stream
    from ssa_megatron.ops import triton_selection as tsel
    from ssa_megatron.ops import triton_sparse_attention as tsp
    torch.manual_seed(1)
    g = hq // h
    dt = torch.bfloat16
    q = torch.randn(b, t, hq, d, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(b, t, h, d, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(b, t, h, d, device=device, dtype=dt, requires_grad=True)
    do = torch.randn(b, t, hq, d, device=device, dtype=dt)
    res = {}
    if merges:  # the selection once per merge strategy, same inputs, same card
        ms, same = _merge_variants(q.detach(), k.detach(), merges, timed=True)
        for m, x in ms.items():
            res[f"select_{m}"] = x
        res["sel_merge_same"] = same
    if select_only:
        res["select"] = median_ms(lambda: tsel.select_blocks(q.detach(), k.detach(), BS, KC))
        return res
    with sdpa_forced():
        res.update(time_sdpa(q, k, v, do))
    if sdpa_backends:
        res.update(time_sdpa_backends(q, k, v, do))

    # --- pieces of the sparse branch
    def select(score="mean"):
        return tsel.select_blocks(q.detach(), k.detach(), BS, KC, score=score)

    idx = select()
    res["select"] = median_ms(select)
    # the trainer's default block score (the recipe's sub4); the rows below keep the mean score
    res["select_sub4"] = median_ms(lambda: select("sub4"))
    res["sparse_attn_fwd"] = median_ms(lambda: tsp.sparse_attention(q.detach(), k.detach(), v.detach(), idx, BS))
    o = tsp.sparse_attention(q, k, v, idx, BS)
    nan = bool(torch.isnan(o).any())
    res["sparse_attn_bwd"] = median_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    gq, gk, gv = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    nan |= any(bool(torch.isnan(x).any()) for x in (gq, gk, gv))
    del o, gq, gk, gv

    def sparse_branch(indices=None):
        return tsp.sparse_attention(q, k, v, select() if indices is None else indices, BS)

    res["sparse_fwd"] = median_ms(lambda: sparse_branch())
    res["sparse_fwdbwd"] = median_ms(lambda: torch.autograd.grad(sparse_branch(), (q, k, v), do))

    def ssa_step(select_beside=False):
        """SSA's forward and backward; ``select_beside``: the selection on a side stream beside
        the full branch's SDPA."""
        wait = side_stream.beside(select, q, k) if select_beside else None
        of = dispatch.full_attention(q, k, v)
        osp = sparse_branch(wait() if wait else None)
        loss = dispatch.alignment_loss(of, osp)
        return torch.autograd.grad([of, loss], (q, k, v), [do, torch.ones_like(loss)])

    with sdpa_forced():
        res["ssa_fwdbwd"] = median_ms(ssa_step)
        res["ssa_fwdbwd_overlap"] = median_ms(lambda: ssa_step(select_beside=True))
        # SDPA's backward need not be deterministic: two plain steps are the control
        plain, again, beside = ssa_step(), ssa_step(), ssa_step(select_beside=True)
        res["plain_same"] = all(torch.equal(a, c) for a, c in zip(plain, again))
        res["overlap_same"] = all(torch.equal(a, c) for a, c in zip(plain, beside))
        res["overlap_rel_err"] = max(((a.float() - c.float()).abs().max()
                                      / a.float().abs().max().clamp_min(1e-6)).item()
                                     for a, c in zip(plain, beside))
        del plain, again, beside  # three sets of gradients: not held through the later timings

    def full_branch():  # SSA's full branch alone (GQA inside SDPA, [B, T, H, D] layout)
        return torch.autograd.grad(dispatch.full_attention(q, k, v), (q, k, v), do)

    with sdpa_forced():
        res["full_branch_fwdbwd"] = median_ms(full_branch)
        outs = ssa_step()
    nan |= any(bool(torch.isnan(x).any()) for x in outs)
    del outs

    # NSA baseline layer core (--attention-mode nsa): compression + selection + window 128, 3 gates
    from ssa_megatron.ops import nsa
    gates = torch.rand(b, t, hq, 3, device=device, dtype=dt, requires_grad=True)

    def nsa_f():
        return nsa.nsa_attention(q, k, v, gates, BS, KC, 128)

    res["nsa_fwd"] = median_ms(lambda: nsa_f())
    res["nsa_fwdbwd"] = median_ms(lambda: torch.autograd.grad(nsa_f(), (q, k, v, gates), do))
    outs = torch.autograd.grad(nsa_f(), (q, k, v, gates), do)
    nan |= any(bool(torch.isnan(x).any()) for x in outs)
    del outs

    with torch.no_grad():
        res["prefill_sparse"] = median_ms(lambda: sparse_branch())
        with sdpa_forced():
            res["dispatch_full_fwd"] = median_ms(lambda: dispatch.full_attention(q, k, v))
        # SDPA with enable_gqa (no kv expansion) for reference
        try:
            qh2, kh2, vh2 = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            res["sdpa_gqa_fwd"] = median_ms(lambda: F.scaled_dot_product_attention(
                qh2, kh2, vh2, is_causal=True, enable_gqa=True))
        except Exception as exc:  # noqa: BLE001
            res["sdpa_gqa_fwd"] = f"n/a ({type(exc).__name__})"
    res["nan"] = nan
    if sparse_forwards:
        res.update(_time_sparse_forwards(q, k, v, do, idx, sparse_forwards))

    if want_fla:
        try:
            from fla.ops.nsa import parallel_nsa  # type: ignore
            if g >= 16:
                bi = idx.long().clamp_min(0)  # fla wants valid indices; uses block_counts
                def fla_f():
                    return parallel_nsa(q, k, v, g_cmp=None, g_slc=torch.ones(b, t, hq, device=device, dtype=dt),
                                        g_swa=None, block_indices=bi, block_counts=KC, block_size=BS)
                res["fla_sel_fwd"] = median_ms(lambda: fla_f())
                res["fla_sel_fwdbwd"] = median_ms(lambda: torch.autograd.grad(fla_f(), (q, k, v), do))
            else:
                res["fla_sel_fwd"] = "n/a (G<16)"
        except Exception as exc:  # noqa: BLE001
            res["fla_sel_fwd"] = f"n/a ({type(exc).__name__}: {str(exc)[:60]})"
    return res


def _time_sparse_forwards(q, k, v, do, idx, forwards):
    """The sparse forward, the sparse branch fwd+bwd and the prefill with each forward kernel
    (dispatch.sparse_attention under triton_block_major.CONFIG["sparse_forward"])."""
    from ssa_megatron.ops import dispatch
    from ssa_megatron.ops import triton_block_major as tbm
    from ssa_megatron.ops import triton_selection as tsel
    res = {}
    with torch.no_grad(), override_config(tbm.CONFIG, sparse_forward="gather"):
        reference_out = dispatch.sparse_attention(q, k, v, idx, BS)
    for name in forwards:
        with override_config(tbm.CONFIG, sparse_forward=name):
            def branch():
                return dispatch.sparse_attention(q, k, v, tsel.select_blocks(q.detach(), k.detach(), BS, KC), BS)
            with torch.no_grad():
                out = dispatch.sparse_attention(q, k, v, idx, BS)
                res[f"fwd_maxdiff@{name}"] = (out.float() - reference_out.float()).abs().max().item()
                res[f"sparse_attn_fwd@{name}"] = median_ms(lambda: dispatch.sparse_attention(q, k, v, idx, BS))
                res[f"prefill_sparse@{name}"] = median_ms(branch)
            res[f"sparse_fwdbwd@{name}"] = median_ms(lambda: torch.autograd.grad(branch(), (q, k, v), do))
    return res


def target_table(name: str, table, forwards=("gather",)) -> list:
    """The kernels-v8 issue's targets beside this run's ratios (rows of text)."""
    targets = [  # (heads, shape, what, key, target, higher is better)
        ("HQ32 H8 D128", "B4 T8192", "sparse branch fwd+bwd / SDPA fwd+bwd", "sparse_fwdbwd", 0.40, False),
        ("HQ32 H8 D128", "B4 T8192", "whole SSA fwd+bwd / SDPA fwd+bwd", "ssa_fwdbwd", 1.45, False),
        ("HQ32 H8 D128", "B4 T8192", "whole SSA, selection beside SDPA (side stream)",
         "ssa_fwdbwd_overlap", 1.45, False),
        ("HQ32 H8 D128", "B1 T32768", "sparse prefill speed-up vs SDPA fwd", "prefill_sparse", 3.0, True),
        ("HQ32 H8 D128", "B1 T32768", "selection alone (ms)", "select", 3.0, False),
        ("HQ32 H2 D64", "B1 T32768", "sparse prefill speed-up vs SDPA fwd", "prefill_sparse", 4.0, True),
        ("HQ32 H2 D64", "B1 T32768", "selection alone (ms)", "select", 1.5, False),
    ]
    rows = [f"targets on {name} (same run):", "| layout | shape | what | forward | measured | target | met |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for heads, shape, what, key, target, higher in targets:
        r = next((r for r in table if r["shape"].startswith(shape + " ") and r["shape"].endswith(heads)), None)
        if r is None:
            continue
        for fwd in (("gather",) if key in ("select", "ssa_fwdbwd", "ssa_fwdbwd_overlap") else forwards):
            col = key if fwd == "gather" else f"{key}@{fwd}"
            if not isinstance(r.get(col), float):
                continue
            if key == "select":
                value = r[col]
            elif key == "prefill_sparse":
                value = r["sdpa_fwd"] / r[col]
            else:
                value = r[col] / r["sdpa_fwdbwd"]
            met = value >= target if higher else value <= target
            rows.append(f"| {heads} | {shape} | {what} | {fwd} | {value:.3f} | "
                        f"{'>=' if higher else '<='} {target} | {'yes' if met else 'no'} |")
    return rows


def shape_grid(shapes: str, heads: str):
    """(B, T, HQ, H, D) for every pair of the command line's ``--shapes`` (comma list of BxT)
    and ``--heads`` (comma list of HQ/H/D)."""
    for shp in shapes.split(","):
        b, t = (int(x) for x in shp.lower().split("x"))
        for hd in heads.split(","):
            hq, h, d = (int(x) for x in hd.split("/"))
            yield b, t, hq, h, d


def _time_shapes(args, dev, merges, table, forced):
    """Every BxT x HQ/H/D shape of the command line, appended to ``table``."""
    forwards = parse_forwards(args.sparse_forwards)
    for b, t, hq, h, d in shape_grid(args.shapes, args.heads):
        try:
            r = time_shape(b, t, hq, h, d, dev, merges=merges, select_only=args.select_only,
                           sdpa_backends=args.sdpa_backends, sdpa_forced=forced,
                           sparse_forwards=forwards)
        except Exception as exc:  # noqa: BLE001  (report and go on to the next shape)
            import traceback
            traceback.print_exc()
            print(f"timing {b}x{t} {hq}/{h}/{d} failed: {exc}", flush=True)
            continue
        r["shape"] = f"B{b} T{t} HQ{hq} H{h} D{d}"
        table.append(r)
        print("timing", json.dumps(r), flush=True)
        torch.cuda.empty_cache()


def parse_forwards(spec: str):
    """--sparse-forwards: the forwards besides the default gather row, checked against the names
    the dispatch knows."""
    from ssa_megatron.ops.triton_block_major import SPARSE_FORWARDS
    names = tuple(x for x in (spec or "").split(",") if x)
    unknown = [x for x in names if x not in SPARSE_FORWARDS]
    if unknown:
        raise SystemExit(f"error: --sparse-forwards {','.join(unknown)}: expected names from "
                         f"{', '.join(SPARSE_FORWARDS)}")
    return tuple(x for x in names if x != "gather")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shapes", default="4x8192,1x32768", help="comma list of BxT")
    ap.add_argument("--heads", default="32/2/64,32/8/128", help="comma list of HQ/H/D")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-only", action="store_true",
                    help="only the bf16 correctness checks against the reference (no timings; "
                         "not with --skip-check)")
    ap.add_argument("--json", default=None, help="write all numbers to this file")
    ap.add_argument("--select-merge", default=None,
                    help="comma list of selection merge strategies to time side by side "
                         "(triton_selection.CONFIG['merge'], e.g. insert,sort)")
    ap.add_argument("--select-only", action="store_true",
                    help="time only the selection (with --select-merge: each strategy)")
    ap.add_argument("--sdpa-backends", action="store_true",
                    help="also time SDPA's flash, cuDNN and memory-efficient backends apart")
    ap.add_argument("--sdpa-backend", default="default",
                    choices=("default", "flash", "cudnn", "efficient"),
                    help="force one SDPA backend for the baseline and SSA's full branch alike "
                         "(default: SDPA's own choice; cuDNN on an H200 with torch 2.11)")
    ap.add_argument("--sparse-forwards", default="gather",
                    help="comma list of sparse forward kernels to time side by side: gather "
                         "(the default kernels), block_major, auto")
    ap.add_argument("--decode", action="store_true",
                    help="also time one decode step of a 1B-shape model per --heads layout, "
                         "full and sparse mode (bench/decode.py)")
    ap.add_argument("--decode-context", type=int, default=32768, help="tokens in the KV cache for --decode")
    ap.add_argument("--decode-score", default=None, choices=["mean", "moment2", "sub2", "sub4"],
                    help="the selection score of the --decode model (default: the one new runs "
                         "train with, model/recipe_defaults.py)")
    args = ap.parse_args(argv)
    if args.check_only and args.skip_check:
        ap.error("--check-only and --skip-check exclude each other")
    parse_forwards(args.sparse_forwards)
    merges = tuple(m for m in (args.select_merge or "").split(",") if m)
    out = gpu_header("bench_attention")
    if out is None:
        return 2
    dev = torch.device("cuda")
    name = out["gpu"]
    if not args.skip_check:
        ok, rows = check_correctness(dev, merges=merges)
        out["check"] = rows
        print(f"correctness (bf16 vs reference): {'PASS' if ok else 'FAIL'}", flush=True)
        if args.check_only:
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(out, fh, indent=1)
            return 0 if ok else 1
    table = []
    out["sdpa_backend"] = args.sdpa_backend
    forced = contextlib.nullcontext
    if args.sdpa_backend != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, args.sdpa_backend.upper() + "_ATTENTION")

        def forced():
            return sdpa_kernel(backend)
        print(f"SDPA backend forced: {args.sdpa_backend} (the baseline and SSA's full branch; "
              "the NSA layer's masked attention keeps SDPA's choice)", flush=True)
    _time_shapes(args, dev, merges, table, forced)
    out["timings"] = table

    def f(x):
        return f"{x:8.3f}" if isinstance(x, float) else f"{str(x)[:8]:>8}"

    print(f"\n=== {name}: median ms (ratio = ours / SDPA in the same run; SDPA backend: "
          f"{args.sdpa_backend}) ===")
    cols = ["sdpa_fwd", "sdpa_fwdbwd", "select", "select_sub4", "sparse_attn_fwd", "sparse_attn_bwd",
            "sparse_fwd", "sparse_fwdbwd", "ssa_fwdbwd", "ssa_fwdbwd_overlap", "full_branch_fwdbwd", "nsa_fwd",
            "nsa_fwdbwd", "prefill_sparse", "fla_sel_fwd", "fla_sel_fwdbwd"]
    if merges:
        cols[3:3] = [f"select_{m}" for m in merges] + ["sel_merge_same"]
    if args.select_only:
        cols = [c for c in cols if c.startswith("sel")]
    print(f"{'shape':28s}" + "".join(f"{c[:16]:>17s}" for c in cols))
    for r in table:
        print(f"{r['shape']:28s}" + "".join(f"{f(r.get(c, '-')):>17s}" for c in cols))
    print("\nratios:")
    for r in ([] if args.select_only else table):
        sf, sfb = r["sdpa_fwd"], r["sdpa_fwdbwd"]
        line = (f"{r['shape']:28s} sparse fwd+bwd / SDPA fwd+bwd = {r['sparse_fwdbwd'] / sfb:.3f} "
                f"(target <= 0.167) | SSA fwd+bwd / SDPA fwd+bwd = {r['ssa_fwdbwd'] / sfb:.3f} "
                f"(target <= 1.25; its full branch alone {r['full_branch_fwdbwd'] / sfb:.3f}) "
                f"| NSA fwd+bwd / SDPA fwd+bwd = {r['nsa_fwdbwd'] / sfb:.3f} "
                f"| prefill speed-up vs SDPA fwd = {sf / r['prefill_sparse']:.2f}x "
                f"(target >= 8 at T32768)")
        if isinstance(r.get("fla_sel_fwdbwd"), float):
            ours = r["sparse_attn_fwd"] + r["sparse_attn_bwd"]
            line += f" | fla sel fwd+bwd / ours (given indices) = {r['fla_sel_fwdbwd'] / ours:.2f}x"
        line += f" | NaN: {r['nan']}"
        print(line)
        if args.sdpa_backends:
            print("  SDPA backends fwd / fwd+bwd (ms): " + ", ".join(
                f"{nm} {f(r.get(f'sdpa_{nm}_fwd')).strip()} / "
                f"{f(r.get(f'sdpa_{nm}_fwdbwd', '-')).strip()}"
                for nm in ("flash", "cudnn", "efficient")))
            print("  full branch fwd+bwd from [B, T, H, D] (ms): " + ", ".join(
                f"{nm} {f(r.get(f'full_{nm}_fwdbwd')).strip()}"
                for nm in ("gqa_strided", "gqa_contiguous", "expanded_strided")))
    forwards = ("gather",) + parse_forwards(args.sparse_forwards)
    if len(forwards) > 1:
        print("\nsparse forwards (ms; the backward is the gather kernels' for all):")
        for r in table:
            print(f"{r['shape']:28s} " + " | ".join(
                f"{fw}: fwd {r.get('sparse_attn_fwd' if fw == 'gather' else f'sparse_attn_fwd@{fw}', float('nan')):.3f} "
                f"fwd+bwd {r.get('sparse_fwdbwd' if fw == 'gather' else f'sparse_fwdbwd@{fw}', float('nan')):.3f}"
                + ("" if fw == "gather" else f" max diff {r.get(f'fwd_maxdiff@{fw}', float('nan')):.1e}")
                for fw in forwards))
    if args.decode:
        out["decode"] = decode_rows(args)
    if not args.select_only:
        print("\n" + "\n".join(target_table(name, table, forwards)))
        for row in out.get("decode", []):
            for key, how in (("model_ratio", "eager"), ("model_graph_ratio", "CUDA graph")):
                if key in row:
                    print(f"| HQ{row['heads'].replace('/', ' H', 1).replace('/', ' D')} | B1 context "
                          f"{row['context']} | decode step full / sparse (model, {how}, "
                          f"{row['selection_score']}) | - | {row[key]:.2f}x | >= 3x | "
                          f"{'yes' if row[key] >= 3 else 'no'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


def decode_rows(args) -> list:
    """bench/decode.py's rows for every --heads layout at --decode-context, batch 1, bf16."""
    from ssa_megatron.bench import decode
    from ssa_megatron.model.recipe_defaults import RECIPE_SELECTION_SCORE
    score = args.decode_score or RECIPE_SELECTION_SCORE
    dargs = decode.build_parser().parse_args(["--context", str(args.decode_context),
                                              "--selection-score", score, "--cuda-graph"])
    rows = []
    for spec in args.heads.split(","):
        hq, h, d = (int(x) for x in spec.split("/"))
        try:
            row = decode.bench_layout(dargs, hq, h, d)
        except Exception as exc:  # noqa: BLE001  (report and go on)
            print(f"decode {spec} failed: {exc}", flush=True)
            continue
        row["selection_score"] = score
        rows.append(row)
        print("decode", json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return rows

