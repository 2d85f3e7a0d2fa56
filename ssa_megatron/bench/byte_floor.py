"""Measured byte floors of the block-sparse attention kernels on one GPU.

Each sparse kernel moves a fixed number of bytes per (token, kv head, selected block): the
forward and dq gather that block's K and V rows, dk/dv gathers the q and dO rows of the
block's tokens. This tool times, on the same indices and with the same tiles, grids, warps and
stages as the real kernels:

- ``loads``: a kernel that only loads those rows and adds them up (no MMA, no softmax), for
  the forward both as per-thread gathers and, where the real forward uses them (Hopper, G >= 16),
  as whole-block TMA copies;
- ``loads+mma`` (forward pattern): the same loads feeding the forward's two MMAs, still
  without the softmax and masks;
- the real forward, dq and dk/dv (dk/dv without the list inversion, which is timed apart);
- a plain L2 read: programs reading 8 KB tiles of an L2-resident buffer, as many bytes as the
  forward gathers, so the card's own L2 read rate is measured in the same run.

The loads-only time is the kernel's floor on this card for its bytes: a real kernel at that
time cannot get faster without moving fewer bytes. Every ratio is printed beside SDPA full
causal fwd+bwd timed in the same run.

Usage: python tools/bench_byte_floor.py [--shapes 4x8192,1x32768] [--heads 32/2/64,32/2/32]
       [--json out.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from ssa_megatron.ops import triton_sparse_attention as tsp
from ssa_megatron.ops.triton_selection import doc_offsets

BS, KC = 16, 16


@triton.jit
def _kv_loads_kernel(Q, Kt, V, IDX, OUT, TILE_TOK, TILE_DS, TILE_DL,
                     HQ: tl.constexpr, H: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                     K: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr,
                     BD: tl.constexpr, NS: tl.constexpr, MMA: tl.constexpr):
    """The forward's K/V gather (same tile, same helper) and nothing else (MMA = 0), or feeding
    its two MMAs without softmax (MMA = 1); writes a [BD] sum per program so nothing is dead."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    tok0 = tl.load(TILE_TOK + pid)
    ds = tl.load(TILE_DS + pid)
    dl = tl.load(TILE_DL + pid)
    C: tl.constexpr = NS * BT * BS
    R: tl.constexpr = BT * GP
    c = tl.arange(0, C)
    cs = c // (BT * BS)
    cj = c % BS
    tok_c = tok0 + (c // BS) % BT
    col_tok_ok = tok_c - ds < dl
    dd = tl.arange(0, BD)
    dmask = dd < D
    if MMA:
        r = tl.arange(0, R)
        tok_r = tok0 + r // GP
        row_ok = (tok_r - ds < dl) & (r % GP < G)
        qrow = (tok_r.to(tl.int64) * HQ + h * G + r % GP) * D
        q = tl.load(Q + qrow[:, None] + dd[None, :], mask=row_ok[:, None] & dmask[None, :],
                    other=0.0)
        acc = tl.zeros([R, BD], tl.float32)
    else:
        acc = tl.zeros([C, BD], tl.float32)
    for i0 in range(0, K, NS):
        kt, vt, col_ok = tsp.gather_blocks(IDX, Kt, V, tok_c, col_tok_ok, cs, cj, ds, h, i0,
                                           dd, dmask, H, D, K, BS)
        if MMA:
            s = tl.dot(q, tl.trans(kt))
            acc += tl.dot(s.to(vt.dtype), vt)
        else:
            acc += kt.to(tl.float32) + vt.to(tl.float32)
    tl.store(OUT + (pid.to(tl.int64) * H + h) * BD + dd, tl.sum(acc, axis=0))


@triton.jit
def _kv_tma_loads_kernel(k_desc, v_desc, IDX, OUT, TILE_DS,
                         H: tl.constexpr, D: tl.constexpr, K: tl.constexpr, BS: tl.constexpr,
                         STEP: tl.constexpr):
    """The TMA forward's K/V copies (same helper, grid, step, warps and stages) and nothing
    else; writes a [D] sum per (token, kv head)."""
    tok = tl.program_id(0)
    h = tl.program_id(1)
    ds = tl.load(TILE_DS + tok)
    idx_row = IDX + (tok.to(tl.int64) * H + h) * K
    acc = tl.zeros([BS, D], tl.float32)
    for i in range(0, K, STEP):
        for j in tl.static_range(STEP):
            kt, vt, _ = tsp.tma_block(k_desc, v_desc, idx_row, i + j, ds, tok, h, D, K, BS)
            acc += kt.to(tl.float32) + vt.to(tl.float32)
    tl.store(OUT + (tok.to(tl.int64) * H + h) * D + tl.arange(0, D), tl.sum(acc, axis=0))


@triton.jit
def _qdo_loads_kernel(Q, DO, LIST_OFF, LIST_TOK, ORDER, OUT, NB,
                      HQ: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BE: tl.constexpr,
                      GP: tl.constexpr, BD: tl.constexpr):
    """dk/dv's gather: one program per (kv head, key block) list, BE tokens x G heads of q and
    dO rows per step (as ``_dkv_segment``), added up."""
    w = tl.load(ORDER + tl.program_id(0))
    h = w // NB
    lo = tl.load(LIST_OFF + w)
    hi = tl.load(LIST_OFF + w + 1)
    R: tl.constexpr = BE * GP
    r = tl.arange(0, R)
    dd = tl.arange(0, BD)
    acc = tl.zeros([R, BD], tl.float32)
    for e0 in range(lo, hi, BE):
        e = e0 + r // GP
        e_ok = (e < hi) & (r % GP < G)
        tok = tl.load(LIST_TOK + e, mask=e_ok, other=0)
        lrow = tok.to(tl.int64) * HQ + h * G + r % GP
        rmask = e_ok[:, None] & (dd[None, :] < D)
        q = tl.load(Q + lrow[:, None] * D + dd[None, :], mask=rmask, other=0.0)
        do = tl.load(DO + lrow[:, None] * D + dd[None, :], mask=rmask, other=0.0)
        acc += q.to(tl.float32) + do.to(tl.float32)
    tl.store(OUT + w.to(tl.int64) * BD + dd, tl.sum(acc, axis=0))


@triton.jit
def _l2_read_kernel(X, OUT, NTILES, STEPS, ROWS: tl.constexpr, BD: tl.constexpr):
    """STEPS tiles of [ROWS, BD] from a buffer of NTILES tiles; concurrent programs read
    neighbouring tiles, each program strides by the grid (an L2-resident stream)."""
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    tile = tl.arange(0, ROWS)[:, None] * BD + tl.arange(0, BD)[None, :]
    acc = tl.zeros([ROWS, BD], tl.float32)
    for i in range(STEPS):
        t = ((pid + i * n) % NTILES).to(tl.int64)
        acc += tl.load(X + t * (ROWS * BD) + tile, cache_modifier=".cg").to(tl.float32)
    tl.store(OUT + pid.to(tl.int64) * BD + tl.arange(0, BD), tl.sum(acc, axis=0))


# --------------------------------------------------------------------------------------------
# Launchers (the real kernels' launch geometry) and byte counts
# --------------------------------------------------------------------------------------------

def kv_loads(qf, kf, vf, idx, offs, bs, mma=False):
    """[tiles, H, BD] sums of the forward pattern's K/V loads (and MMAs with ``mma``)."""
    grid, tile_args, consts, bd = tsp.query_launch(qf, idx, offs, bs)
    out = torch.empty(grid[0], grid[1], bd, dtype=torch.float32, device=qf.device)
    if grid[0]:
        _kv_loads_kernel[grid](qf, kf, vf, idx, out, *tile_args, **consts, MMA=int(mma),
                               **tsp.launch_options(bd, "fwd"))
    return out


def kv_tma_loads(qf, kf, vf, idx, offs, bs):
    """[tokens, H, D] sums of the TMA forward's K/V copies, or None where the TMA forward does
    not apply (``triton_sparse_attention.tma_ok``)."""
    tma = tsp.tma_launch(idx, offs, bs, qf, kf, vf)
    if tma is None:
        return None
    grid, dstart, consts, opts = tma
    desc = tsp.tma_descriptors(bs, consts["G"], consts["D"], k=kf, v=vf)
    out = torch.empty(grid[0], grid[1], consts["D"], dtype=torch.float32, device=qf.device)
    _kv_tma_loads_kernel[grid](desc["k"], desc["v"], idx, out, dstart, H=consts["H"],
                               D=consts["D"], K=consts["K"], BS=bs, STEP=consts["STEP"], **opts)
    return out


def dkv_lists(qf, idx, offs, bs):
    """The dk/dv pass's inverted lists and launch order (no split: random selections have no
    list long enough to be cut)."""
    _, _, nb, tok_boff = tsp.key_blocks(offs, bs, qf.device)
    off, ltok = tsp.invert_selection(idx, tok_boff, nb)
    order, _ = tsp.dkv_schedule(off, 0)
    return off, ltok, order, nb


def qdo_loads(qf, dof, idx, lists, bs):
    """[H * blocks, BD] sums of the dk/dv pattern's q and dO loads, one row per list."""
    off, ltok, order, nb = lists
    n, hq, d = qf.shape
    h = idx.shape[1]
    g = hq // h
    gp = tsp.next_pow2(g)
    bd = max(16, tsp.next_pow2(d))
    be = max(1, tsp.head_dim_config(bd)["dkv_rows"] // gp)
    out = torch.zeros(h * nb, bd, dtype=torch.float32, device=qf.device)
    if h * nb:
        _qdo_loads_kernel[(h * nb,)](qf, dof, off, ltok, order, out, nb, HQ=hq, D=d, G=g,
                                     BE=be, GP=gp, BD=bd, **tsp.launch_options(bd, "dkv"))
    return out


def l2_read(x, total_bytes, rows=64, bd=64, programs=None):
    """Read ``total_bytes`` as [rows, bd] tiles of the L2-resident ``x`` (bf16)."""
    ntiles = x.numel() // (rows * bd)
    tile_bytes = rows * bd * x.element_size()
    programs = programs or 132 * 16
    steps = max(1, int(total_bytes // (tile_bytes * programs)))
    out = torch.empty(programs, bd, dtype=torch.float32, device=x.device)
    _l2_read_kernel[(programs,)](x, out, ntiles, steps, ROWS=rows, BD=bd, num_warps=4)
    return out, steps * programs * tile_bytes


def gathered_rows(idx: torch.Tensor, offs, bs: int) -> int:
    """Key rows the forward loads: 16 per selected past block, pos % bs + 1 of the current one
    (rows past the token are masked, so never fetched); per (token, kv head)."""
    n = idx.shape[0]
    pos = torch.empty(n, dtype=torch.long, device=idx.device)
    for a, b in zip(offs, offs[1:]):
        pos[a:b] = torch.arange(b - a, device=idx.device)
    cur = (pos // bs)[:, None, None]
    blk = idx.long()
    full = ((blk >= 0) & (blk < cur)).sum().item() * bs
    part = ((blk == cur).long() * ((pos % bs) + 1)[:, None, None]).sum().item()
    return int(full + part)


# --------------------------------------------------------------------------------------------
# GPU run
# --------------------------------------------------------------------------------------------

def time_shape(b, t, hq, h, d, device):
    from ssa_megatron.bench.attention import median_ms, time_sdpa
    from ssa_megatron.ops import triton_selection as tsel
    torch.manual_seed(1)
    dt = torch.bfloat16
    q, do = (torch.randn(b, t, hq, d, device=device, dtype=dt) for _ in range(2))
    k, v = (torch.randn(b, t, h, d, device=device, dtype=dt) for _ in range(2))
    res = {"shape": f"B{b} T{t} HQ{hq} H{h} D{d}"}
    res.update(time_sdpa(q, k, v, do))
    idx = tsel.select_blocks(q, k, BS, KC)
    n = b * t
    offs = doc_offsets(b, t, None)
    scale = d ** -0.5
    qf, kf, vf, dof = (x.reshape(n, -1, d) for x in (q, k, v, do))
    idf = idx.reshape(n, h, KC).contiguous()
    o, lse = tsp.forward(qf, kf, vf, idf, offs, BS, scale)
    _, delta = tsp.backward_dq(qf, kf, vf, idf, o, dof, lse, offs, BS, scale)
    lists = dkv_lists(qf, idf, offs, BS)
    rows = gathered_rows(idf, offs, BS)
    entries = int((idf >= 0).sum().item())
    g = hq // h
    res["fwd_gb"] = rows * d * 2 * 2 / 1e9  # K and V rows, bf16
    res["dkv_gb"] = entries * g * d * 2 * 2 / 1e9  # q and dO rows of G heads per entry
    # TMA copies whole blocks, empty slots included (they copy block 0)
    res["fwd_tma_gb"] = idf.numel() * BS * d * 2 * 2 / 1e9
    res["tma"] = kv_tma_loads(qf, kf, vf, idf, offs, BS) is not None
    res["fwd_loads"] = median_ms(lambda: kv_loads(qf, kf, vf, idf, offs, BS))
    if res["tma"]:
        res["fwd_tma_loads"] = median_ms(lambda: kv_tma_loads(qf, kf, vf, idf, offs, BS))
    res["fwd_loads_mma"] = median_ms(lambda: kv_loads(qf, kf, vf, idf, offs, BS, mma=True))
    res["fwd"] = median_ms(lambda: tsp.forward(qf, kf, vf, idf, offs, BS, scale))
    res["dq"] = median_ms(lambda: tsp.backward_dq(qf, kf, vf, idf, o, dof, lse, offs, BS, scale))
    res["dkv_loads"] = median_ms(lambda: qdo_loads(qf, dof, idf, lists, BS))
    res["invert"] = median_ms(lambda: dkv_lists(qf, idf, offs, BS))
    res["dkv_with_invert"] = median_ms(lambda: tsp.backward_dkv(qf, kf, vf, idf, dof, lse, delta,
                                                             offs, BS, scale))
    buf = torch.randn(8 << 20, device=device, dtype=dt)  # 16 MB: L2-resident
    _, nbytes = l2_read(buf, res["fwd_gb"] * 1e9)
    res["l2_read_gb"] = nbytes / 1e9
    res["l2_read"] = median_ms(lambda: l2_read(buf, res["fwd_gb"] * 1e9))
    return res


def report(name, rows):
    print(f"\n=== {name}: median ms; TB/s = bytes / time; x = / SDPA fwd+bwd, same run ===")
    for r in rows:
        base = r["sdpa_fwdbwd"]
        tb = lambda gb, ms: gb / ms  # noqa: E731 - GB per ms = TB per s
        print(f"{r['shape']}: SDPA fwd {r['sdpa_fwd']:.3f} fwd+bwd {base:.3f}; "
              f"L2 read of {r['l2_read_gb']:.2f} GB: {r['l2_read']:.3f} ms "
              f"= {tb(r['l2_read_gb'], r['l2_read']):.2f} TB/s")
        dkv = r["dkv_with_invert"] - r["invert"]
        tma = r.get("tma")
        real_gb = r["fwd_tma_gb"] if tma else r["fwd_gb"]
        lines = [("fwd K/V gathers, loads only", r["fwd_loads"], r["fwd_gb"]),
                 ("fwd gathers + 2 MMAs", r["fwd_loads_mma"], r["fwd_gb"])]
        if tma:
            lines.append(("fwd K/V TMA copies, loads only", r["fwd_tma_loads"], r["fwd_tma_gb"]))
        path = " (TMA)" if tma else " (gathers)"
        lines += [("fwd (real" + path + ")", r["fwd"], real_gb),
                  ("dq (real" + path + ")", r["dq"], real_gb),
                 ("dk/dv q/dO loads only", r["dkv_loads"], r["dkv_gb"]),
                 ("dk/dv (real, no inversion)", dkv, r["dkv_gb"]),
                 ("list inversion", r["invert"], None)]
        for label, ms, gb in lines:
            rate = f"{tb(gb, ms):6.2f} TB/s of {gb:.2f} GB" if gb else ""
            print(f"  {label:32s} {ms:7.3f} ms ({ms / base:.3f}x)  {rate}")
        floor = min(r["fwd_loads"], r.get("fwd_tma_loads", 1e9)) * 2 + r["dkv_loads"]
        print(f"  gather floor fwd + dq + dk/dv (loads only) {floor:.3f} ms = {floor / base:.3f}x; "
              f"real {r['fwd'] + r['dq'] + r['dkv_with_invert']:.3f} ms")


def main(argv=None):
    from ssa_megatron.bench.attention import gpu_header, shape_grid
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shapes", default="4x8192,1x32768")
    ap.add_argument("--heads", default="32/2/64,32/2/32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = gpu_header("bench_byte_floor")
    if out is None:
        return 2
    dev = torch.device("cuda")
    out["timings"] = []
    for b, t, hq, h, d in shape_grid(args.shapes, args.heads):
        r = time_shape(b, t, hq, h, d, dev)
        out["timings"].append(r)
        print("timing", json.dumps(r), flush=True)
        torch.cuda.empty_cache()
    report(out["gpu"], out["timings"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0

