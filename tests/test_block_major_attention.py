"""Block-major sparse attention (ops/triton_block_major.py) vs the reference, on the CPU under
TRITON_INTERPRET=1 (fp32).

As in test_triton_kernels.py the kernel checks run in a fresh subprocess that sets the
interpreter flag before Triton is imported; the child prints one JSON line per case.

Checks: output and log2-sum-exp equal the reference's (LSE from a dense masked softmax) and the
gather forward's; gradients through the reused gather backward equal the reference's; the
inverted lists hold every visible selection entry once; G 1/2/4/8/16, D 64/128, packed
documents (one shorter than a block), block counts above the number of past blocks, T not a
multiple of the block size, lists longer than one tile; hand-made indices with holes, a repeated
block, blocks after the token or past the document, and a row with no block at all; the
dispatch switch (CONFIG["sparse_forward"]).
"""
from __future__ import annotations

import json
import sys

from interpreter_utils import InterpretedGroups, needs_triton

BS = 16

# (B, T, HQ, H, D, block_counts, cu_seqlens, CONFIG overrides)
CASES = [
    (1, 90, 2, 2, 64, 16, [0, 20, 57, 90], {}),  # G 1, K above the past blocks, packed
    (1, 80, 4, 2, 128, 3, [0, 33, 80], {"rows": 16}),  # G 2, lists over several tiles
    (2, 72, 8, 2, 128, 4, None, {}),  # G 4 (Llama layout), batch 2, T % 16 != 0
    (1, 96, 8, 1, 64, 5, [0, 16, 50, 96], {"partial_dtype": "float32"}),  # G 8
    (1, 90, 16, 1, 64, 3, [0, 7, 90], {}),  # G 16, a document shorter than a block
]


GROUP_OF_TEST = {"test_block_major_matches_reference": "cases",
                 "test_block_major_edges_and_dispatch": "edges"}


INTERPRETED = InterpretedGroups(__file__, GROUP_OF_TEST.get)
interpreted = INTERPRETED.fixture()


@needs_triton
def test_block_major_matches_reference(interpreted):
    rows = interpreted.rows("cases")
    assert len(rows) == len(CASES)
    for row in rows:
        assert row["ok"], row


@needs_triton
def test_block_major_edges_and_dispatch(interpreted):
    rows = interpreted.rows("edges")
    assert [r["case"] for r in rows] == ["hand-made indices", "dispatch"]
    for row in rows:
        assert row["ok"], row


# ------------------------------------------------------------------------------------------
# Child process: TRITON_INTERPRET=1 is set before anything imports triton.
# ------------------------------------------------------------------------------------------

def _reference_lse(q, k, idx, cs):
    """log2-sum-exp [B, T, HQ] of each row's selected keys, from a dense masked softmax."""
    import torch
    from ssa_megatron.ops import reference as ref

    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    mask = ref.selection_mask(idx, BS, t, cs).repeat_interleave(g, dim=1)  # [B, HQ, T, T]
    kh = k.repeat_interleave(g, dim=2)
    logits = torch.einsum("bihd,bjhd->bhij", q, kh) * d ** -0.5
    lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return (lse / torch.log(torch.tensor(2.0))).transpose(1, 2)


def _lists_ok(idx, cs, b, t):
    """Every visible entry (not empty, block not after the token) in exactly its list."""
    import torch
    from ssa_megatron.ops import triton_block_major as bm
    from ssa_megatron.ops.triton_selection import doc_offsets

    n, h, kc = b * t, idx.shape[2], idx.shape[3]
    flat = idx.reshape(n, h, kc).to(torch.int32).contiguous()
    offs = doc_offsets(b, t, cs)
    off, ent, (bstart, _, nb), tok_ds = bm.entry_lists(flat, offs, BS)
    want = {}
    for tok in range(n):
        ds = int(tok_ds[tok])
        boff = int(((bstart >= 0) & (bstart < ds)).sum())  # global blocks before the document
        for hh in range(h):
            for s in range(kc):
                blk = int(flat[tok, hh, s])
                if blk >= 0 and blk * BS <= tok - ds:
                    want.setdefault(hh * nb + boff + blk, []).append((tok * h + hh) * kc + s)
    got = {w: sorted(ent[int(off[w]):int(off[w + 1])].tolist()) for w in range(h * nb)
           if off[w + 1] > off[w]}
    return got == {w: sorted(x) for w, x in want.items()}


def _grads(fn, q, k, v, idx, do, cs):
    import torch
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves, idx, BS, cs)
    return [o.detach()] + list(torch.autograd.grad(o, leaves, do))


def _maxdiff(xs, ys):
    return [float(f"{(x - y).abs().max().item():.2e}") for x, y in zip(xs, ys)]


def _check_case(case, seed):
    import torch
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_block_major as bm
    from ssa_megatron.ops import triton_sparse_attention as tsp
    from ssa_megatron.ops.kernel_config import override_config

    b, t, hq, h, d, kc, cu, over = case
    torch.manual_seed(seed)
    cs = torch.tensor(cu, dtype=torch.int32) if cu else None
    q = torch.randn(b, t, hq, d) * 1.5
    k = torch.randn(b, t, h, d) * 1.5
    v = torch.randn(b, t, h, d)
    do = torch.randn(b, t, hq, d)
    idx = ref.select_blocks(q, k, BS, kc, cs)
    with override_config(bm.CONFIG, **over):
        o, lse = bm.sparse_attention_forward(q, k, v, idx, BS, cs)
        got = _grads(bm.sparse_attention, q, k, v, idx, do, cs)
    n = b * t
    _, lse_gather = tsp.forward(*(x.reshape(n, -1, d).contiguous() for x in (q, k, v)),
                                 idx.reshape(n, h, kc).to(torch.int32).contiguous(),
                                 tuple(cu) if cu else tuple(i * t for i in range(b + 1)), BS,
                                 d ** -0.5)
    want = _grads(ref.sparse_attention, q, k, v, idx, do, cs)
    errs = _maxdiff([o, lse, lse.reshape(n, hq)] + got,
                    [want[0], _reference_lse(q, k, idx, cs), lse_gather] + want)
    lists = _lists_ok(idx, cs, b, t)
    return {"case": [b, t, hq, h, d, kc, cu, over], "err_o_lse_lsegather_o_dq_dk_dv": errs,
            "lists": lists, "ok": bool(max(errs) < 1e-4 and lists)}


