"""Triton SSA kernels vs the reference, on the CPU under TRITON_INTERPRET=1 (fp32).

The interpreter flag must be set before Triton compiles anything, and other tests in the same
pytest process import torch (and maybe triton) first, so the kernel checks run in a fresh
subprocess: this file re-executes itself with ``TRITON_INTERPRET=1`` and one group of cases,
and the child prints one JSON line per case.

Checks: selection indices equal the reference's as sets (where they differ, the differing
blocks' reference scores lie within 1e-5 of the reference's K-th score: genuine near-ties),
slot 0 is the current block and empty slots agree; sparse attention output and dq/dk/dv equal
the reference's on the same indices; the dispatch layer with the Triton backend forced.
Selection alone under every pass-2 merge strategy (``triton_selection.CONFIG["merge"]``), in one run: the same
checks, and the "sort" and "extract" merges' indices bit-identical to the "insert" merge's.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
from interpreter_utils import InterpretedGroups, needs_triton

from ssa_megatron.ops.kernel_config import override_config

BS = 16

# (B, T, HQ, H, D, block_counts, block_size, cu_seqlens)
GROUPS = {
    "g16": [(1, 96, 32, 2, 16, 4, BS, None),
            (1, 90, 16, 1, 16, 3, BS, [0, 37, 90])],
    "g8": [(2, 64, 16, 2, 16, 3, BS, None),
           (1, 96, 8, 1, 16, 16, BS, [0, 16, 50, 96])],
    "g4": [(2, 80, 8, 2, 16, 4, BS, None),
           (1, 96, 4, 1, 32, 2, 32, [0, 70, 96])],
    "g2": [(1, 96, 4, 2, 16, 5, BS, None),
           (1, 64, 2, 1, 16, 2, BS, [0, 33, 64])],
    "g1": [(1, 90, 2, 2, 16, 16, BS, [0, 20, 57, 90]),
           (2, 48, 1, 1, 16, 1, BS, None)],
    "g3": [(1, 72, 6, 2, 16, 3, BS, [0, 40, 72])],
}

# Selection only, run once per merge strategy: (B, T, HQ, H, D, block_counts, block_size,
# cu_seqlens, CONFIG overrides). Narrow chunks (bn 4 / 8: interpreter only, too narrow for
# tl.dot on a GPU) and few rows give several chunks per tile at small T, so whole chunks are
# skipped; short documents leave empty slots; K 24 with bn 16 pads the chunk to the 32-wide
# list; sort_fast picks the sort merge's branches (0: always the full chunk sort, 15: always the
# K-1 best keys, else whichever the chunk needs) and the extract merge's (a chunk sort only
# when more than sort_fast keys enter; 99: never). The interpreter runs tl.sort slowly: keep
# these small.
SELECT_CASES = [
    (1, 112, 16, 1, 16, 4, BS, [0, 16, 112], {"sort_fast": 0}),  # G16, BN = 8 KB
    (1, 224, 4, 1, 16, 8, BS, None, {"bn": 16, "sort_fast": 2}),  # G4, BN = 2 KB
    (1, 280, 2, 1, 16, 16, BS, [0, 24, 280], {"bn": 16, "sort_fast": 0}),  # G2, BN = KB
    (1, 112, 2, 2, 16, 16, BS, None, {"bn": 16, "sort_fast": 15}),  # G1, < K blocks
    (1, 112, 2, 1, 16, 3, BS, None, {"bn": 4, "rows": 4, "sort_fast": 1}),  # G2, skips
    (1, 160, 1, 1, 16, 2, BS, None, {"bn": 8, "rows": 4}),  # G1, K 2: one-key list, skips
    (1, 70, 2, 2, 16, 1, BS, [0, 33, 70], {}),  # K 1: current block only
    (1, 120, 4, 1, 16, 24, BS, [0, 20, 120], {"bn": 16}),  # K 24 > blocks, list wider than BN
    (1, 224, 4, 1, 16, 8, BS, None, {"bn": 8, "sort_fast": 99}),  # "extract": never a chunk sort
    # unmasked pass-1 chunks below the tile's smallest block count, masked tail, G 16 / G 8
    (1, 200, 32, 2, 16, 6, BS, [0, 90, 200], {"bn": 4}),
    (2, 100, 8, 1, 16, 4, BS, None, {"bn": 2, "rows": 16}),
    (1, 176, 6, 2, 16, 3, BS, None, {"bn": 4}),  # G 3: a padding head row in every group
    # pass 1 stepping wider / narrower than pass 2 ("bn_stats")
    (1, 200, 16, 1, 16, 5, BS, [0, 90, 200], {"bn": 4, "bn_stats": 8}),
    (1, 144, 4, 1, 16, 4, BS, None, {"bn": 8, "bn_stats": 2, "rows": 16}),
    # int32 merge keys: G 16 packed, G 4 with a list wider than the chunk, G 1 with < K blocks
    (1, 200, 32, 2, 16, 6, BS, [0, 90, 200], {"bn": 4, "keys": "int32"}),
    (1, 120, 4, 1, 16, 24, BS, [0, 20, 120], {"bn": 16, "keys": "int32"}),
    (1, 112, 2, 2, 16, 16, BS, None, {"bn": 16, "sort_fast": 15, "keys": "int32"}),
    # tiles of more tokens than a block ("tokens_max"): 64 tokens over 4 blocks, packed
    (1, 230, 2, 2, 16, 5, BS, [0, 70, 230], {"bn": 8, "tokens_max": 64}),
    (1, 200, 8, 2, 16, 4, BS, None, {"rows": 128, "tokens_max": 32, "keys": "int32"}),
    # int32 keys with the index bits of a 32k-token sequence: scores keep 12 significant bits
    (1, 160, 16, 2, 16, 5, BS, [0, 70, 160], {"bn": 8, "keys": "int32", "key_index_bits": 11}),
]
MERGES = ("insert", "sort", "extract")  # insert first: the others are compared with it

# Backward list building: (B, T, HQ, H, D, block_counts, cu_seqlens); several documents make
# lists of very different lengths (the launch order matters), K 1 leaves only the current block.
INVERT_CASES = [(2, 96, 32, 2, 16, 4, None), (1, 130, 8, 2, 16, 5, [0, 37, 100, 130]),
                (1, 64, 2, 1, 16, 1, None)]


# Selection under the moment2 score (the kernel at head dim 2 D): (B, T, HQ, H, D, block_counts,
# block_size, cu_seqlens)
MOMENT2_CASES = [(1, 96, 16, 1, 16, 4, BS, [0, 37, 96]), (2, 80, 8, 2, 32, 3, BS, None),
                 (1, 90, 2, 2, 16, 5, BS, [0, 20, 90])]


# Selection under the subN scores (NSUB sub-block means per block; pass 2 sums their
# probabilities), and fp16 scoring operands under either score: (B, T, HQ, H, D, block_counts,
# block_size, cu_seqlens, score, CONFIG overrides); G 1-16, D up to 128, packed documents, odd
# block counts, pass-2 steps of one and several blocks
SUBN_CASES = [(1, 96, 16, 1, 16, 4, BS, [0, 37, 96], "sub4", {}),
              (2, 80, 8, 2, 32, 3, BS, None, "sub2", {}),
              (1, 90, 2, 2, 16, 5, BS, [0, 20, 90], "sub4", {"bn": 8}),
              (1, 120, 4, 4, 64, 6, BS, [0, 51, 120], "sub2", {"bn": 64, "bn_stats": 8}),
              (1, 72, 8, 1, 128, 3, BS, None, "sub4", {}),
              (1, 112, 2, 1, 16, 7, BS, [0, 112], "sub4", {"merge": "insert"}),
              # fp16 scoring operands (CONFIG["operands"]) and wider pass-2 steps ("bn_sub")
              (1, 120, 4, 4, 64, 6, BS, [0, 51, 120], "sub4", {"operands": "fp16", "bn_sub": 64}),
              (1, 96, 16, 1, 128, 5, BS, [0, 37, 96], "sub4", {"operands": "fp16"}),
              (2, 80, 8, 2, 64, 3, BS, None, "sub2", {"operands": "fp16", "bn_sub": 32}),
              (1, 100, 8, 2, 128, 4, BS, [0, 60, 100], "mean", {"operands": "fp16"}),
              (1, 90, 16, 16, 64, 3, BS, None, "mean", {"operands": "fp16", "bn": 16}),
              # fp16 with int64 keys (what "auto" keys give documents past 4096 blocks)
              (1, 110, 8, 2, 64, 4, BS, [0, 45, 110], "sub4", {"operands": "fp16", "keys": "int64"})]


# the interpreter group each test reads (test_kernels_match_reference: its parameter)
GROUP_OF_TEST = {"test_selection_merge_strategies": "select",
                 "test_moment2_selection_matches_reference": "moment2",
                 "test_sub_block_selection_matches_reference": "subn",
                 "test_backward_list_building_and_launch_order": "invert",
                 "test_kernel_variant_sweep_checks": "variants",
                 "test_tma_forward_and_dq_match_reference": "tma",
                 "test_byte_floor_kernels_read_what_they_count": "floor"}


def _group_of(test_name: str):
    base, _, param = test_name.partition("[")
    if base == "test_kernels_match_reference":
        return param.rstrip("]")
    return GROUP_OF_TEST.get(base)


INTERPRETED = InterpretedGroups(__file__, _group_of, first=("tma", "select", "variants", "invert"))
interpreted = INTERPRETED.fixture()


@needs_triton
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_kernels_match_reference(group, interpreted):
    for row in interpreted.rows(group):
        assert row["ok"], row


@needs_triton
def test_selection_merge_strategies(interpreted):
    rows = interpreted.rows("select")
    assert sorted((r["merge"], r["index"]) for r in rows) == sorted(
        (m, i) for m in MERGES for i in range(len(SELECT_CASES)))
    for row in rows:
        assert row["ok"], row


@needs_triton
def test_moment2_selection_matches_reference(interpreted):
    rows = interpreted.rows("moment2")
    assert len(rows) == len(MOMENT2_CASES)
    for row in rows:
        assert row["ok"], row


@needs_triton
def test_sub_block_selection_matches_reference(interpreted):
    rows = interpreted.rows("subn")
    assert len(rows) == len(SUBN_CASES)
    for row in rows:
        assert row["ok"], row


@needs_triton
def test_backward_list_building_and_launch_order(interpreted):
    """Every way of inverting the selection (CONFIG["invert"]) gives the same key lists, and
    every list method, dk/dv launch order and list split the same gradients (see
    ``_check_invert``)."""
    rows = interpreted.rows("invert")
    assert len(rows) == len(INVERT_CASES) + 1
    for row in rows:
        assert row["ok"], row


@needs_triton
def test_kernel_variant_sweep_checks(interpreted):
    """The kernel-variant sweep's (tools/bench_kernel_variants.py) correctness pass on the CPU interpreter (fp32): it passes
    for real variants and fails for one that changes the selection without saying so."""
    rows = interpreted.rows("variants")
    assert [r["name"] for r in rows] == ["good", "bad"]
    assert rows[0]["ok"] is True, rows[0]
    assert rows[0]["rows"][0]["sel_s4_ref_same"] == 1.0  # a score variant: against its reference
    assert rows[0]["rows"][0]["sel_f16_ref_same"] == 1.0  # other score arithmetic: likewise
    assert rows[0]["rows"][0]["sel_s4f_ref_same"] == 1.0
    assert rows[0]["rows"][0]["sel_k32_ref_same"] == 1.0  # truncated merge keys: likewise
    assert rows[0]["rows"][0]["sel_v3_same"] is True  # another merge: the same bits
    assert rows[0]["rows"][0]["sel_ablate-nomerge_ref_same"] < 1.0  # other blocks, only reported
    assert rows[1]["ok"] is False, rows[1]


@needs_triton
def test_tma_forward_and_dq_match_reference(interpreted):
    """Forward and dq for G >= 16 four ways (gathers; TMA with one, two or four blocks per
    step): o, dq, dk, dv equal the reference's on packed documents, block counts that leave a
    partial step, G 16 / 32 and D 16 / 32 / 128; G 8 keeps the gathers. Then hand-made
    indices with holes and empty documents, a NaN in the next document, and what ``tma_ok``
    refuses (see ``_check_tma_edges``)."""
    rows = interpreted.rows("tma")
    assert set(TMA_PLAN) == {"gather", *TMA_MODES} and all(TMA_PLAN.values())
    from ssa_megatron.ops.triton_sparse_attention import CONFIG
    default = {k: CONFIG["small_d"][k] for k in ("tma_step", "tma_pair")}
    assert TMA_PLAN[next(m for m, e in TMA_MODES.items() if e == default)] == tuple(range(len(TMA_CASES)))
    assert {TMA_CASES[i][5] for i in TMA_PLAN["tma_4"]} >= {3, 5}  # partial four-block steps
    assert len(rows) == sum(map(len, TMA_PLAN.values())) + 4
    for row in rows:
        assert row["ok"], row


@needs_triton
def test_byte_floor_kernels_read_what_they_count(interpreted):
    """The byte-floor tool (tools/bench_byte_floor.py): the loads-only, loads+MMA and L2-read kernels read exactly
    the rows the sparse kernels gather (packed documents, G 4 with several tokens per tile,
    G 16), and its byte count agrees with a brute-force count."""
    rows = interpreted.rows("floor")
    assert [r["case"] for r in rows] == ["T100 HQ8 H2 D16", "T64 HQ32 H2 D32", "l2_read"]
    for row in rows:
        assert row["ok"], row


def test_kernel_variant_parsing():
    from ssa_megatron.bench import kernel_variants as bkv
    got = bkv.parse_variants("default; a:rows=128,merge=extract ;b:stages=-1")
    assert got == [("default", {}), ("a", {"rows": 128, "merge": "extract"}), ("b", {"stages": -1})]
    for bad in ("a:rows=1", "default:rows=2", "default;a:rows"):
        with pytest.raises(SystemExit):
            bkv.parse_variants(bad)
    with pytest.raises(SystemExit, match="unknown attention setting"):
        with bkv.attn_config({"no_such_key": 1}):
            pass


def test_override_config_restores_the_settings_exactly():
    """Nested entries are updated, not replaced; after the block (an error included) the dict
    and its nested entries hold their old values again, keys added inside are gone."""
    config = {"merge": "extract", "small_d": {"tma": 0, "warps": 4}, "large_d": {"tma": 0}}
    small = config["small_d"]
    with pytest.raises(RuntimeError):
        with override_config(config, merge="sort", small_d={"tma": 1}) as live:
            assert live is config and config["small_d"] == {"tma": 1, "warps": 4}
            config["large_d"]["tma"] = 2
            config["extra"] = 1
            raise RuntimeError
    assert config == {"merge": "extract", "small_d": {"tma": 0, "warps": 4}, "large_d": {"tma": 0}}
    assert config["small_d"] is small


def test_kernel_variant_index_patterns():
    """The fixed block patterns of bench_kernel_variants --indices: slot 0 the current block,
    the rest complete past blocks or empty, none twice."""
    import torch
    from ssa_megatron.bench import kernel_variants as bkv
    for pattern, want_40 in (("window", [2, 1, 0]), ("sinks", [2, 0, 1])):
        idx = bkv.pattern_indices(2, 300, 3, pattern, torch.device("cpu"))
        assert idx.shape == (2, 300, 3, bkv.KC) and idx.dtype == torch.int32
        cur = torch.arange(300) // bkv.BS
        assert torch.equal(idx[0, :, 0, 0], cur.int())
        rest = idx[0, :, 0, 1:]
        assert bool(((rest == -1) | ((rest >= 0) & (rest < cur[:, None]))).all())
        for row in idx[0, :, 0].tolist():
            kept = [x for x in row if x >= 0]
            assert len(kept) == len(set(kept))
        assert [x for x in idx[1, 40, 2].tolist() if x >= 0] == want_40
    assert (bkv.pattern_indices(1, 300, 1, "window", torch.device("cpu"))[0, 299, 0] >= 0).all()
    assert (bkv.pattern_indices(1, 300, 1, "sinks", torch.device("cpu"))[0, 299, 0] >= 0).all()
    with pytest.raises(SystemExit, match="--indices"):
        bkv.pattern_indices(1, 16, 1, "nope", torch.device("cpu"))


def test_dispatch_backend_switch(monkeypatch):
    """Backend choice without touching Triton: CPU tensors go to the reference."""
    import torch
    from ssa_megatron.ops import dispatch, reference

    q = torch.randn(1, 40, 4, 16)
    k = torch.randn(1, 40, 2, 16)
    v = torch.randn(1, 40, 2, 16)
    monkeypatch.delenv("SSA_ATTENTION_BACKEND", raising=False)
    assert dispatch.get_backend() == "auto"
    assert not dispatch.use_triton(q)
    idx = dispatch.select_blocks(q, k, BS, 3)
    assert torch.equal(idx, reference.select_blocks(q, k, BS, 3))
    torch.testing.assert_close(dispatch.sparse_attention(q, k, v, idx, BS),
                               reference.sparse_attention(q, k, v, idx, BS))
    torch.testing.assert_close(dispatch.full_attention(q, k, v), reference.full_attention(q, k, v))
    monkeypatch.setenv("SSA_ATTENTION_BACKEND", "triton")
    assert dispatch.get_backend() == "triton" and dispatch.use_triton(q)
    with dispatch.attention_backend("reference"):
        assert dispatch.get_backend() == "reference" and not dispatch.use_triton(q)
        with dispatch.attention_backend("auto"):
            assert dispatch.get_backend() == "triton"
        with pytest.raises(KeyError), dispatch.attention_backend("triton"):
            raise KeyError("an error inside the block")
        assert dispatch.get_backend() == "reference"  # the outer choice is back
    assert dispatch.get_backend() == "triton"
    monkeypatch.setenv("SSA_ATTENTION_BACKEND", "bogus")
    with pytest.raises(ValueError):
        dispatch.get_backend()
    with pytest.raises(ValueError), dispatch.attention_backend("cuda"):
        pass


# ------------------------------------------------------------------------------------------
# Child process: TRITON_INTERPRET=1 is set before anything imports triton.
# ------------------------------------------------------------------------------------------

def _tie_tolerance(over) -> float:
    """Relative near-tie bound for kernel settings that round the scores below fp32: fp16
    operands (11 significant bits each) and int32 merge keys (scores truncated to >= 11 bits)."""
    rel = 0.0
    if over.get("operands") == "fp16":
        rel = max(rel, 2e-3)
    if over.get("keys") == "int32":
        rel = max(rel, 1e-3)
    return rel


def _selection_ok(it, ir, q, k, t, cs, b, bs, score="mean", rel=0.0):
    """Kernel indices ``it`` vs the reference's ``ir``: (ok, fraction of exact rows, worst tie).
    A block in one set only must score within 1e-5 of the K-th, or within ``rel`` of it
    relatively (settings that round the scores, see ``_tie_tolerance``)."""
    import torch
    from ssa_megatron.ops import reference as ref

    ok = it.dtype == torch.int32 and it.shape == ir.shape
    ok &= bool(torch.equal(it[..., 0], ir[..., 0]))
    ok &= bool(torch.equal((it >= 0).sum(-1), (ir >= 0).sum(-1)))
    same = (torch.sort(it, -1).values == torch.sort(ir, -1).values).all(-1)
    worst = 0.0
    segs = ref.segments(t, cs, b)
    for bi, ti, hi in (~same).nonzero().tolist():
        a0 = [a for a, e in segs if a <= ti < e][0]
        sc = ref.chunk_scores(q[bi:bi + 1, ti:ti + 1], k[bi:bi + 1, a0:ti + 1], ti - a0, bs,
                              None, score)[0, 0, hi]
        sel_r = ir[bi, ti, hi][ir[bi, ti, hi] >= 0].long()
        kth = sc[sel_r].min().item()
        diff = (set(it[bi, ti, hi].tolist()) ^ set(ir[bi, ti, hi].tolist())) - {-1}
        gap = max(abs(sc[j].item() - kth) for j in diff)
        ok &= gap <= 1e-5 or gap <= rel * abs(kth)
        worst = max(worst, gap)
    return bool(ok), float(same.float().mean()), worst


def _check_select(case, seed):
    """Selection alone under each CONFIG["merge"] (CONFIG restored afterwards): one row per
    merge. The insert merge runs first; the others must equal its indices bit for bit."""
    import torch
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_selection as tsel

    b, t, hq, h, d, kc, bs, cu, over = case
    torch.manual_seed(seed)
    cs = torch.tensor(cu, dtype=torch.int32) if cu else None
    q = torch.randn(b, t, hq, d) * 1.5
    k = torch.randn(b, t, h, d) * 1.5
    ir = ref.select_blocks(q, k, bs, kc, cs)
    rows, insert = [], None
    for merge in MERGES:  # "insert" first
        with override_config(tsel.CONFIG, **over, merge=merge):
            it = tsel.select_blocks(q, k, bs, kc, cs)
        insert = it if insert is None else insert
        same_insert = bool(torch.equal(it, insert))  # order included
        ok, exact, worst = _selection_ok(it, ir, q, k, t, cs, b, bs, rel=_tie_tolerance(over))
        rows.append({"case": list(case[:7]) + [cu, over], "merge": merge, "sel_exact": exact,
                     "sel_worst_tie": worst, "same_as_insert": same_insert, "ok": ok and same_insert})
    return rows


def _check_moment2(case, seed):
    """The kernel under score="moment2" against the reference's moment2 selection; the same
    inputs must select otherwise under the mean score (the score reaches the kernel)."""
    import torch
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_selection as tsel

    b, t, hq, h, d, kc, bs, cu = case
    torch.manual_seed(seed)
    cs = torch.tensor(cu, dtype=torch.int32) if cu else None
    q = torch.randn(b, t, hq, d)
    k = torch.randn(b, t, h, d) * torch.rand(1, t, h, d) * 2  # channels of unequal spread
    it = tsel.select_blocks(q, k, bs, kc, cs, score="moment2")
    ir = ref.select_blocks(q, k, bs, kc, cs, score="moment2")
    ok, exact, worst = _selection_ok(it, ir, q, k, t, cs, b, bs, "moment2")
    differs = not torch.equal(ir, ref.select_blocks(q, k, bs, kc, cs))
    return {"case": list(case[:7]) + [cu], "sel_exact": exact, "sel_worst_tie": worst,
            "differs_from_mean": differs, "ok": ok and differs}


def _check_subn(case, seed):
    """The kernel under a subN score against the reference's subN selection; the same inputs
    must select otherwise under the mean score (the sub-block means reach the kernel)."""
    import torch
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_selection as tsel

    b, t, hq, h, d, kc, bs, cu, score, over = case
    torch.manual_seed(seed)
    cs = torch.tensor(cu, dtype=torch.int32) if cu else None
    q = torch.randn(b, t, hq, d) * 1.5
    k = torch.randn(b, t, h, d) * 1.5
    with override_config(tsel.CONFIG, **over):
        it = tsel.select_blocks(q, k, bs, kc, cs, score=score)
    ir = ref.select_blocks(q, k, bs, kc, cs, score=score)
    ok, exact, worst = _selection_ok(it, ir, q, k, t, cs, b, bs, score, rel=_tie_tolerance(over))
    # the sub-block means reach the kernel (the fp16 mean-score cases have nothing to differ from)
    differs = score == "mean" or not torch.equal(ir, ref.select_blocks(q, k, bs, kc, cs))
    return {"case": list(case[:7]) + [cu, score, over], "sel_exact": exact,
            "sel_worst_tie": worst, "differs_from_mean": differs, "ok": ok and differs}


def _sparse_attention_errors(q, k, v, do, idx, cs, bs=BS):
    """Largest absolute differences of o, dq, dk, dv: the Triton kernels (as CONFIG stands)
    against the reference, on the same indices."""
    import torch
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_sparse_attention as tsp

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    leaves_r = [x.clone().requires_grad_() for x in (q, k, v)]
    ot = tsp.sparse_attention(*leaves, idx, bs, cs)
    gt = torch.autograd.grad(ot, leaves, do)
    orf = ref.sparse_attention(*leaves_r, idx, bs, cs)
    gr = torch.autograd.grad(orf, leaves_r, do)
    return [(ot - orf).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(gt, gr)]


def _check_case(case, seed):
    import torch
    from ssa_megatron.ops import dispatch, reference as ref
    from ssa_megatron.ops import triton_selection as tsel
    from ssa_megatron.ops import triton_sparse_attention as tsp

    b, t, hq, h, d, kc, bs, cu = case
    torch.manual_seed(seed)
    cs = torch.tensor(cu, dtype=torch.int32) if cu else None
    q = torch.randn(b, t, hq, d) * 1.5
    k = torch.randn(b, t, h, d) * 1.5
    v = torch.randn(b, t, h, d)
    out = {"case": list(case[:7]) + [cu]}

    # ---- selection
    it = tsel.select_blocks(q, k, bs, kc, cs)
    ir = ref.select_blocks(q, k, bs, kc, cs)
    sel_ok, exact, worst = _selection_ok(it, ir, q, k, t, cs, b, bs)
    out.update(sel_exact=exact, sel_worst_tie=worst)

    # ---- sparse attention on the reference's indices: output and gradients
    do = torch.randn(b, t, hq, d)
    errs = _sparse_attention_errors(q, k, v, do, ir, cs, bs)
    att_ok = max(errs) < 1e-4
    out["err_o_dq_dk_dv"] = [float(f"{e:.2e}") for e in errs]

    # ---- dispatch with the Triton backend forced (kernel indices, fused alignment loss)
    with dispatch.attention_backend("triton"):
        idx = dispatch.select_blocks(q, k, bs, kc, cs)
        o1 = dispatch.sparse_attention(q, k, v, idx, bs, cs)
        o2 = ref.sparse_attention(q, k, v, idx, bs, cs)
        full = dispatch.full_attention(q, k, v, cs)
        full_r = ref.full_attention(q, k, v, cs)
        of = full.clone().requires_grad_()
        osp = o1.clone().requires_grad_()
        la = dispatch.alignment_loss(of, osp)
        ga = torch.autograd.grad(la, (of, osp))
        of2 = full.clone().requires_grad_()
        osp2 = o1.clone().requires_grad_()
        lr = ref.alignment_loss(of2, osp2)
        gr2 = torch.autograd.grad(lr, (of2, osp2))
    disp_errs = [(o1 - o2).abs().max().item(), (full - full_r).abs().max().item(),
                 abs(la.item() - lr.item())] + [(x - y).abs().max().item() for x, y in zip(ga, gr2)]
    disp_ok = max(disp_errs) < 1e-4
    out["dispatch_errs"] = [float(f"{e:.2e}") for e in disp_errs]
    out["ok"] = bool(sel_ok and att_ok and disp_ok)
    return out


def _check_invert(case, seed):
    import torch
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_sparse_attention as tsp
    from ssa_megatron.ops.triton_selection import doc_offsets

    b, t, hq, h, d, kc, cu = case
    torch.manual_seed(seed)
    cs = torch.tensor(cu, dtype=torch.int32) if cu else None
    q, k, v, do = (torch.randn(b, t, n, d) for n in (hq, h, h, hq))
    idx = ref.select_blocks(q, k, BS, kc, cs)
    offs = doc_offsets(b, t, cs)
    _, _, nb, tok_boff = tsp.key_blocks(offs, BS, q.device)
    flat = idx.reshape(b * t, h, kc).to(torch.int32).contiguous()
    lists = {m: tsp.invert_selection(flat, tok_boff, nb, m) for m in ("sort64", "sort32", "atomic")}
    off, toks = lists["sort64"]
    ok = all(torch.equal(off, o) for o, _ in lists.values())
    used = int(off[-1])
    ok &= used == int((idx >= 0).sum())
    ok &= torch.equal(toks[:used], lists["sort32"][1][:used])  # both: ascending tokens
    for j in range(h * nb):  # the counting sort: same tokens per list, any order
        a, e = int(off[j]), int(off[j + 1])
        ok &= torch.equal(torch.sort(lists["atomic"][1][a:e]).values, toks[a:e])
    # every list method and launch order: the reference's gradients. The forward and dq do
    # not depend on them: run once; then the dk/dv pass alone per setting.
    leaves_r = [x.clone().requires_grad_() for x in (q, k, v)]
    g_r = torch.autograd.grad(ref.sparse_attention(*leaves_r, idx, BS, cs), leaves_r, do)
    n, scale = b * t, d ** -0.5
    qf, kf, vf, dof = (x.reshape(n, -1, d).contiguous() for x in (q, k, v, do))
    o, lse = tsp.forward(qf, kf, vf, flat, offs, BS, scale)
    dq, delta = tsp.backward_dq(qf, kf, vf, flat, o, dof, lse, offs, BS, scale)
    errs = {"dq": (dq.view_as(q) - g_r[0]).abs().max().item()}
    with override_config(tsp.CONFIG):
        # split: lists cut into segments of that many entries (partials added in order)
        grads = {}
        for inv, order, split in (("sort64", "index", 0), ("sort32", "longest", 0),
                                  ("atomic", "longest", 0), ("sort32", "longest", 4),
                                  ("sort32", "index", 4), ("atomic", "index", 7)):
            tsp.CONFIG.update(invert=inv, dkv_order=order, dkv_split=split)
            g = tsp.backward_dkv(qf, kf, vf, flat, dof, lse, delta, offs, BS, scale)
            grads[(inv, order, split)] = g
            errs[f"{inv}/{order}/split{split}"] = max((x.view_as(y) - y).abs().max().item()
                                                      for x, y in zip(g, g_r[1:]))
        # split partials are added in segment order whatever the launch order: same bits
        ok &= all(torch.equal(a, b_) for a, b_ in zip(grads[("sort32", "longest", 4)],
                                                      grads[("sort32", "index", 4)]))
        tsp.CONFIG.update(dkv_split=-1)
        try:
            tsp.backward_dkv(qf, kf, vf, flat, dof, lse, delta, offs, BS, scale)
            ok = False
        except ValueError as exc:
            ok &= "dkv_split" in str(exc)
    ok &= max(errs.values()) < 1e-4
    return {"case": list(case), "lists_ok": bool(ok), "grad_err": errs, "ok": bool(ok)}


def _check_invert_fallbacks():
    """sort32 falls back to sort64 when its keys would overflow; atomic to sort32 when torch
    asks for deterministic algorithms."""
    import torch
    from ssa_megatron.ops import triton_sparse_attention as tsp

    idx = torch.tensor([[[0, -1]], [[0, 1]], [[1, 0]]], dtype=torch.int32)  # [N 3, H 1, K 2]
    boff = torch.zeros(3, dtype=torch.int32)
    calls = []
    real32, realat, limit = tsp.invert_sort32, tsp.invert_atomic, tsp.SORT32_MAX_KEY
    tsp.invert_sort32 = lambda *a: calls.append("sort32") or real32(*a)
    tsp.invert_atomic = lambda *a: calls.append("atomic") or realat(*a)
    try:
        tsp.SORT32_MAX_KEY = 5  # h * nb * n = 6 keys: too many for "int32" here
        off, toks = tsp.invert_selection(idx, boff, 2, "sort32")
        ok = calls == [] and off.tolist() == [0, 3, 5] and toks[:5].tolist() == [0, 1, 2, 1, 2]
        tsp.SORT32_MAX_KEY = limit
        torch.use_deterministic_algorithms(True)
        tsp.invert_selection(idx, boff, 2, "atomic")
        ok &= calls == ["sort32"]
        torch.use_deterministic_algorithms(False)
        tsp.invert_selection(idx, boff, 2, "atomic")
        ok &= calls == ["sort32", "atomic"]
    finally:
        tsp.invert_sort32, tsp.invert_atomic, tsp.SORT32_MAX_KEY = real32, realat, limit
        torch.use_deterministic_algorithms(False)
    return {"case": "fallbacks", "calls": calls, "ok": bool(ok)}


def _check_variant_tool():
    """bench_kernel_variants' correctness pass, fp32 on the interpreter, tiny shapes."""
    import torch
    from ssa_megatron.bench import kernel_variants as bkv

    bkv.DTYPE = torch.float32
    bkv.CHECK_CASES = [(1, 100, 8, 2, 16, [0, 37, 100])]
    attn = bkv.parse_variants("default;sort32:invert=sort32;index:dkv_order=index,invert=sort32")
    for name, sel in (("good", "default;v3:merge=sort,sort_fast=4;s4:score=sub4;"
                               "f16:operands=fp16;s4f:score=sub4,operands=fp16,bn_sub=64;k32:keys=int32;"
                               "ablate-nomerge:topk=0"),
                      ("bad", "default;nomerge:topk=0")):
        ok, rows, _ = bkv.check_variants(torch.device("cpu"), bkv.parse_variants(sel),
                                      attn if name == "good" else attn[:1])
        print(json.dumps({"name": name, "ok": bool(ok), "rows": rows}), flush=True)


