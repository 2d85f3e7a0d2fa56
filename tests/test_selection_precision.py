"""Selection exactness with adversarial near-ties: the Triton selection with
``CONFIG["dot_precision"] = "ieee"`` under TRITON_INTERPRET=1 (fp32) picks the fp32 reference's
blocks, up to swaps of blocks whose reference scores agree with the K-th to 1e-6 relative; the
same inputs with the scores' operands rounded to TF32 (what tensor cores do by default) pick other
blocks in many rows, so these inputs do expose TF32 scoring. With ``CONFIG["operands"] = "fp16"``
the selection keeps the reference's blocks up to TF32-sized near-ties also where q and the keys
lie far outside fp16's range (scaled by powers of two that leave the scores unchanged). The kernel
runs in a fresh subprocess: TRITON_INTERPRET must be set before triton is imported."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def near_tie_inputs(seed, b=1, t=256, hq=4, h=2, d=64, bs=16, spread=2e-3):
    """Keys whose block means all sit within ``spread`` of one common mean: every row's scores
    are near-ties (relative gaps ~1e-4), far above fp32 rounding, below TF32's (~1e-3)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, hq, d, generator=g) * 2.0
    base = torch.randn(b, 1, h, d, generator=g) * 1.5
    k = base + spread * torch.randn(b, t, h, d, generator=g)
    return q, k


def _tf32(x):
    """Round fp32 to TF32 (10 mantissa bits, nearest even), as tensor cores read fp32 operands."""
    import torch
    bits = x.contiguous().view(torch.int32)
    bias = ((bits >> 13) & 1) + 0xFFF
    return ((bits + bias) & ~0x1FFF).view(torch.float32)


def _agreement(idx, want, scores):
    """(fraction of rows equal as sets, worst relative gap of a swapped block to the K-th score)."""
    import torch
    same = (torch.sort(idx, -1).values == torch.sort(want, -1).values).all(-1)
    worst = 0.0
    for bi, ti, hi in (~same).nonzero().tolist():
        row = scores[bi, ti, hi]
        chosen = want[bi, ti, hi][want[bi, ti, hi] >= 0].long()
        kth = row[chosen].min().item()
        for blk in (set(idx[bi, ti, hi].tolist()) ^ set(want[bi, ti, hi].tolist())) - {-1}:
            worst = max(worst, abs(row[blk].item() - kth) / abs(kth))
    return float(same.float().mean()), worst


def child():
    import torch
    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_selection as tsel
    from ssa_megatron.ops.kernel_config import override_config
    bs, kc, out = 16, 6, {}
    for seed in (1,):
        q, k = near_tie_inputs(seed)
        want = ref.select_blocks(q, k, bs, kc)
        scores = ref.block_scores(q, k, bs)
        with override_config(tsel.CONFIG, dot_precision="ieee"):
            got = tsel.select_blocks(q, k, bs, kc)
        pooled = _tf32(ref.mean_pool_blocks(k, bs))
        tf32 = ref.select_blocks_from_pooled(_tf32(q), pooled, 0, q.shape[1], bs, kc)
        out[seed] = {"ieee": _agreement(got, want, scores), "tf32": _agreement(tf32, want, scores),
                     "slot0": bool(torch.equal(got[..., 0], want[..., 0]))}
    # fp16 operands on the near-tie inputs: the swaps stay within TF32-sized gaps
    q, k = near_tie_inputs(1)
    with override_config(tsel.CONFIG, operands="fp16"):
        got = tsel.select_blocks(q, k, bs, kc)
    out["fp16_near_ties"] = {"agree": _agreement(got, ref.select_blocks(q, k, bs, kc),
                                                 ref.block_scores(q, k, bs)),
                             "slot0": True}
    g = torch.Generator().manual_seed(5)
    for hq, h, d, score in ((8, 2, 64, "mean"), (8, 2, 32, "sub4")):
        q = torch.randn(1, 256, hq, d, generator=g)
        k = torch.randn(1, 256, h, d, generator=g)
        want = ref.select_blocks(q, k, bs, kc, score=score)
        scores = ref.block_scores(q, k, bs, score=score)
        for name, (qs, ks) in {"fp16": (1.0, 1.0), "fp16_big_q": (2.0 ** 24, 2.0 ** -24),
                               "fp16_big_k": (2.0 ** -24, 2.0 ** 24)}.items():
            with override_config(tsel.CONFIG, operands="fp16"):
                got = tsel.select_blocks(q * qs, k * ks, bs, kc, score=score)
            out[f"{name} {score}"] = {"agree": _agreement(got, want, scores),
                                      "slot0": bool(torch.equal(got[..., 0], want[..., 0]))}
    try:
        with override_config(tsel.CONFIG, operands="fp16", dot_precision="ieee"):
            tsel.select_blocks(*near_tie_inputs(0, t=32), bs, kc)
        out["refused_fp16"] = ""
    except ValueError as e:
        out["refused_fp16"] = str(e)
    try:
        with override_config(tsel.CONFIG, dot_precision="fp64"):
            tsel.select_blocks(*near_tie_inputs(0, t=32), bs, kc)
        out["refused"] = ""
    except ValueError as e:
        out["refused"] = str(e)
    print("RESULT " + json.dumps(out))


def test_exact_precision_selection_on_near_ties():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert "dot_precision" in res.pop("refused")
    assert "operands" in res.pop("refused_fp16")
    near = res.pop("fp16_near_ties")["agree"]
    assert near[1] <= 3e-3, near  # the TF32 emulation's swaps reach 1.5e-3 on these inputs
    for name in [n for n in res if n.startswith("fp16")]:
        r = res.pop(name)
        same, worst = r["agree"]
        assert r["slot0"] and same >= 0.98 and worst <= 2e-3, (name, r)
    for seed, r in res.items():
        same, worst = r["ieee"]
        assert r["slot0"] and same >= 0.99 and worst <= 1e-6, (seed, r)
        assert r["tf32"][0] < 0.9 and r["tf32"][1] > 1e-5, (seed, r)  # the inputs do bite


if __name__ == "__main__":
    child()
