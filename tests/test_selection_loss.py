"""The selection alignment loss (ops/selection_loss.py) against a per-row brute force in float64:
value and gradients (the target under stop-gradient), packed documents, rows left out."""
import math

import pytest
import torch

from ssa_megatron.ops.selection_loss import sample_rows, selection_alignment_loss


def _inputs(b=2, t=80, h=2, g=3, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, t, h * g, d, generator=gen) * 1.5).double().requires_grad_()
    k = (torch.randn(b, t, h, d, generator=gen) * 1.5).double().requires_grad_()
    return q, k


def brute_force(q, k, rows, bs, q_sel=None):
    """Per sequence, row and kv head, in loops: KL(sg(block mass) || mean_h softmax(q . mean K));
    with ``q_sel`` the scores take those queries (the mass stays q's)."""
    q_sel = q if q_sel is None else q_sel
    B, T, HQ, D = q.shape
    H = k.shape[2]
    G = HQ // H
    terms = []
    for b in range(B):
        for t in rows:
            n = (t + 1) // bs
            if n < 2:
                continue
            for h in range(H):
                pooled = torch.stack([k[b, i * bs:(i + 1) * bs, h].mean(0) for i in range(n)])
                mass, score = torch.zeros(n, dtype=q.dtype), torch.zeros(n, dtype=q.dtype)
                for j in range(G):
                    qh = q[b, t, h * G + j]
                    p = torch.softmax(k[b, :t + 1, h].detach() @ qh.detach() / math.sqrt(D), 0)
                    mass = mass + torch.stack([p[i * bs:(i + 1) * bs].sum() for i in range(n)]) / G
                    score = score + torch.softmax(pooled @ q_sel[b, t, h * G + j] / math.sqrt(D), 0) / G
                target = mass / mass.sum()
                terms.append((target * (target.log() - score.log())).sum())
    return torch.stack(terms).mean()


def test_value_and_gradients_equal_brute_force():
    bs = 8
    q, k = _inputs()
    rows = [7, 15, 16, 40, 79, 3]  # 7 and 3: fewer than two complete blocks, left out
    got = selection_alignment_loss(q, k, bs, torch.tensor(rows))
    want = brute_force(q, k, rows, bs)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    gq, gk = torch.autograd.grad(got, (q, k))
    wq, wk = torch.autograd.grad(want, (q, k))
    assert torch.allclose(gq, wq, rtol=1e-7, atol=1e-12) and torch.allclose(gk, wk, rtol=1e-7, atol=1e-12)
    # only the rows' queries get a gradient; keys past the last row's complete blocks get none
    assert gq[:, [0, 1, 2, 30]].abs().sum() == 0 and gq[:, 40].abs().sum() > 0
    assert gk[:, 80 // bs * bs:].abs().sum() == 0


def test_separate_selection_queries_take_the_gradient():
    """q_select (a learned selection map's queries): the scores use them, the target stays q's
    attention, and with q and k detached only q_select is trained."""
    bs = 8
    q, k = _inputs(seed=4)
    q_sel = (q.detach() * 0.5 + 0.1).requires_grad_()
    rows = [20, 47, 79]
    got = selection_alignment_loss(q.detach(), k.detach(), bs, torch.tensor(rows), q_select=q_sel)
    want = brute_force(q.detach(), k.detach(), rows, bs, q_sel=q_sel)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    assert got.item() != pytest.approx(brute_force(q, k, rows, bs).item(), rel=1e-3)
    (g,) = torch.autograd.grad(got, q_sel)
    (w,) = torch.autograd.grad(want, q_sel)
    assert torch.allclose(g, w, rtol=1e-7, atol=1e-12) and g.abs().sum() > 0


def test_packed_documents_are_scored_apart():
    bs = 8
    q, k = _inputs(b=1, t=90, seed=2)
    cu = torch.tensor([0, 37, 90])
    rows = torch.tensor([20, 36, 37, 52, 89])  # 37 starts document 2 (position 0 there: left out)
    got = selection_alignment_loss(q, k, bs, rows, cu_seqlens=cu)
    want = torch.stack([brute_force(q[:, :37], k[:, :37], [20, 36], bs) * 2,
                        brute_force(q[:, 37:], k[:, 37:], [52 - 37, 89 - 37], bs) * 2]).sum() / 4
    assert got.item() == pytest.approx(want.item(), rel=1e-9)


def test_training_on_it_moves_the_scores_towards_the_attention_mass():
    bs = 8
    q, k = _inputs(b=1, t=64, seed=5)
    q, k = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    rows = torch.arange(15, 64)
    before = selection_alignment_loss(q, k, bs, rows).item()
    opt = torch.optim.Adam([q, k], lr=0.05)
    for _ in range(40):
        opt.zero_grad()
        selection_alignment_loss(q, k, bs, rows).backward()
        opt.step()
    assert selection_alignment_loss(q, k, bs, rows).item() < 0.3 * before


def test_no_usable_row_gives_a_zero_that_keeps_the_graph():
    q, k = _inputs(t=20)
    loss = selection_alignment_loss(q, k, 16, torch.tensor([3, 19]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    rows = sample_rows(4096, 64, 16, generator=torch.Generator().manual_seed(1))
    assert rows.shape == (64,) and int(rows.min()) >= 31 and int(rows.max()) < 4096
    assert sample_rows(31, 64, 16).numel() == 0