# (B, T, HQ, H, D, block_counts, cu_seqlens) for the TMA forward / dq (G >= 16, powers of two)
TMA_CASES = [(1, 80, 32, 2, 16, 4, None), (1, 90, 16, 1, 16, 3, [0, 37, 90]),
             (1, 80, 32, 1, 32, 5, [0, 50, 80]), (1, 40, 16, 1, 128, 3, [0, 23, 40])]
# blocks per loop step and the forward's shared-max pairs (K 3 and 5 leave a partial step)
TMA_MODES = {"tma": {"tma_step": 1, "tma_pair": 0}, "tma_pair": {"tma_step": 2, "tma_pair": 1},
             "tma_4": {"tma_step": 4, "tma_pair": 1}}
# which TMA_CASES each way runs (the interpreter is slow): the gathers and the default (two
# blocks per step, pairs) see every case; one block per step G 32 packed and D 128; four per
# step the two partial steps (K 3 and 5)
TMA_PLAN = {"gather": (0, 1, 2, 3), "tma": (2, 3), "tma_pair": (0, 1, 2, 3), "tma_4": (1, 2)}


def _check_tma(case, mode, seed):
    """Forward and dq with CONFIG tma off ("gather": the per-thread gathers) or on with the
    TMA_MODES step settings: o, dq, dk, dv equal the reference's; the TMA path is taken exactly
    when switched on, and never for G 8."""
    import torch
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_sparse_attention as tsp

    b, t, hq, h, d, kc, cu = case
    torch.manual_seed(seed)
    cs = torch.tensor(cu, dtype=torch.int32) if cu else None
    q = torch.randn(b, t, hq, d) * 1.5
    k = torch.randn(b, t, h, d) * 1.5
    v = torch.randn(b, t, h, d)
    do = torch.randn(b, t, hq, d)
    idx = ref.select_blocks(q, k, BS, kc, cs)
    entry = dict(tma=int(mode != "gather"), **TMA_MODES.get(mode, {}))
    with override_config(tsp.CONFIG, small_d=entry, large_d=entry):
        errs = _sparse_attention_errors(q, k, v, do, idx, cs)
        used = tsp.tma_launch(idx.reshape(b * t, h, kc), tsp.doc_offsets(b, t, cs), BS,
                              q.reshape(b * t, hq, d), k.reshape(b * t, h, d))
        g8 = tsp.tma_launch(torch.zeros(t, 1, kc, dtype=torch.int32), (0, t), BS,
                            torch.zeros(t, 8, d), torch.zeros(t, 1, d))
    ok = max(errs) < 1e-4 and (used is not None) == (mode != "gather") and g8 is None
    return {"case": list(case), "mode": mode, "err_o_dq_dk_dv": [float(f"{e:.2e}") for e in errs],
            "tma_used": used is not None, "ok": bool(ok)}


