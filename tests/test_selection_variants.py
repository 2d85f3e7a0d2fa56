"""The evaluation-only block selections (ops/selection_variants.py) against brute force: the
oracle keeps the blocks of most full-attention mass, recentN keeps the N latest blocks and fills
the rest by SSA's scores, moment2 and quest score blocks from key statistics; all per document."""
import math

import pytest
import torch

from ssa_megatron.ops import reference as R
from ssa_megatron.ops.reference import sub_block_logits
from ssa_megatron.ops.selection_variants import (parse_selection, quest_logits, quest_scores,
                                                 select_blocks_with, selection_names_error)


def _inputs(b=2, t=100, h=2, g=3, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h * g, d, generator=gen) * 2
    k = torch.randn(b, t, h, d, generator=gen) * 2
    return q, k


def _block_mass(q, k, bs):
    """[B, T, H, nb] group-summed full-attention mass per block, from the dense matrix (float64)."""
    b, t, hq, d = q.shape
    h = k.shape[2]
    g = hq // h
    logits = torch.einsum("bihd,bjhd->bhij", q.double(), k.repeat_interleave(g, 2).double()) / math.sqrt(d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)  # [B, HQ, T, T]
    nb = -(-t // bs)
    p = torch.nn.functional.pad(p, (0, nb * bs - t)).reshape(b, hq, t, nb, bs).sum(-1)
    return p.reshape(b, h, g, t, nb).sum(2).permute(0, 2, 1, 3)


def _sets(idx):
    return [[set(x for x in row.tolist() if x >= 0) for row in tok] for tok in idx[0]]


@pytest.mark.parametrize("K", [1, 3, 5])
def test_oracle_keeps_the_blocks_of_most_attention_mass(K):
    bs = 16
    q, k = _inputs()
    idx = select_blocks_with("oracle", q, k, bs, K)
    mass = _block_mass(q, k, bs)
    b, t, h, _ = idx.shape
    for bi in range(b):
        for ti in range(t):
            cur = ti // bs
            for hi in range(h):
                row = idx[bi, ti, hi].tolist()
                assert row[0] == cur  # slot 0: the current block
                past = sorted(range(cur), key=lambda i: (-float(mass[bi, ti, hi, i]), i))
                want = {cur, *past[:K - 1]}
                got = {x for x in row if x >= 0}
                assert got == want, (bi, ti, hi)
                assert row.count(-1) == K - len(want)
    # its kept mass is never below SSA's pooled selection's
    pooled = R.select_blocks(q, k, bs, K)

    def kept(ix):
        return (mass.gather(-1, ix.long().clamp(min=0)) * (ix >= 0)).sum(-1)
    assert bool((kept(idx) >= kept(pooled) - 1e-9).all())
    assert bool((kept(idx) > kept(pooled) + 1e-6).any()) == (K > 1)  # K = 1: the current block only


@pytest.mark.parametrize("N", [2, 3])
def test_recent_keeps_the_latest_blocks_and_fills_by_ssa_scores(N):
    bs, K = 8, 5
    q, k = _inputs(t=96, g=2)
    idx = select_blocks_with(f"recent{N}", q, k, bs, K)
    scores = R.block_scores(q, k, bs)  # SSA's: current +inf, incomplete/future -inf
    for bi in range(q.shape[0]):
        for ti in range(q.shape[1]):
            cur = ti // bs
            for hi in range(k.shape[2]):
                got = {x for x in idx[bi, ti, hi].tolist() if x >= 0}
                recent = set(range(max(0, cur - N + 1), cur + 1))
                rest = sorted((i for i in range(cur) if i not in recent),
                              key=lambda i: (-float(scores[bi, ti, hi, i]), i))
                assert got == recent | set(rest[:K - len(recent)]), (bi, ti, hi)
    # a budget of at most N blocks is the sliding window of the latest ones
    window = select_blocks_with("recent8", q, k, bs, 3)
    for ti in range(q.shape[1]):
        cur = ti // bs
        assert set(window[0, ti, 0].tolist()) - {-1} == set(range(max(0, cur - 2), cur + 1))
    # recent1 is SSA's selection itself, slot for slot
    assert torch.equal(select_blocks_with("recent1", q, k, bs, K), R.select_blocks(q, k, bs, K))
    assert not torch.equal(idx, R.select_blocks(q, k, bs, K))


def _statistic_logits(q, k, bs, kind):
    """[B, T, H, G, nb] per-head block logits of moment2 / quest / sub2, one (token, head, block)
    at a time in float64, from the block's keys themselves."""
    b, t, hq, d = q.shape
    h = k.shape[2]
    g, nb, s = hq // h, t // bs, 1 / math.sqrt(d)
    out = torch.zeros(b, t, h, g, nb, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for n in range(nb):
                keys = k[bi, n * bs:(n + 1) * bs, hi].double()  # [bs, D]
                for gi in range(g):
                    qs = q[bi, :, hi * g + gi].double() * s  # [T, D]
                    if kind == "moment2":
                        mu = keys.mean(0)
                        var = ((keys - mu) ** 2).mean(0)
                        out[bi, :, hi, gi, n] = qs @ mu + 0.5 * (qs * qs) @ var
                    elif kind == "sub2":  # log of the mean exp over the two half-block means
                        halves = torch.stack([keys[: bs // 2].mean(0), keys[bs // 2:].mean(0)])
                        out[bi, :, hi, gi, n] = torch.log(torch.exp(qs @ halves.T).mean(1))
                    else:
                        hi_d, lo_d = keys.max(0).values, keys.min(0).values
                        out[bi, :, hi, gi, n] = torch.stack([torch.maximum(x * hi_d, x * lo_d).sum()
                                                             for x in qs])
    return out


@pytest.mark.parametrize("kind", ["moment2", "quest", "sub2"])
def test_statistic_selections_against_the_blocks_keys(kind):
    bs, K = 8, 4
    q, k = _inputs(t=75, g=2, seed=5)  # 9 complete blocks and a partial one
    logits = _statistic_logits(q, k, bs, kind)
    nb_all = -(-q.shape[1] // bs)
    want = R.group_block_scores(logits.float(), 0, bs, nb_all)
    got = {"quest": lambda: quest_scores(q, k, 0, bs, None),
           "moment2": lambda: R.chunk_scores(q, k, 0, bs, None, score="moment2"),
           "sub2": lambda: R.group_block_scores(sub_block_logits(q, k, bs, 2, None), 0, bs, nb_all),
           }[kind]()
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and torch.equal(want[~finite], got[~finite])
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)
    assert torch.equal(select_blocks_with(kind, q, k, bs, K), R.top_blocks(got, K))
    assert not torch.equal(select_blocks_with(kind, q, k, bs, K), R.select_blocks(q, k, bs, K))
    if kind == "moment2":  # the model's own selection when it trained with moment2; "mean" stays SSA's
        assert torch.equal(select_blocks_with("pooled", q, k, bs, K, score="moment2"),
                           R.top_blocks(got, K))
        assert torch.equal(select_blocks_with("mean", q, k, bs, K, score="moment2"),
                           R.select_blocks(q, k, bs, K))
        assert torch.equal(R.select_blocks(q, k, bs, K, score="moment2"), R.top_blocks(got, K))
    s = 1 / math.sqrt(q.shape[-1])
    nb = q.shape[1] // bs
    if kind == "quest":  # the production logits bound every key's logit in the block
        kk = k[:, :nb * bs].double().reshape(2, nb, bs, 2, -1)
        qq = q.double().reshape(2, 75, 2, 2, -1) * s
        best = torch.einsum("bthgd,bnjhd->bthgnj", qq, kk).amax(-1)
        assert bool((quest_logits(q, k, bs, None).double() >= best - 1e-5).all())
    elif kind == "moment2":  # closer than the mean alone to log mean_j exp(s q.k_j), the block's attention share,
        # where logits spread by about one (far wider, no moment of a block of 8 keys helps)
        q, k = q / 2, k / 2
        kk = k[:, :nb * bs].double().reshape(2, nb, bs, 2, -1)
        qq = q.double().reshape(2, 75, 2, 2, -1)
        stats = R.pooled_selection_keys(k.double(), bs, "moment2")
        q2, pooled2 = R.moment2_operands(q.double(), *stats, s)
        moment2 = s * torch.einsum("bthgd,bnhd->bthgn", q2.double().reshape(2, 75, 2, 2, -1), pooled2.double())
        exact = torch.logsumexp(s * torch.einsum("bthgd,bnjhd->bthgnj", qq, kk), -1) - math.log(bs)
        first = s * torch.einsum("bthgd,bnhd->bthgn", qq, kk.mean(2))
        assert (moment2 - exact).abs().mean() < 0.5 * (first - exact).abs().mean()


def test_sub_block_scores_run_from_ssa_to_the_attention_itself():
    """sub1 is SSA's mean score; at N = block size the score is each head's exact attention share
    per complete past block (every key its own sub-block), summed over the group."""
    bs, K = 8, 4
    q, k = _inputs(t=75, g=2, seed=6)
    nb_all = -(-q.shape[1] // bs)
    assert _sets(select_blocks_with("sub1", q, k, bs, K)) == _sets(R.select_blocks(q, k, bs, K))
    got = R.group_block_scores(sub_block_logits(q, k, bs, bs, None), 0, bs, nb_all)
    s, nb = 1 / math.sqrt(q.shape[-1]), q.shape[1] // bs
    kk = k[:, :nb * bs].double().reshape(2, nb * bs, 2, -1)
    qq = q.double().reshape(2, 75, 2, 2, -1) * s
    logits = torch.einsum("bthgd,bjhd->bthgj", qq, kk)  # [B, T, H, G, keys of complete blocks]
    pos = torch.arange(75)
    seen = torch.arange(nb * bs)[None, :] < ((pos + 1) // bs * bs)[:, None]  # complete blocks only
    probs = torch.softmax(logits.masked_fill(~seen[None, :, None, None, :], float("-inf")), -1)
    share = probs.nan_to_num(0.0).reshape(2, 75, 2, 2, nb, bs).sum((3, 5))  # [B, T, H, nb]
    finite = torch.isfinite(got[..., :nb])
    torch.testing.assert_close(got[..., :nb][finite], share.float()[finite], rtol=1e-5, atol=1e-6)
    assert torch.equal(select_blocks_with(f"sub{bs}", q, k, bs, K), R.top_blocks(got, K))
    assert not torch.equal(select_blocks_with(f"sub{bs}", q, k, bs, K), R.select_blocks(q, k, bs, K))
    with pytest.raises(ValueError, match="sub3: N must divide the block size 8"):
        select_blocks_with("sub3", q, k, bs, K)
    assert selection_names_error(["sub4", "sub3"], bs) == "sub3: N must divide the block size 8"
    assert selection_names_error(["sub16"], bs) == "sub16: N must divide the block size 8"
    assert selection_names_error(["sub3"]) is None  # the block size is not known yet


@pytest.mark.parametrize("selection", ["oracle", "recent3", "moment2", "quest", "mean", "sub2"])
def test_variants_keep_packed_documents_apart(selection):
    bs, K = 8, 3
    q, k = _inputs(b=1, t=90, seed=3)
    cu = torch.tensor([0, 37, 90])
    packed = select_blocks_with(selection, q, k, bs, K, cu_seqlens=cu)
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = select_blocks_with(selection, q[:, a:e], k[:, a:e], bs, K)
        assert torch.equal(packed[:, a:e], alone)


def test_a_budget_covering_the_context_selects_every_block():
    bs = 16
    q, k = _inputs(t=64)
    every = R.select_blocks(q, k, bs, 4)
    for name in ("oracle", "recent2", "pooled", "moment2", "quest", "sub4"):
        assert _sets(select_blocks_with(name, q, k, bs, 4)) == _sets(every)


def test_unknown_selection_names_are_refused_in_one_line():
    assert parse_selection("recent12") == ("recent", 12)
    assert parse_selection("sub4") == ("sub", 4)
    assert parse_selection("oracle") == ("oracle", 0)
    for bad in ("recent0", "recent", "topk", "Oracle", "sub0", "sub"):
        with pytest.raises(ValueError, match="use pooled, mean, oracle, moment2, quest, recentN .* or subN"):
            parse_selection(bad)


def test_the_selection_scores_are_one_list():
    from ssa_megatron.model.shape import SELECTION_SCORES
    assert R.SELECTION_SCORES == SELECTION_SCORES
    with pytest.raises(ValueError, match="use one of mean, moment2"):
        R.select_blocks(*_inputs(t=32), 16, 2, score="max")


def test_recent_blocks_fill_by_the_models_own_score():
    bs, K = 8, 5
    q, k = _inputs(t=96, g=2, seed=7)
    k = k * torch.rand(k.shape, generator=torch.Generator().manual_seed(8))
    own = select_blocks_with("recent2", q, k, bs, K, score="moment2")
    assert not torch.equal(own, select_blocks_with("recent2", q, k, bs, K))
    scores = R.block_scores(q, k, bs, score="moment2")
    for ti in range(bs * 2, q.shape[1], 7):
        cur = ti // bs
        recent = {cur - 1, cur}
        rest = sorted((i for i in range(cur) if i not in recent),
                      key=lambda i: (-float(scores[0, ti, 0, i]), i))
        assert set(own[0, ti, 0].tolist()) - {-1} == recent | set(rest[:K - 2])


def test_sub_block_scores_reach_the_selection_kernel(monkeypatch):
    """A model trained with --ssa-selection-score sub4 selects through ops.dispatch: where the
    Triton kernel runs, the subN score reaches it (its interpreter tests compare it with the
    reference, tests/test_triton_kernels.py); the kernel refuses sub-blocks that do not split a
    block before launching anything."""
    from ssa_megatron.ops import dispatch, triton_selection
    q, k = _inputs(b=1, t=96, g=2, seed=11)
    cu = torch.tensor([0, 40, 96], dtype=torch.int32)
    want = R.select_blocks(q, k, 8, 3, cu, score="sub4")
    assert not torch.equal(want, R.select_blocks(q, k, 8, 3, cu))  # not the mean score's blocks
    for start, end in ((0, 40), (40, 96)):  # each document alone
        assert torch.equal(want[:, start:end], R.select_blocks(q[:, start:end], k[:, start:end], 8, 3,
                                                               score="sub4"))
    seen = []
    monkeypatch.setattr(dispatch, "use_triton", lambda *a, **kw: True)
    monkeypatch.setattr(triton_selection, "select_blocks",
                        lambda *a: seen.append(a[-1]) or R.select_blocks(*a))
    assert torch.equal(dispatch.select_blocks(q, k, 8, 3, cu, score="sub4"), want)
    assert seen == ["sub4"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="sub4: N must divide the block size 2"):
        triton_selection.select_blocks(q, k, 2, 3, cu, score="sub4")


def test_sub_block_selection_bounds_its_query_chunks_by_memory(monkeypatch):
    """The trainer's sub4 selection holds N logits per block for every query head: its query
    chunks follow query_chunk_rows (not the fixed 1024 rows), with the same blocks as one pass;
    a misspelt score is named before any routing."""
    from ssa_megatron.ops import dispatch
    q, k = _inputs(b=2, t=96, g=2, seed=12)
    whole = R.top_blocks(R.chunk_scores(q, k, 0, 8, None, "sub4"), 3)
    seen = []
    chunk_scores = R.chunk_scores
    monkeypatch.setattr(R, "chunk_scores", lambda qc, *a: seen.append(qc.shape[1]) or chunk_scores(qc, *a))
    monkeypatch.setattr(R, "query_chunk_rows", lambda b, hq, keys: 20 if (b, hq, keys) == (2, 4, 48) else 0)
    assert torch.equal(R.select_blocks(q, k, 8, 3, score="sub4"), whole)
    assert seen == [20, 20, 20, 20, 16]
    with pytest.raises(ValueError, match="unknown selection score 'subx'"):
        dispatch.select_blocks(q, k, 8, 3, score="subx")
