"""Sweep the SSA kernels' launch and algorithm settings on one GPU, against SDPA in the same run.

Every variant is a set of overrides of ``triton_selection.CONFIG`` (selection) or
``triton_sparse_attention.CONFIG`` (sparse attention; keys of its "small_d"/"large_d" entries
or its top-level keys such as "invert" and "dkv_order").

1. Correctness (bf16, small shapes, dense and packed documents; ``bench_attention.py`` checks
   the defaults against the reference in full): every selection variant must pick the fp32
   reference's block sets (under its own score) up to near-ties, as ``bench_attention.py``
   judges the default (tiles, operands and key widths round the scores differently, which
   flips near-ties); variants that change only the merge or the stages must also equal the
   first such variant's indices bit for bit (same scores, same keys); ``ablate-`` variants
   are only reported. Each attention variant's
   o/dq/dk/dv must match the fp32 reference on the reference's indices (rel. err < 3e-2), and
   equal the first deterministic variant's bit for bit where only the list building, the
   launch order or the stages change.
2. Timings (median ms, ``triton.testing.do_bench``) per shape: SDPA full causal fwd and fwd+bwd
   (the baseline), the selection per selection variant, and per attention variant the forward,
   the dq pass, the selection inversion, the dk/dv pass and the whole backward. Ratios are
   against SDPA fwd+bwd of the same shape in the same run.

Usage: python tools/bench_kernel_variants.py [--shapes 4x8192,1x32768] [--heads 32/2/64]
           [--select VARIANTS] [--attn VARIANTS] [--json out.json]
VARIANTS: semicolon-separated ``name:key=value,key=value`` (values parsed as int, else str);
``default`` alone is the unchanged CONFIG; a selection variant named ``ablate-...`` may change
the indices (e.g. ``ablate-nomerge:topk=0`` times the scoring without the top-k merge); the key
``score`` ranks by another block score (``sub4:score=sub4``; checked against the reference's
selection under that score). Example:
  --select "default;r128w8:rows=128,warps=8" --attn "default;sort64:invert=sort64"
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from ssa_megatron.bench.attention import (_selection_agreement, gpu_header, median_ms,
                                          shape_grid, time_sdpa)
from ssa_megatron.ops import reference as ref
from ssa_megatron.ops.kernel_config import override_config

BS, KC = 16, 16
DTYPE = torch.bfloat16  # fp32 only for a CPU smoke run under TRITON_INTERPRET=1
# (B, T, HQ, H, D, cu_seqlens) for the correctness pass
CHECK_CASES = [(2, 1024, 32, 2, 64, None), (1, 1500, 32, 2, 64, [0, 100, 611, 1333, 1500]),
               (1, 1024, 32, 8, 128, None), (1, 700, 32, 4, 64, [0, 17, 700]),
               (1, 1024, 32, 2, 128, [0, 300, 1024])]
SELECT_DEFAULT = ("default;v3:merge=sort,sort_fast=4,stages=0;r32w2:rows=32,warps=2;"
                  "r32w4:rows=32;r64w2:warps=2;bn16:bn=16;ablate-nomerge:topk=0")
ATTN_DEFAULT = ("default;v3:invert=sort64,dkv_order=index,dq_warps=4,dkv_stages=2;"
                "sort32:invert=sort32;rows256:dkv_rows=256;dkvs4:dkv_stages=4")


def parse_variants(text: str):
    """``name:key=value,...;name2:...`` -> [(name, {key: value})]."""
    out = []
    for item in (x.strip() for x in text.split(";")):
        if not item:
            continue
        name, _, rest = item.partition(":")
        over = {}
        for kv in (x for x in rest.split(",") if x):
            key, _, val = kv.partition("=")
            if not _:
                raise SystemExit(f"variant {name!r}: {kv!r} is not key=value")
            over[key.strip()] = int(val) if val.strip().lstrip("-").isdigit() else val.strip()
        out.append((name.strip(), over))
    if not out or out[0][0] != "default" or out[0][1]:
        raise SystemExit("the first variant must be 'default' (no overrides): the others are "
                         "compared with it")
    return out


def variant_score(over) -> str:
    """The block score a selection variant ranks with (``score=sub4``: the same kernel on the
    sub-block means; every other key is a CONFIG override)."""
    score = over.get("score", "mean")
    try:
        ref.check_score(score)
    except ValueError as exc:
        raise SystemExit(str(exc))
    return score


def select_config(over):
    from ssa_megatron.ops import triton_selection as tsel
    over = {k: v for k, v in over.items() if k != "score"}
    unknown = set(over) - set(tsel.CONFIG) - {"topk"}
    if unknown:
        raise SystemExit(f"unknown selection setting(s) {sorted(unknown)}; "
                         f"known: {sorted(tsel.CONFIG)} and score")
    return override_config(tsel.CONFIG, **over)


def attn_config(over):
    """Overrides go to the top level (invert, dkv_order) or to both head-dim entries."""
    from ssa_megatron.ops import triton_sparse_attention as tsp
    routed = {}
    for key, val in over.items():
        if key in tsp.CONFIG and not isinstance(tsp.CONFIG[key], dict):
            routed[key] = val
        elif key in tsp.CONFIG["small_d"]:
            for entry in ("small_d", "large_d"):
                routed.setdefault(entry, {})[key] = val
        else:
            raise SystemExit(f"unknown attention setting {key!r}; known: "
                             f"{sorted(k for k in tsp.CONFIG if k not in ('small_d', 'large_d'))} "
                             f"and {sorted(tsp.CONFIG['small_d'])}")
    return override_config(tsp.CONFIG, **routed)


def _same_arithmetic(over):
    """Variants that only change how lists are built or launched: same sums, same bits
    (unless the lists come from the atomic counting sort)."""
    return set(over) <= {"invert", "dkv_order", "stages", "dkv_stages", "overlap_invert"}


def compiled_kernels():
    """{(kernel name, hash): compiled kernel} of every SSA Triton kernel compiled so far."""
    from ssa_megatron.ops import triton_selection as tsel
    from ssa_megatron.ops import triton_sparse_attention as tsp
    found = {}
    for mod in (tsel, tsp):
        for name, fn in vars(mod).items():
            caches = getattr(fn, "device_caches", None)
            if not name.endswith("_kernel") or caches is None:
                continue
            for entry in list(caches.values()):
                for ck in list(entry[0].values()):
                    found[(name.lstrip("_"), getattr(ck, "hash", id(ck)))] = ck
    return found


def resources(before):
    """Registers, spills and shared memory of the kernels compiled since ``before``: what
    bounds how many programs share an SM (the kernels are latency-bound gathers)."""
    out = {}
    for (name, khash), ck in compiled_kernels().items():
        if (name, khash) in before:
            continue
        if name in out:  # two builds of one kernel (e.g. dk/dv's EXTRAS launch): tell apart
            name = f"{name}#{str(khash)[:6]}"
        try:
            init = getattr(ck, "_init_handles", None)
            if init is not None:
                init()
            md = ck.metadata
            out[name] = {"regs": int(ck.n_regs), "spills": int(ck.n_spills),
                         "smem": int(md.shared), "warps": int(md.num_warps),
                         "stages": int(md.num_stages)}
        except Exception as exc:  # a Triton version without these fields: report, go on
            out[name] = {"error": str(exc)[:80]}
    return out


def dump_ir(folder):
    os.makedirs(folder, exist_ok=True)
    for (name, khash), ck in compiled_kernels().items():
        for kind in ("ttgir", "ptx"):
            text = getattr(ck, "asm", {}).get(kind)
            if text:
                with open(os.path.join(folder, f"{name}_{str(khash)[:10]}.{kind}"), "w") as fh:
                    fh.write(text)
    print(f"IR of {len(compiled_kernels())} compiled kernels written to {folder}", flush=True)


def check_variants(device, sel_variants, attn_variants):
    from ssa_megatron.ops import triton_selection as tsel
    from ssa_megatron.ops import triton_sparse_attention as tsp
    torch.manual_seed(0)
    ok, rows = True, []
    res = {}  # per variant: the kernels it compiled (none = the same as an earlier variant's)
    for b, t, hq, h, d, cu in CHECK_CASES:
        cs = torch.tensor(cu, device=device, dtype=torch.int32) if cu else None
        q, k, v = (torch.randn(b, t, n, d, device=device, dtype=DTYPE)
                   for n in (hq, h, h))
        do = torch.randn_like(q)
        row = {"shape": f"B{b} T{t} HQ{hq} H{h} D{d}" + (f" docs{len(cu) - 1}" if cu else "")}
        base = None
        for name, over in sel_variants:
            before = compiled_kernels()
            score = variant_score(over)
            same_arithmetic = set(over) <= {"merge", "sort_fast", "stages"}  # same scores, keys
            with select_config(over):  # every variant against the reference (fp32 scores)
                slot0, same, worst, _ = _selection_agreement(q, k, cs, score)
                if same_arithmetic:  # and bit for bit against the first such variant
                    idx = tsel.select_blocks(q, k, BS, KC, cs, score=score)
            res.setdefault(f"select[{name}]", {}).update(
                {f"{k} G{hq // h} D{d}": v for k, v in resources(before).items()})
            row[f"sel_{name}_ref_same"], row[f"sel_{name}_worst_tie"] = same, worst
            if name.startswith("ablate"):  # reported only: it may pick other blocks by design
                continue
            ok &= slot0 and (same == 1.0 or worst < 2e-2)
            if same_arithmetic:
                if base is None:
                    base = idx
                row[f"sel_{name}_same"] = same_bits = bool(torch.equal(idx, base))
                ok &= same_bits
        idx = ref.select_blocks(q, k, BS, KC, cs)
        leaves_r = [x.detach().float().requires_grad_() for x in (q, k, v)]
        o_r = ref.sparse_attention(*leaves_r, idx, BS, cs)
        g_r = [o_r] + list(torch.autograd.grad(o_r, leaves_r, do.float()))
        base = None  # the first deterministic variant with the default tiling
        for name, over in attn_variants:
            before = compiled_kernels()
            with attn_config(over):
                leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
                o = tsp.sparse_attention(*leaves, idx, BS, cs)
                got = [o] + list(torch.autograd.grad(o, leaves, do))
                exact = _same_arithmetic(over) and tsp.CONFIG["invert"] != "atomic"
            res.setdefault(f"attn[{name}]", {}).update(
                {f"{k} G{hq // h} D{d}": v for k, v in resources(before).items()})
            err = max(((a.float() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()
                      for a, r in zip(got, g_r))
            good = err < 3e-2 and not any(torch.isnan(x).any().item() for x in got)
            if exact and base is None:
                base = got
            elif exact:
                good &= all(torch.equal(a, c) for a, c in zip(got, base))
            row[f"attn_{name}"] = [float(f"{err:.2e}"), bool(good)]
            ok &= good
        rows.append(row)
        print("check", json.dumps(row), flush=True)
    print("resources ({} = the same kernels as an earlier variant):", flush=True)
    for name, kern in res.items():
        print(f"  {name}: " + ("; ".join(f"{k} {v}" for k, v in kern.items()) or "{}"), flush=True)
    return ok, rows, res


def pattern_indices(b, t, h, pattern, device):
    """Block indices [B, T, H, KC] of a fixed pattern (slot 0 = the current block): "window" =
    the current block and the 15 before it (neighbouring tokens select the same blocks, as in
    a trained model with local attention); "sinks" = blocks 0-3, the current block and the 11
    before it. Blocks before 0 or repeated are empty (-1)."""
    cur = torch.arange(t, device=device) // BS
    back = torch.arange(KC, device=device)
    if pattern == "window":
        idx = cur[:, None] - back[None, :]
    elif pattern == "sinks":
        sinks = torch.arange(4, device=device).expand(t, 4)
        idx = torch.cat([cur[:, None], sinks, cur[:, None] - 1 - back[None, :KC - 5]], 1)
        idx = torch.where((idx < cur[:, None]) | (back[None, :] == 0), idx, -1)
    else:
        raise SystemExit(f"--indices {pattern!r}: expected selected, window or sinks")
    idx = torch.where(idx >= 0, idx, -1)
    for j in range(1, KC):  # a block already in an earlier slot: empty
        dup = (idx[:, j:j + 1] == idx[:, :j]).any(1) & (idx[:, j] >= 0)
        idx[:, j] = torch.where(dup, -1, idx[:, j])
    return idx.to(torch.int32).view(1, t, 1, KC).expand(b, t, h, KC).contiguous()


def time_shape(b, t, hq, h, d, device, sel_variants, attn_variants, indices="selected"):
    from ssa_megatron.ops import triton_selection as tsel
    from ssa_megatron.ops import triton_sparse_attention as tsp
    torch.manual_seed(1)
    dt = DTYPE
    q = torch.randn(b, t, hq, d, device=device, dtype=dt, requires_grad=True)
    k = torch.randn(b, t, h, d, device=device, dtype=dt, requires_grad=True)
    v = torch.randn(b, t, h, d, device=device, dtype=dt, requires_grad=True)
    do = torch.randn(b, t, hq, d, device=device, dtype=dt)
    res = {"shape": f"B{b} T{t} HQ{hq} H{h} D{d}"}
    res.update(time_sdpa(q, k, v, do))  # the baseline
    for name, over in sel_variants:
        score = variant_score(over)
        with select_config(over):
            res[f"select[{name}]"] = median_ms(lambda: tsel.select_blocks(q.detach(), k.detach(), BS, KC,
                                                                          score=score))
    idx = tsel.select_blocks(q.detach(), k.detach(), BS, KC)
    if indices != "selected":
        idx = pattern_indices(b, t, h, indices, device)
        res["indices"] = indices
    from ssa_megatron.ops.triton_selection import doc_offsets
    offs = doc_offsets(b, t, None)
    scale = d ** -0.5
    for name, over in attn_variants:
        with attn_config(over):
            res[f"fwd[{name}]"] = median_ms(lambda: tsp.sparse_attention(q.detach(), k.detach(),
                                                                       v.detach(), idx, BS))
            o = tsp.sparse_attention(q, k, v, idx, BS)
            res[f"bwd[{name}]"] = median_ms(lambda: torch.autograd.grad(o, (q, k, v), do,
                                                                     retain_graph=True))
            # the backward's pieces on the same tensors
            n = b * t
            qf, kf, vf = (x.detach().reshape(n, -1, d) for x in (q, k, v))
            idf = idx.reshape(n, h, KC).contiguous()
            of = o.detach().reshape(n, hq, d)
            dof = do.reshape(n, hq, d)
            _, lse = tsp.forward(qf, kf, vf, idf, offs, BS, scale)
            res[f"dq[{name}]"] = median_ms(lambda: tsp.backward_dq(qf, kf, vf, idf, of, dof, lse,
                                                                offs, BS, scale))
            _, delta = tsp.backward_dq(qf, kf, vf, idf, of, dof, lse, offs, BS, scale)
            _, _, nb, tok_boff = tsp.key_blocks(offs, BS, device)
            res[f"invert[{name}]"] = median_ms(lambda: tsp.invert_selection(idf, tok_boff, nb))
            res[f"dkv[{name}]"] = median_ms(lambda: tsp.backward_dkv(qf, kf, vf, idf, dof, lse, delta,
                                                                  offs, BS, scale))
            del o
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shapes", default="4x8192,1x32768")
    ap.add_argument("--heads", default="32/2/64")
    ap.add_argument("--select", default=SELECT_DEFAULT)
    ap.add_argument("--attn", default=ATTN_DEFAULT)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--indices", default="selected", choices=("selected", "window", "sinks"),
                    help="blocks the timed attention variants use: 'selected' (the selection "
                         "kernel's, on random inputs), 'window' or 'sinks' (fixed patterns whose "
                         "neighbouring tokens share blocks, see pattern_indices)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--dump-ir", default=None, metavar="DIR",
                    help="at the end, write each compiled kernel's Triton GPU IR and PTX "
                         "to DIR (name_hash.ttgir / .ptx): where layout conversions and "
                         "barriers sit")
    args = ap.parse_args(argv)
    sel_variants = parse_variants(args.select)
    attn_variants = parse_variants(args.attn)
    out = gpu_header("bench_kernel_variants")
    if out is None:
        return 2
    dev = torch.device("cuda")
    name = out["gpu"]
    out.update(select_variants=dict(sel_variants), attn_variants=dict(attn_variants))
    if not args.skip_check:
        ok, rows, out["resources"] = check_variants(dev, sel_variants, attn_variants)
        out["check"] = rows
        out["check_ok"] = ok
        print(f"variants correct (bf16): {'PASS' if ok else 'FAIL'}", flush=True)
    out["timings"] = []
    for b, t, hq, h, d in shape_grid(args.shapes, args.heads):
        r = time_shape(b, t, hq, h, d, dev, sel_variants, attn_variants, args.indices)
        out["timings"].append(r)
        print("timing", json.dumps(r), flush=True)
        torch.cuda.empty_cache()
    if args.dump_ir:  # after the timings: every kernel they compiled too
        dump_ir(args.dump_ir)
    print(f"\n=== {name}: median ms; x = / SDPA fwd+bwd of the same shape, same run ===")
    for r in out["timings"]:
        base = r["sdpa_fwdbwd"]
        print(f"{r['shape']}: SDPA fwd {r['sdpa_fwd']:.3f} fwd+bwd {base:.3f}")
        for nm, _ in sel_variants:
            x = r[f"select[{nm}]"]
            print(f"  select {nm:14s} {x:7.3f}  ({x / base:.3f}x)")
        print(f"  {'attn variant':16s}" + "".join(f"{c:>9s}" for c in
                                                ("fwd", "bwd", "dq", "invert", "dkv", "fwd+bwd", "x")))
        for nm, _ in attn_variants:
            vals = [r[f"{c}[{nm}]"] for c in ("fwd", "bwd", "dq", "invert", "dkv")]
            tot = vals[0] + vals[1]
            print(f"  {nm:16s}" + "".join(f"{x:9.3f}" for x in vals) + f"{tot:9.3f}{tot / base:9.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0 if out.get("check_ok", True) else 1