def _check_tma_edges():
    """The TMA forward / dq on hand-made indices (-1 holes, empty and sub-block documents), a
    NaN in another document's K / V (the gathers keep it out; TMA's whole-block copies only
    past the copied block), and the cases ``tma_ok`` must refuse (block size 8, a misaligned
    or strided tensor, G 8)."""
    import torch
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_sparse_attention as tsp

    rows = []
    with override_config(tsp.CONFIG, small_d=dict(tma=1, tma_step=2, tma_pair=1)):
        torch.manual_seed(11)
        cu = [0, 0, 5, 5, 21, 40, 40]
        t, hq, h, d, kc = 40, 16, 1, 16, 4
        cs = torch.tensor(cu, dtype=torch.int32)
        idx = torch.full((1, t, h, kc), -1, dtype=torch.int32)
        for a, e in zip(cu, cu[1:]):
            for tok in range(a, e):
                cur = (tok - a) // BS
                past = torch.randperm(cur)[: kc - 1].tolist() if cur else []
                slots = [cur] + past + [-1] * (kc - 1 - len(past))
                idx[0, tok, 0] = torch.tensor(slots)[torch.tensor([0, 2, 1, 3])]  # a hole inside
        q, k, v, do = (torch.randn(1, t, n, d) for n in (hq, h, h, hq))
        err = max(_sparse_attention_errors(q, k, v, do, idx, cs))
        rows.append({"case": "holes and empty documents", "err": err, "ok": err < 1e-4})

        # NaN in document 2's keys and values. The gathers keep it out of document 1 (tokens
        # 0..39) entirely; TMA copies whole 16-row blocks (document 1's last copy spans rows
        # 32..47), so only NaN past row 47 is kept out there (see tma_block).
        t, cu = 80, [0, 40, 80]
        cs = torch.tensor(cu, dtype=torch.int32)
        q, k, v, do = (torch.randn(1, t, n, d) for n in (hq, h, h, hq))
        idx = ref.select_blocks(q, k, BS, kc, cs)
        one = [x[:, :40].clone().requires_grad_() for x in (q, k, v)]
        o1 = ref.sparse_attention(*one, idx[:, :40], BS)
        g1 = torch.autograd.grad(o1, one, do[:, :40])
        for tma, first_nan in ((0, 40), (1, 48)):
            tsp.CONFIG["small_d"]["tma"] = tma
            kn, vn = k.clone(), v.clone()
            kn[0, first_nan:], vn[0, first_nan:] = float("nan"), float("nan")
            leaves = [x.clone().requires_grad_() for x in (q, kn, vn)]
            o = tsp.sparse_attention(*leaves, idx, BS, cs)
            dq, dk, dv = torch.autograd.grad(o, leaves, do)
            err = max((a[:, :40] - b).abs().max().item()
                      for a, b in zip((o, dq, dk, dv), (o1, *g1)))
            rows.append({"case": f"NaN from row {first_nan}, tma {tma}", "err": err,
                         "ok": err < 1e-4})
        tsp.CONFIG["small_d"]["tma"] = 1

        # refused: block size 8, an address off 16 bytes, a strided tensor, G 8
        x = torch.zeros(64, 16, 16)
        off = torch.zeros(64 * 16 * 16 + 1)[1:].view(64, 16, 16)
        kv = torch.zeros(64, 1, 16)
        refused = [not tsp.tma_ok(1, 8, x, kv), not tsp.tma_ok(1, 16, off, kv),
                   not tsp.tma_ok(1, 16, torch.zeros(64, 16, 32)[:, :, :16], kv),
                   not tsp.tma_ok(2, 16, x, torch.zeros(64, 2, 16)),
                   tsp.tma_ok(1, 16, x, kv)]
        rows.append({"case": "refusals", "refused": refused, "ok": all(refused)})
    for row in rows:
        print(json.dumps(row), flush=True)