def _check_edges(seed):
    """Hand-made indices against the gather kernels (which define o = 0 and a very negative
    LSE for a row with no key; the reference gives NaN there) and the reference elsewhere."""
    import torch
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_block_major as bm
    from ssa_megatron.ops import triton_sparse_attention as tsp

    b, t, hq, h, d, kc = 1, 77, 8, 2, 64, 4
    cu = [0, 5, 40, 77]
    torch.manual_seed(seed)
    cs = torch.tensor(cu, dtype=torch.int32)
    q = torch.randn(b, t, hq, d) * 1.5
    k = torch.randn(b, t, h, d) * 1.5
    v = torch.randn(b, t, h, d)
    do = torch.randn(b, t, hq, d)
    idx = ref.select_blocks(q, k, BS, kc, cs)
    idx[0, 50:60, 0, 1] = -1  # a hole before used slots
    idx[0, 60:66, 1, 3] = idx[0, 60:66, 1, 0]  # the current block twice
    idx[0, 41:45, 0, 2] = 1  # a block after the token (document-relative)
    idx[0, 70:74, 1, 2] = 2  # a block after the token, the document's last (partial) one
    idx[0, 30, 1, :] = -1  # no block at all
    got = _grads(bm.sparse_attention, q, k, v, idx, do, cs)
    gat = _grads(tsp.sparse_attention, q, k, v, idx, do, cs)
    o, lse = bm.sparse_attention_forward(q, k, v, idx, BS, cs)
    n = b * t
    _, lse_gather = tsp.forward(*(x.reshape(n, -1, d).contiguous() for x in (q, k, v)),
                                 idx.reshape(n, h, kc).to(torch.int32).contiguous(), tuple(cu),
                                 BS, d ** -0.5)
    rows = torch.ones(t, dtype=torch.bool)
    rows[30] = False
    o_ref = ref.sparse_attention(q, k, v, idx, BS, cs)
    errs = _maxdiff(got + [lse.reshape(n, hq), o[:, rows]], gat + [lse_gather, o_ref[:, rows]])
    empty_row = bool((o[0, 30, 4:] == 0).all()) and bool((lse[0, 30, 4:] < -1e29).all())
    # a block past every document's end: the forward drops it (the gather backward's lists
    # would index past their end, so forward only)
    idx[0, 70:74, 1, 1] = 50
    o_far, _ = bm.sparse_attention_forward(q, k, v, idx, BS, cs)
    errs += _maxdiff([o_far[:, rows]], [ref.sparse_attention(q, k, v, idx, BS, cs)[:, rows]])
    lists = _lists_ok(idx, cs, b, t)
    return {"case": "hand-made indices", "err_o_dq_dk_dv_lse_oref_ofar": errs,
            "empty_row": empty_row, "lists": lists,
            "ok": bool(max(errs) < 1e-4 and empty_row and lists)}


def _check_dispatch(seed):
    """CONFIG["sparse_forward"]: "gather" (default) keeps the gather kernels, "block_major"
    and "auto" (G < 16) take this module's forward; an unknown name is refused."""
    import torch
    from ssa_megatron.ops import dispatch, reference as ref
    from ssa_megatron.ops import triton_block_major as bm

    torch.manual_seed(seed)
    calls = []
    real = bm.forward_flat

    def counting(*args):
        calls.append(args[0].shape[1] // args[1].shape[1])
        return real(*args)

    out = {"case": "dispatch", "default": bm.CONFIG["sparse_forward"]}
    ok = out["default"] == "gather"
    saved = dict(bm.CONFIG)
    bm.forward_flat = counting
    try:
        with dispatch.attention_backend("triton"):
            for mode, g, want in (("gather", 4, 0), ("block_major", 16, 1), ("auto", 4, 1),
                                  ("auto", 16, 0)):
                bm.CONFIG["sparse_forward"] = mode
                q = torch.randn(1, 40, 2 * g, 16)
                k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
                idx = ref.select_blocks(q, k, BS, 2)
                calls.clear()
                o = dispatch.sparse_attention(q, k, v, idx, BS)
                err = (o - ref.sparse_attention(q, k, v, idx, BS)).abs().max().item()
                ok &= len(calls) == want and err < 1e-4
                out[f"{mode}/G{g}"] = [len(calls), float(f"{err:.1e}")]
            bm.CONFIG["sparse_forward"] = "fastest"
            try:
                dispatch.sparse_attention(q, k, v, idx, BS)
                ok = False
            except ValueError as e:
                ok &= "sparse_forward" in str(e)
    finally:
        bm.forward_flat = real
        bm.CONFIG.clear()
        bm.CONFIG.update(saved)
    out["ok"] = bool(ok)
    return out


def _child(what):
    if what == "cases":
        for i, case in enumerate(CASES):
            print(json.dumps(_check_case(case, 100 + i)), flush=True)
    elif what == "edges":
        print(json.dumps(_check_edges(7)), flush=True)
        print(json.dumps(_check_dispatch(8)), flush=True)
    else:
        raise SystemExit(f"unknown child job {what!r}")


if __name__ == "__main__":
    _child(sys.argv[1])
