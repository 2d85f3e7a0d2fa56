"""The reference ops against brute force: dense masks and per-token loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssa_megatron.ops import reference as R


def brute_force_selection(q, k, bs, K):
    """Per token and kv head, in plain loops: the set of selected blocks."""
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    out = {}
    for b in range(B):
        for t in range(T):
            n_complete = (t + 1) // bs
            cur = t // bs
            for h in range(H):
                scores = torch.zeros(max(n_complete, 1), dtype=torch.float64)
                if n_complete:
                    pooled = torch.stack([k[b, i * bs:(i + 1) * bs, h].double().mean(0) for i in range(n_complete)])
                    for g in range(G):
                        logits = pooled @ q[b, t, h * G + g].double() / math.sqrt(D)
                        scores += torch.softmax(logits, 0)
                cands = [(float("inf"), cur)] + [(float(scores[i]), i) for i in range(n_complete) if i != cur]
                cands.sort(key=lambda x: (-x[0], x[1]))
                out[(b, t, h)] = {i for _, i in cands[:K]}
    return out


def dense_masked_attention(q, k, v, mask):
    """SDPA with an explicit boolean [B, H, T, T] mask expanded over the query groups."""
    G = q.shape[2] // k.shape[2]
    m = mask.repeat_interleave(G, dim=1)
    kh = k.transpose(1, 2).repeat_interleave(G, 1)
    vh = v.transpose(1, 2).repeat_interleave(G, 1)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kh, vh, attn_mask=m).transpose(1, 2)


@pytest.mark.parametrize("G,T,K", [(1, 64, 2), (4, 80, 3), (8, 96, 4), (16, 48, 2)])
def test_selection_equals_brute_force(G, T, K):
    torch.manual_seed(G * 100 + T)
    H, D, bs = 2, 16, 16
    q = torch.randn(2, T, H * G, D)
    k = torch.randn(2, T, H, D)
    idx = R.select_blocks(q, k, bs, K)
    expected = brute_force_selection(q, k, bs, K)
    for (b, t, h), blocks in expected.items():
        got = {int(i) for i in idx[b, t, h] if i >= 0}
        assert got == blocks, (b, t, h, got, blocks)
        assert int(idx[b, t, h, 0]) == t // bs  # current block first
        assert len(got) == min(K, t // bs + 1)


@pytest.mark.parametrize("G", [1, 2, 4, 8, 16])
def test_sparse_attention_equals_dense_mask(G):
    torch.manual_seed(G)
    B, T, H, D, bs, K = 2, 80, 2, 16, 16, 3
    q = torch.randn(B, T, H * G, D, requires_grad=True)
    k = torch.randn(B, T, H, D, requires_grad=True)
    v = torch.randn(B, T, H, D, requires_grad=True)
    idx = R.select_blocks(q, k, bs, K)
    out = R.sparse_attention(q, k, v, idx, bs)
    ref = dense_masked_attention(q, k, v, R.selection_mask(idx, bs, T))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), grad)
    g2 = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_full_budget_sparse_equals_full_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 64, 8, 16), torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 16)
    idx = R.select_blocks(q, k, 16, 4)
    torch.testing.assert_close(R.sparse_attention(q, k, v, idx, 16), R.full_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_selection_mask_is_causal_and_block_shaped():
    torch.manual_seed(1)
    q, k = torch.randn(1, 64, 4, 8), torch.randn(1, 64, 2, 8)
    idx = R.select_blocks(q, k, 16, 2)
    mask = R.selection_mask(idx, 16, 64)
    assert not mask.triu(1).any()
    assert mask.diagonal(dim1=2, dim2=3).all()  # every token sees itself (current block)
    assert (mask.sum(-1) <= 2 * 16).all()


def test_packed_documents_are_independent():
    torch.manual_seed(2)
    T, cut = 100, 37
    q, k, v = torch.randn(1, T, 8, 16), torch.randn(1, T, 2, 16), torch.randn(1, T, 2, 16)
    cu = torch.tensor([0, cut, T])
    idx = R.select_blocks(q, k, 16, 3, cu_seqlens=cu)
    sparse = R.sparse_attention(q, k, v, idx, 16, cu_seqlens=cu)
    full = R.full_attention(q, k, v, cu_seqlens=cu)
    for a, b in ((0, cut), (cut, T)):
        idx_alone = R.select_blocks(q[:, a:b], k[:, a:b], 16, 3)
        assert torch.equal(idx[:, a:b], idx_alone)
        torch.testing.assert_close(sparse[:, a:b], R.sparse_attention(q[:, a:b], k[:, a:b], v[:, a:b], idx_alone, 16))
        torch.testing.assert_close(full[:, a:b], R.full_attention(q[:, a:b], k[:, a:b], v[:, a:b]))


def test_alignment_loss_value_and_stop_gradients():
    torch.manual_seed(3)
    of = torch.randn(2, 16, 4, 8, requires_grad=True)
    osp = torch.randn(2, 16, 4, 8, requires_grad=True)
    loss = R.alignment_loss(of, osp)
    assert torch.allclose(loss, 2 * F.smooth_l1_loss(of, osp, beta=1.0))
    gf, gs = torch.autograd.grad(loss, (of, osp))
    # each side only sees its own term: d/dx SmoothL1(x, sg(y)) is the same for both sides
    expected_f = torch.autograd.grad(F.smooth_l1_loss(of, osp.detach()), of)[0]
    torch.testing.assert_close(gf, expected_f)
    torch.testing.assert_close(gs, -expected_f)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="not a multiple"):
        R.select_blocks(torch.randn(1, 32, 3, 8), torch.randn(1, 32, 2, 8), 16, 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        R.select_blocks(torch.randn(1, 32, 4, 8), torch.randn(1, 32, 2, 8), 16, 2,
                        cu_seqlens=torch.tensor([0, 10, 20]))