def _check_byte_floor():
    """ssa_megatron.bench.byte_floor's measuring kernels read exactly the rows the real kernels do:
    their sums equal torch's over those rows, and the byte count matches a brute-force count."""
    import torch
    from ssa_megatron.bench import byte_floor as bbf
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_sparse_attention as tsp
    from ssa_megatron.ops.triton_selection import doc_offsets

    for t, hq, h, d, cu in ((100, 8, 2, 16, [0, 37, 100]), (64, 32, 2, 32, None)):
        torch.manual_seed(7)
        g = hq // h
        q, do = (torch.randn(t, hq, d) for _ in range(2))
        k, v = (torch.randn(t, h, d) for _ in range(2))
        cs = torch.tensor(cu, dtype=torch.int32) if cu else None
        idx = ref.select_blocks(q[None], k[None], BS, 4, cs)[0].contiguous()
        offs = doc_offsets(1, t, cs)
        start = torch.zeros(t, dtype=torch.long)
        for a, b in zip(offs, offs[1:]):
            start[a:b] = a
        # brute force: every (token, kv head, valid slot) -> its key rows up to the token
        # loads + MMAs: every valid (token, head) row of a tile meets every key row the tile
        # loads (other tokens' too: no masks there), so a tile adds (its q sum . k) v per row
        bt = tsp.tile_tokens(g, BS)
        tile_of = torch.zeros(t, dtype=torch.long)
        for a, b in zip(offs, offs[1:]):
            for s0 in range(a, b, bt):
                tile_of[s0:min(s0 + bt, b)] = s0
        rows = 0
        kv_sum = torch.zeros(h, d, dtype=torch.float64)
        qkv_sum = torch.zeros(h, d, dtype=torch.float64)
        for tok in range(t):
            for hh in range(h):
                t0 = int(tile_of[tok])
                mates = (tile_of == t0).nonzero().flatten()
                qsum = q[mates, hh * g:(hh + 1) * g].double().sum((0, 1))
                for blk in idx[tok, hh].tolist():
                    if blk < 0:
                        continue
                    kp = [p for p in range(start[tok] + blk * BS, start[tok] + blk * BS + BS)
                          if p <= tok]
                    rows += len(kp)
                    kk, vv = k[kp, hh].double(), v[kp, hh].double()
                    kv_sum[hh] += (kk + vv).sum(0)
                    qkv_sum[hh] += ((kk @ qsum)[:, None] * vv).sum(0)
        got_rows = bbf.gathered_rows(idx, offs, BS)
        sums = bbf.kv_loads(q, k, v, idx, offs, BS).double().sum(0)
        ok = got_rows == rows and torch.allclose(sums[:, :d], kv_sum, rtol=1e-4, atol=1e-3)
        sums = bbf.kv_loads(q, k, v, idx, offs, BS, mma=True).double().sum(0)
        ok &= torch.allclose(sums[:, :d], qkv_sum, rtol=1e-4, atol=1e-2)
        tma = bbf.kv_tma_loads(q, k, v, idx, offs, BS)  # the TMA forward's copies (G >= 16)
        ok &= (tma is None) == (g < 16)
        if tma is not None:  # whole blocks, block 0 for an empty slot, zeros past the end
            whole = torch.zeros(h, d, dtype=torch.float64)
            for tok in range(t):
                for hh in range(h):
                    for blk in idx[tok, hh].tolist():
                        r0 = int(start[tok]) + max(blk, 0) * BS
                        rr = list(range(r0, min(r0 + BS, t)))
                        whole[hh] += (k[rr, hh] + v[rr, hh]).sum(0).double()
            ok &= torch.allclose(tma.double().sum(0), whole, rtol=1e-4, atol=1e-3)
        # dk/dv pattern: every valid entry adds its token's G query heads' q and dO rows
        lists = bbf.dkv_lists(q, idx, offs, BS)
        nb = lists[3]
        want = torch.zeros(h * nb, d, dtype=torch.float64)
        _, _, _, tok_boff = tsp.key_blocks(offs, BS, q.device)
        for tok in range(t):
            for hh in range(h):
                for blk in idx[tok, hh].tolist():
                    if blk >= 0:
                        rowsum = (q[tok, hh * g:(hh + 1) * g] + do[tok, hh * g:(hh + 1) * g]).sum(0)
                        want[hh * nb + tok_boff[tok] + blk] += rowsum.double()
        got = bbf.qdo_loads(q, do, idx, lists, BS).double()[:, :d]
        ok &= torch.allclose(got, want, rtol=1e-4, atol=1e-3)
        print(json.dumps({"case": f"T{t} HQ{hq} H{h} D{d}", "rows": got_rows, "want_rows": rows,
                          "ok": bool(ok)}), flush=True)
    # the L2 stream: program p reads tiles p, p + n, p + 2n, ... (mod the tile count)
    x = torch.randn(5 * 16 * 16)
    out, nbytes = bbf.l2_read(x, 3 * 4 * 16 * 16 * 4, rows=16, bd=16, programs=4)
    tiles = x.view(5, 16, 16)
    want = torch.stack([sum(tiles[(p + i * 4) % 5] for i in range(3)).sum(0) for p in range(4)])
    print(json.dumps({"case": "l2_read", "bytes": nbytes,
                      "ok": bool(torch.allclose(out, want, atol=1e-4)) and nbytes == 3 * 4 * 1024}),
          flush=True)


