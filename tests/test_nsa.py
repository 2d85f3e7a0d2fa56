"""NSA baseline: each branch against brute force, the model in nsa mode, TP=2 vs TP=1."""
import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_workers
from ssa_megatron.ops import nsa
from ssa_megatron.ops import reference as R

PACKED = [0, 7, 40, 75]  # a 7-token document has no complete block of 8


def _inputs(B, T, G, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H * G, D, generator=g)
    k = torch.randn(B, T, H, D, generator=g)
    v = torch.randn(B, T, H, D, generator=g)
    return q, k, v, torch.randn(B, T, H * G, D, generator=g)


def _case(G, packed):
    B, T = (1, PACKED[-1]) if packed else (2, 64)
    cu = torch.tensor(PACKED, dtype=torch.int32) if packed else None
    return (*_inputs(B, T, G, seed=10 * G + packed), cu)


def _grads(fn, q, k, v, do):
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = fn(*xs)
    gs = torch.autograd.grad(out, xs, do)
    return out.detach(), gs


def _assert_same(a, b):
    (oa, ga), (ob, gb) = a, b
    torch.testing.assert_close(oa, ob, rtol=1e-4, atol=1e-5)
    for x, y, name in zip(ga, gb, "qkv"):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def _starts(T, cu):
    bounds = cu.tolist() if cu is not None else [0, T]
    return [max(a for a in bounds[:-1] if a <= t) for t in range(T)]


def dense_attention(q, k, v, mask):
    """Brute force: explicit softmax over a boolean [T, T] mask with GQA (every row non-empty)."""
    G = q.shape[2] // k.shape[2]
    kh = k.repeat_interleave(G, 2)
    vh = v.repeat_interleave(G, 2)
    logits = torch.einsum("bthd,bshd->bhts", q, kh) / math.sqrt(q.shape[-1])
    p = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("bhts,bshd->bthd", p, vh)


def brute_compression(q, k, v, bs, cu):
    """Per token: attention over explicitly pooled keys/values of its complete past blocks."""
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    starts = _starts(T, cu)
    out = []
    for t in range(T):
        a = starts[t]
        n = (t - a + 1) // bs
        if n == 0:
            out.append(torch.zeros_like(q[:, t]))
            continue
        pk = torch.stack([k[:, a + i * bs:a + (i + 1) * bs].mean(1) for i in range(n)], 1)  # [B,n,H,D]
        pv = torch.stack([v[:, a + i * bs:a + (i + 1) * bs].mean(1) for i in range(n)], 1)
        pk, pv = pk.repeat_interleave(G, 2), pv.repeat_interleave(G, 2)
        p = torch.softmax(torch.einsum("bhd,bnhd->bhn", q[:, t], pk) / math.sqrt(D), -1)
        out.append(torch.einsum("bhn,bnhd->bhd", p, pv))
    return torch.stack(out, 1)


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("G,packed", [(1, False), (4, False), (2, True), (8, True)])
def test_compression_equals_explicit_pooled_attention(G, packed, impl):
    q, k, v, do, cu = _case(G, packed)
    got = _grads(lambda a, b, c: nsa.compression_attention(a, b, c, 8, cu, impl=impl), q, k, v, do)
    want = _grads(lambda a, b, c: brute_compression(a, b, c, 8, cu), q, k, v, do)
    _assert_same(got, want)
    # convention: tokens without a complete block get zero output
    for t, a in enumerate(_starts(q.shape[1], cu)):
        if t - a + 1 < 8:
            assert got[0][:, t].abs().max() == 0


@pytest.mark.parametrize("G,packed", [(2, False), (4, True)])
def test_selection_scores_are_the_compression_probabilities(G, packed):
    """SSA's select_blocks == top-k of the group-summed compression probabilities (current forced)."""
    q, k, v, _, cu = _case(G, packed)
    bs, K = 8, 3
    _, probs = nsa.compression_attention(q, k, v, bs, cu, impl="reference", return_probs=True)
    B, T, HQ, _ = probs.shape
    H = HQ // G
    idx = R.select_blocks(q, k, bs, K, cu)
    scores = probs.reshape(B, T, H, G, -1).sum(3)
    for t, a in enumerate(_starts(T, cu)):
        n, cur = (t - a + 1) // bs, (t - a) // bs
        for b in range(B):
            for h in range(H):
                s = scores[b, t, h, :n]
                assert s.sum() == pytest.approx(G if n else 0, rel=1e-5)  # rows are distributions
                order = [cur] + [int(i) for i in torch.argsort(s, descending=True) if int(i) != cur]
                got = {int(i) for i in idx[b, t, h] if i >= 0}
                assert got == set(order[:K]), (b, t, h)


@pytest.mark.parametrize("G,packed", [(1, False), (4, True)])
def test_selection_branch_equals_dense_selection_mask(G, packed):
    q, k, v, do, cu = _case(G, packed)
    bs, K = 8, 2
    idx = R.select_blocks(q, k, bs, K, cu)
    mask = R.selection_mask(idx, bs, q.shape[1], cu).repeat_interleave(G, 1)
    got = _grads(lambda a, b, c: nsa.selection_attention(a, b, c, bs, K, cu, impl="reference"),
                 q, k, v, do)
    _assert_same(got, _grads(lambda a, b, c: dense_attention(a, b, c, mask), q, k, v, do))


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
@pytest.mark.parametrize("G,packed,window,chunk", [(1, False, 5, None), (2, False, 16, 7),
                                                   (4, True, 9, None), (8, True, 100, None),
                                                   (2, True, 1, 4)])