def _child(group):
    if group == "invert":
        for i, case in enumerate(INVERT_CASES):
            print(json.dumps(_check_invert(case, seed=3000 + i)), flush=True)
        print(json.dumps(_check_invert_fallbacks()), flush=True)
        return
    if group == "variants":
        _check_variant_tool()
        return
    if group == "floor":
        _check_byte_floor()
        return
    if group == "tma":
        for mode, cases in TMA_PLAN.items():
            for i in cases:
                print(json.dumps(_check_tma(TMA_CASES[i], mode, seed=4000 + i)), flush=True)
        _check_tma_edges()
        return
    if group == "moment2":
        for i, case in enumerate(MOMENT2_CASES):
            print(json.dumps(_check_moment2(case, seed=5000 + i)), flush=True)
        return
    if group == "subn":
        for i, case in enumerate(SUBN_CASES):
            print(json.dumps(_check_subn(case, seed=6000 + i)), flush=True)
        return
    if group == "select":
        for i, case in enumerate(SELECT_CASES):
            for row in _check_select(case, seed=2000 + i):
                print(json.dumps(dict(row, index=i)), flush=True)
        return
    for i, case in enumerate(GROUPS[group]):
        print(json.dumps(_check_case(case, seed=1000 + i)), flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run under TRITON_INTERPRET=1 (pytest does this for you)")
    _child(sys.argv[1])


def test_bench_attention_target_table_reads_each_forward_against_its_target():
    """The kernels-v8 target table: ratios from the run's own SDPA timings, one row per forward
    kernel, the selection and whole-SSA rows once; unknown --sparse-forwards names are refused."""
    from ssa_megatron.bench import attention as bat
    table = [
        {"shape": "B4 T8192 HQ32 H8 D128", "sdpa_fwd": 3.0, "sdpa_fwdbwd": 10.0, "select": 2.0,
         "sparse_fwdbwd": 3.5, "sparse_fwdbwd@block_major": 4.5, "ssa_fwdbwd": 14.0,
         "prefill_sparse": 5.0},
        {"shape": "B1 T32768 HQ32 H8 D128", "sdpa_fwd": 15.0, "sdpa_fwdbwd": 50.0, "select": 8.0,
         "prefill_sparse": 12.0, "prefill_sparse@block_major": 4.0},
        {"shape": "B1 T32768 HQ32 H2 D64", "sdpa_fwd": 9.0, "sdpa_fwdbwd": 35.0, "select": 1.2,
         "prefill_sparse": 3.0},
    ]
    rows = bat.target_table("a card", table, ("gather", "block_major"))
    assert rows[0] == "targets on a card (same run):"
    body = [r for r in rows[3:]]
    assert "| HQ32 H8 D128 | B4 T8192 | sparse branch fwd+bwd / SDPA fwd+bwd | gather | 0.350 | <= 0.4 | yes |" in body
    assert "| HQ32 H8 D128 | B4 T8192 | sparse branch fwd+bwd / SDPA fwd+bwd | block_major | 0.450 | <= 0.4 | no |" in body
    assert "| HQ32 H8 D128 | B4 T8192 | whole SSA fwd+bwd / SDPA fwd+bwd | gather | 1.400 | <= 1.45 | yes |" in body
    assert "| HQ32 H8 D128 | B1 T32768 | sparse prefill speed-up vs SDPA fwd | gather | 1.250 | >= 3.0 | no |" in body
    assert "| HQ32 H8 D128 | B1 T32768 | sparse prefill speed-up vs SDPA fwd | block_major | 3.750 | >= 3.0 | yes |" in body
    assert "| HQ32 H2 D64 | B1 T32768 | selection alone (ms) | gather | 1.200 | <= 1.5 | yes |" in body
    assert sum("selection alone" in r for r in body) == 2  # once per layout, not per forward
    assert bat.parse_forwards("gather,block_major") == ("block_major",)
    with pytest.raises(SystemExit, match="block_mayor"):
        bat.parse_forwards("block_mayor")


@needs_triton
@pytest.mark.parametrize("heads, parts, operands, keys", [
    ((32, 2, 64), 1, "fp32", "int64"), ((32, 2, 64), 4, "fp32", "int64"),
    ((32, 8, 128), 4, "fp32", "int64"), ((12, 3, 64), 2, "fp32", "int64"),
    ((32, 2, 64), 1, "fp16", "int64"), ((32, 8, 128), 1, "fp16", "int32"),
    ((32, 8, 128), 4, "fp16", "int32")])
def test_selection_kernel_compiles_for_hopper(heads, parts, operands, keys):
    """The interpreter ignores what the compiler refuses: compile the selection kernel for sm_90
    with the launch constants its wrapper picks (CONFIG defaults, K 16), also for the subN
    scores' sub-block means (the 4-D reshape of pass 2) and fp16 scoring operands, no GPU
    needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ssa_megatron.ops import triton_selection as tsel
    from ssa_megatron.ops.kernel_config import override_config
    hq, h, d = heads
    with override_config(tsel.CONFIG, operands=operands, keys=keys):
        constants = tsel.launch_constants(hq, h, d, 16, 16, parts, 32768)
    assert constants["KEY32"] == (keys == "int32")
    pointers = {"Q": "*bf16", "KP": "*fp16" if operands == "fp16" else "*fp32",
                "KSCALE": "*fp32", "OUT": "*i32"}
    kernel = tsel._select_kernel
    signature = {name: "constexpr" if name in constants else pointers.get(name, "*i32")
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constants),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": tsel.CONFIG["warps"]})
    assert compiled.asm["cubin"]


def test_side_stream_runs_inline_off_cuda():
    """Off CUDA, ``side_stream.beside`` runs the function at once and its wait returns the
    result (on a GPU the benchmark compares the overlapped SSA step with the plain one bit for
    bit: ``overlap_same``)."""
    import torch

    from ssa_megatron.ops import side_stream
    calls = []
    x = torch.ones(3)
    wait = side_stream.beside(lambda: calls.append(1) or x * 2, x)
    assert calls == [1]
    assert torch.equal(wait(), torch.full((3,), 2.0)) and calls == [1]


@needs_triton
def test_auto_operands_are_fp16_on_a_gpu_only(monkeypatch):
    """CONFIG["operands"] = "auto" (the default): fp16 scoring where the kernel compiles for a
    GPU, fp32 under the CPU interpreter and wherever a finer dot precision is asked for; "fp16"
    with such a precision is refused in one line. keys = "auto" follows the operands (int32
    merge keys with fp16 scores, int64 with fp32 ones); fp16 operands keep the full pass-2
    step at head dim 128 where fp32 ones halve it, and take their own pass-1 / subN steps and
    register cap."""
    from ssa_megatron.ops import triton_selection as tsel
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tsel.CONFIG["operands"] == tsel.CONFIG["keys"] == "auto"

    def chosen():
        c = tsel.launch_constants(32, 8, 128, 16, 16, 1, 8192)
        sub4 = tsel.launch_constants(32, 8, 128, 16, 16, 4, 8192)
        return c["F16"], c["KEY32"], c["BN"], c["BN1"], sub4["BN"], tsel.register_cap(c)
    # fp16 operands: wider steps and a lower register cap than fp32 ones (per-operand settings)
    with override_config(tsel.CONFIG, bn=32):
        assert chosen() == (True, True, 32, 64, 16, 96)
        with override_config(tsel.CONFIG, dot_precision="ieee"):
            assert chosen() == (False, False, 16, 16, 4, 128)
        with override_config(tsel.CONFIG, keys="int64"):
            assert chosen() == (True, False, 32, 64, 16, 96)
        with override_config(tsel.CONFIG, bn_stats=32, maxnreg_large_d=0):  # one for both
            assert chosen() == (True, True, 32, 32, 16, 0)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert chosen() == (False, False, 16, 16, 4, 128)
    with override_config(tsel.CONFIG, operands="fp16", dot_precision="tf32x3"):
        with pytest.raises(ValueError, match="operands"):
            tsel.launch_constants(32, 8, 128, 16, 16, 1, 8192)


@needs_triton
def test_launch_constants_follow_the_tile_options():
    """The tile options reach the kernel's constants (the interpreter cases that run them would
    pass with the options ignored): tokens per tile up to "tokens_max", and the subN pass-2
    step of "bn_sub" entries in whole blocks."""
    from ssa_megatron.ops import triton_selection as tsel
    assert tsel.launch_constants(32, 8, 128, 16, 16, 1, 8192)["BT"] == 16
    with override_config(tsel.CONFIG, rows=128, tokens_max=32):
        assert tsel.launch_constants(32, 8, 128, 16, 16, 1, 8192)["BT"] == 32
    with override_config(tsel.CONFIG, operands="fp32", bn=32, bn_sub=0):  # 16 entries at D 128
        assert tsel.launch_constants(32, 8, 128, 16, 16, 4, 8192)["BN"] == 4
        with override_config(tsel.CONFIG, bn_sub=64):
            assert tsel.launch_constants(32, 8, 128, 16, 16, 4, 8192)["BN"] == 16


@needs_triton
def test_selection_of_no_tokens_is_empty(monkeypatch):
    """An empty batch or zero-length sequences select nothing and launch nothing (the longest
    document of none is 0 tokens long)."""
    import torch

    from ssa_megatron.ops import triton_selection as tsel
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for b, t in ((0, 32), (1, 0)):
        q, k = torch.randn(b, t, 4, 16), torch.randn(b, t, 2, 16)
        assert tsel.select_blocks(q, k, 16, 2).shape == (b, t, 2, 2)


@needs_triton
def test_int32_merge_keys_only_where_the_score_keeps_its_bits():
    """int32 keys give the block index the bits the longest document's block count needs (at
    least 8, so that few kernels compile); past 4096 blocks the score would keep fewer than 11
    significant bits, so int64 keys stay."""
    from ssa_megatron.ops import triton_selection as tsel
    with override_config(tsel.CONFIG, keys="int32"):
        at_64k = tsel.launch_constants(32, 8, 128, 16, 16, 1, 65536)
        at_128k = tsel.launch_constants(32, 8, 128, 16, 16, 1, 131072)
        short = tsel.launch_constants(32, 8, 128, 16, 16, 1, 100)
        with override_config(tsel.CONFIG, key_index_bits=11):
            forced = tsel.launch_constants(32, 8, 128, 16, 16, 1, 100)
    assert (at_64k["KEY32"], at_64k["IDX_BITS"]) == (True, 12)
    assert (at_128k["KEY32"], at_128k["IDX_BITS"]) == (False, 20)
    assert (short["KEY32"], short["IDX_BITS"]) == (True, 8)
    assert (forced["KEY32"], forced["IDX_BITS"]) == (True, 11)
    with override_config(tsel.CONFIG, keys="int16"), pytest.raises(ValueError, match="keys"):
        tsel.launch_constants(32, 8, 128, 16, 16, 1, 100)