def test_sliding_window_equals_dense_band_mask(G, packed, window, chunk, impl):
    q, k, v, do, cu = _case(G, packed)
    T = q.shape[1]
    i = torch.arange(T)
    mask = R.causal_segment_mask(T, cu, q.device) & (i[:, None] - i[None, :] < window)
    got = _grads(lambda a, b, c: nsa.sliding_window_attention(a, b, c, window, cu, impl=impl,
                                                              chunk=chunk), q, k, v, do)
    _assert_same(got, _grads(lambda a, b, c: dense_attention(a, b, c, mask), q, k, v, do))


def test_gated_sum_of_branches():
    q, k, v, _, cu = _case(2, True)
    gates = torch.rand(*q.shape[:3], 3)
    outs = nsa.nsa_branches(q, k, v, 8, 2, 12, cu, impl="reference")
    want = sum(o * gates[..., i:i + 1] for i, o in enumerate(outs))
    torch.testing.assert_close(nsa.nsa_attention(q, k, v, gates, 8, 2, 12, cu, impl="reference"), want)
    torch.testing.assert_close(nsa.nsa_attention(q, k, v, gates, 8, 2, 12, cu, impl="sdpa"), want,
                               rtol=1e-4, atol=1e-5)


def test_model_has_three_gates_per_head(single_process_parallel_state, monkeypatch):
    from model_utils import build_tiny_model, random_batches, tiny_args
    from ssa_megatron.model.nsa_attention import NSACoreAttention, NSASelfAttention
    args = tiny_args("--attention-mode", "nsa", "--nsa-window-size", "24")
    model = build_tiny_model(args)
    attn = [m for m in model.modules() if isinstance(m, NSASelfAttention)]
    assert len(attn) == args.num_layers
    assert attn[0].linear_gate.weight.shape == (3 * args.num_attention_heads, args.hidden_size)
    assert isinstance(attn[0].core_attention, NSACoreAttention)
    assert attn[0].core_attention.window_size == 24
    # gate row 3 * h + i drives branch i (compression, selection, window) of query head h
    seen = {}
    attn[0].linear_gate.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]) or None)
    real = nsa.nsa_attention

    def spy(q, k, v, gates, *a, **kw):
        seen.setdefault("gates", gates)
        return real(q, k, v, gates, *a, **kw)

    monkeypatch.setattr(nsa, "nsa_attention", spy)
    batch = random_batches(1)[0]
    model.eval()
    with torch.no_grad():
        model(batch["tokens"], batch["position_ids"], None)
    w = attn[0].linear_gate.weight
    want = torch.sigmoid(seen["x"] @ w.t()).transpose(0, 1)  # [b, s, 3 * heads]
    want = want.reshape(*want.shape[:2], args.num_attention_heads, 3)
    torch.testing.assert_close(seen["gates"], want)


def test_nsa_flags_are_checked():
    from model_utils import tiny_args
    with pytest.raises(ValueError, match="nsa-window-size"):
        tiny_args("--attention-mode", "nsa", "--nsa-window-size", "0")


COMMON = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
          "--num-attention-heads", "8", "--num-query-groups", "2", "--seq-length", "64",
          "--ssa-block-counts", "2", "--micro-batch-size", "4", "--global-batch-size", "4",
          "--log-interval", "1", "--split", "100,0,0", "--num-workers", "0",
          "--attention-mode", "nsa", "--nsa-window-size", "24"]


def test_tiny_nsa_model_trains_and_loss_falls(tmp_path, random_dataset):
    flags = COMMON + ["--data-path", random_dataset, "--train-iters", "25", "--lr", "3e-3",
                      "--lr-warmup-iters", "2", "--reset-attention-mask"]
    res = run_workers("train", 1, str(tmp_path / "train"), *flags)
    losses = res["lm_loss"]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    assert all(math.isnan(a) for a in res["align_loss"])  # no alignment loss in nsa mode


def test_tensor_parallel_matches_single_process(tmp_path):
    one = run_workers("nsa_workers:nsa_grads", 1, str(tmp_path / "tp1"), "1")
    two = run_workers("nsa_workers:nsa_grads", 2, str(tmp_path / "tp2"), "2")
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)
    assert one["grads"].keys() == two["grads"].keys()
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
        if "linear_qkv" in name or "linear_gate" in name:
            assert g.abs().sum() > 0, name
    # every gate (3 per head) gets a gradient, in the [head: cmp, slc, swa] layout
    gate = one["grads"]["decoder.layers.0.self_attention.linear_gate.weight"]
    assert gate.shape[0] == 3 * 8 and (gate.abs().sum(1) > 0).all()


def test_pipeline_parallel_matches_single_process(tmp_path, random_dataset):
    flags = COMMON + ["--data-path", random_dataset, "--train-iters", "2", "--num-layers", "4",
                      "--micro-batch-size", "1", "--global-batch-size", "4", "--zero-stage", "0",
                      "--lr", "2e-3", "--adam-eps", "1e-4"]  # as test_pipeline (grad norm < clip)
    one = run_workers("pipeline_workers:train_and_gather", 1, str(tmp_path / "pp1"), *flags)
    pp2 = run_workers("pipeline_workers:train_and_gather", 2, str(tmp_path / "pp2"), *flags,
                      "--pipeline-model-parallel-size", "2")
    assert pp2["lm_loss"] == pytest.approx(one["lm_loss"], rel=1e-5)
    assert one["first_grads"].keys() == pp2["first_grads"].keys()
    for name, g in one["first_grads"].items():
        torch.testing.assert_close(pp2["first_grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
    for layer in range(4):
        g = pp2["first_grads"][f"decoder.layers.{layer}.self_attention.linear_gate.weight"]
        assert g.shape[0] == 24 and g.abs().sum() > 0
    for name, w in one["weights"].items():
        torch.testing.assert_close(pp2["weights"][name], w, rtol=1e-4, atol=1e-6, msg=name)
