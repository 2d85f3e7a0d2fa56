"""The three Triton decode kernels (ops/triton_sparse_decode.py) against the reference
(reference.sparse_decode_attention: selection from the pooled keys, then attention over the
selected blocks), on the CPU under TRITON_INTERPRET=1 (fp32).

Cases: G 1/2/4/8/16, D 64/128, odd block counts, block counts above the number of past blocks,
a token that completes its block, a token before the first complete block, batch 2 with a
different position per sequence (the later tokens of the shorter one must not count), pooled
keys with more blocks than the position has completed (a cache's spare room), the block means
split over many programs, exact ties between blocks (the smaller block first); and the HF model
decoding through the kernels: greedy tokens equal those of the uncached forward pass.
"""
from __future__ import annotations

import json
import sys

import pytest

from interpreter_utils import InterpretedGroups, needs_triton

BS = 16

# (B, HQ, H, D, block size, cache tokens, positions (one per sequence), block_counts, split, ties)
CASES = [
    (1, 2, 2, 64, 16, 300, [299], 16, 4, False),  # G 1, 18 past blocks over 5 programs
    (1, 4, 2, 128, 16, 48, [47], 5, 2, False),  # G 2, the token completes its block
    (2, 8, 2, 128, 16, 251, [100, 250], 7, 4, False),  # G 4 (Llama), per-sequence positions
    (1, 8, 1, 64, 16, 10, [9], 4, 64, False),  # G 8, no complete block yet
    (1, 16, 1, 64, 16, 500, [499], 16, 64, True),  # G 16, tied blocks, one program
    (1, 4, 1, 64, 16, 200, [170], 3, 8, True),  # G 4, spare pooled blocks past the position
    (1, 6, 2, 64, 32, 400, [390], 4, 2, True),  # G 3, 32-token blocks, ties across programs
    (1, 8, 2, 64, 16, 90, [89], 1, 2, False),  # only the current block
]


# the interpreter group each test reads
GROUP_OF_TEST = {"test_decode_kernels_match_reference": "cases",
                 "test_decode_kernels_score_with_selection_queries_like_the_reference": "selection_queries",
                 "test_dispatch_takes_the_kernels_only_where_they_apply": "dispatch",
                 "test_model_decodes_through_the_kernels_like_the_uncached_pass": "model",
                 "test_moment2_and_sub4_models_decode_through_the_kernels_like_the_uncached_pass": "model_variants",
                 "test_benchmark_kernel_check_passes_on_the_kernels": "bench_check"}


INTERPRETED = InterpretedGroups(__file__, GROUP_OF_TEST.get)
interpreted = INTERPRETED.fixture()


@needs_triton
def test_decode_kernels_match_reference(interpreted):
    rows = interpreted.rows("cases")
    assert len(rows) == len(CASES)
    for row in rows:
        assert row["ok"], row


# (HQ, H, D, cache tokens, position, block_counts, split, kind): the scoring kernels take other
# queries than the attention: a selection map's (width D), or moment2's operands (width 2 D);
# or other pooled keys: subN's N sub-block means per block
SELECTION_CASES = [
    (8, 2, 128, 251, 250, 7, 4, "map"),  # G 4 (Llama)
    (16, 1, 64, 300, 299, 16, 64, "map"),  # G 16
    (8, 2, 64, 251, 250, 7, 4, "moment2"),  # scoring at width 128
    (2, 2, 32, 120, 100, 3, 2, "moment2"),  # G 1, width 64, spare pooled blocks
    (8, 2, 128, 251, 250, 7, 4, "sub4"),  # sub-block means (4 per block), G 4 (Llama), one
    # block per piece
    (16, 1, 64, 300, 299, 16, 64, "sub2"),  # G 16, one program
    (2, 2, 32, 120, 100, 3, 8, "sub4"),  # G 1, spare pooled blocks, 2 blocks (8 means) per piece
]


@needs_triton
def test_decode_kernels_score_with_selection_queries_like_the_reference(interpreted):
    rows = interpreted.rows("selection_queries")
    assert [r["case"] for r in rows] == list(range(len(SELECTION_CASES)))
    for row in rows:
        assert row["ok"] and row["differs_from_q"], row


@needs_triton
def test_dispatch_takes_the_kernels_only_where_they_apply(interpreted):
    rows = interpreted.rows("dispatch")
    assert rows[0]["ok"], rows[0]


@needs_triton
def test_model_decodes_through_the_kernels_like_the_uncached_pass(interpreted):
    rows = interpreted.rows("model")
    assert rows[0]["ok"], rows[0]


@needs_triton
def test_moment2_and_sub4_models_decode_through_the_kernels_like_the_uncached_pass(interpreted):
    rows = interpreted.rows("model_variants")
    assert [r["score"] for r in rows] == ["moment2", "sub4"]
    for row in rows:
        assert row["ok"], row


@needs_triton
def test_benchmark_kernel_check_passes_on_the_kernels(interpreted):
    """tools/bench_decode.py's kernel check (block sets judged up to near-ties, output error),
    run on the interpreted kernels over a filled cache: G 4 D 128, G 16 D 64 (batch 2, a
    query without its token axis), a moment2 model, a model with a selection map and a sub4 model
    (the cache's sub-block means); then the first layout again with the kernel's output scaled
    by 1.1 and with a future block in its selection, each of which it must fail for that reason."""
    rows = interpreted.rows("bench_check")
    assert [r["layout"] for r in rows] == ["8/2/128 b1", "16/1/64 b2 q3d", "8/2/64 moment2",
                                           "8/2/128 map", "8/2/64 sub4", "output x1.1", "future block"]
    for row in rows[:5]:
        assert row["check_ok"] and row["check_indices_same"] == 1.0, row
    assert not rows[5]["check_ok"] and rows[5]["check_indices_same"] == 1.0, rows[5]
    assert rows[5]["check_rel_err"] > 3e-2, rows[5]
    assert not rows[6]["check_ok"] and rows[6]["check_swap_gap"] == float("inf"), rows[6]
    assert rows[6]["check_indices_same"] < 1.0, rows[6]


@needs_triton
@pytest.mark.parametrize("heads, block_size, parts", [((32, 8, 128), 16, 1), ((32, 2, 64), 16, 1),
                                                     ((12, 4, 64), 64, 1), ((32, 8, 128), 16, 4),
                                                     ((12, 3, 64), 16, 2)])
def test_decode_kernels_compile_for_hopper(heads, block_size, parts):
    """The interpreter runs the kernels as Python and ignores what the compiler refuses (a module
    global read inside a kernel, a type clash): compile all three for sm_90 here, no GPU needed
    (``parts``: the scoring kernels over subN's sub-block means)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ssa_megatron.ops import triton_sparse_decode as tsd
    hq, h, d = heads
    g = hq // h
    common = dict(H=h, G=g, GP=max(16, triton.next_power_of_2(g)), D=d, BLOCK=block_size)
    scoring = dict(common, SPLIT=tsd.blocks_per_piece(parts), SP=32, DOT_PRECISION="default",
                   NSUB=parts)
    pointers = {"Q": "*bf16", "P": "*fp32", "POS": "*i32", "M_OUT": "*fp32", "L_OUT": "*fp32",
                "M_IN": "*fp32", "L_IN": "*fp32", "KEYS_OUT": "*i64", "KEYS_IN": "*i64",
                "IDX_OUT": "*i32", "K": "*bf16", "V": "*bf16", "O": "*bf16",
                "LOGITS": "*fp32"}
    kernels = [(tsd.decode_stats_kernel, scoring),
               (tsd.decode_select_kernel, dict(H=h, G=g, GP=common["GP"], BLOCK=block_size,
                                               SPLIT=scoring["SPLIT"], SP=32, KEEP=15, KP=16,
                                               IDX_BITS=tsd.IDX_BITS, NSUB=parts)),
               (tsd.decode_attend_kernel, dict(common, SP=32, KP=16, NSEL=16, IDX_BITS=tsd.IDX_BITS,
                                               CHUNK=max(1, tsd.CONFIG["tile_tokens"] // block_size)))]
    for kernel, constants in kernels:
        signature = {name: "constexpr" if name in constants else pointers.get(name) or
                     ("fp32" if name.startswith("scale") else "i32") for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constants),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert compiled.asm["cubin"], kernel.fn.__name__


# ------------------------------------------------------------------------------------------
# Child process: TRITON_INTERPRET=1 is set before anything imports triton.
# ------------------------------------------------------------------------------------------

def _cases():
    import torch

    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_sparse_decode as tsd
    for i, (b, hq, h, d, bs, t, positions, bc, split, ties) in enumerate(CASES):
        torch.manual_seed(i)
        k = torch.randn(b, h, t, d)
        v = torch.randn(b, h, t, d)
        q = torch.randn(b, 1, hq, d)
        if ties:  # blocks 1, 3 and 6 hold the same keys: equal means, equal scores
            for blk in (3, 6):
                k[:, :, blk * bs:(blk + 1) * bs] = k[:, :, bs:2 * bs]
        pooled = ref.mean_pool_blocks(k.transpose(1, 2), bs)  # every complete block of the cache
        tsd.CONFIG["split"] = split
        o, idx = tsd.sparse_decode_attention(q, k, v, pooled, torch.tensor(positions), bs, bc,
                                             return_indices=True)
        ok, err, same = True, 0.0, True
        for row, pos in enumerate(positions):  # the reference sees only the row's own prefix
            kr, vr = k[row:row + 1, :, :pos + 1], v[row:row + 1, :, :pos + 1]
            pr = ref.mean_pool_blocks(kr.transpose(1, 2), bs)
            ridx = ref.select_blocks_from_pooled(q[row:row + 1], pr, pos, pos + 1, bs, bc, d ** -0.5)
            ro = ref.sparse_decode_attention(q[row:row + 1], kr, vr, pr, pos, bs, bc)
            same &= torch.equal(idx[row], ridx[0, 0])
            err = max(err, (o[row] - ro[0]).abs().max().item())
        ok = same and err < 1e-5
        if ties:  # the tie is decided towards the smaller block, as the reference's stable sort
            order = idx[0, 0].tolist()
            present = [blk for blk in (1, 3, 6) if blk in order]
            ok &= present == sorted(present, key=order.index) and len(present) > 0
        print(json.dumps({"case": i, "ok": bool(ok), "indices_equal": bool(same), "max_err": err}),
              flush=True)


def _selection_queries():
    import torch

    from ssa_megatron.ops import reference as ref
    from ssa_megatron.ops import triton_sparse_decode as tsd
    for i, (hq, h, d, t, pos, bc, split, kind) in enumerate(SELECTION_CASES):
        torch.manual_seed(100 + i)
        k, v = torch.randn(1, h, t, d), torch.randn(1, h, t, d)
        if kind != "map":  # blocks (sub-blocks) of unlike spread: the variance term, or the
            # sub-block means, reorder them
            span = BS // (ref.sub_parts(kind) or 1)
            k = k * (0.2 + 3 * torch.rand(1, 1, t // span + 1, d)).repeat_interleave(span, 2)[:, :, :t]
        q = torch.randn(1, 1, hq, d)
        scale = d ** -0.5
        mean, squares = ref.pooled_selection_keys(k.transpose(1, 2), BS, "moment2")
        parts = ref.sub_parts(kind) or 1
        if kind == "map":
            q_select, pooled = q + torch.randn(1, 1, hq, d), mean
        elif kind == "moment2":
            q_select, pooled = ref.moment2_operands(q, mean, squares, scale)
        else:  # the cache's sub-block means of every complete block
            q_select = None
            pooled = ref.mean_pool_blocks(k.transpose(1, 2)[:, :t // BS * BS], BS // parts)
        tsd.CONFIG["split"] = split
        o, idx = tsd.sparse_decode_attention(q, k, v, pooled, pos, BS, bc, scale,
                                             return_indices=True, q_select=q_select, parts=parts)
        kr, vr = k[:, :, :pos + 1], v[:, :, :pos + 1]
        n = (pos + 1) // BS
        ranked = q if q_select is None else q_select
        ridx = ref.select_blocks_from_pooled(ranked, pooled[:, :n * parts], pos, pos + 1, BS, bc,
                                             scale, parts)
        ro = ref.sparse_decode_attention(q, kr, vr, pooled[:, :n * parts], pos, BS, bc, scale,
                                         q_select=q_select, parts=parts)
        plain = ref.select_blocks_from_pooled(q, mean[:, :n], pos, pos + 1, BS, bc, scale)
        spec = True
        if parts > 1:  # the cached means rank as the subN score of the keys themselves does
            spec = torch.equal(ridx, ref.top_blocks(ref.chunk_scores(q, kr.transpose(1, 2), pos, BS,
                                                                     scale, kind), bc))
        err = (o - ro).abs().max().item()
        same = torch.equal(idx[0], ridx[0, 0])
        print(json.dumps({"case": i, "ok": bool(same and spec and err < 1e-5), "indices_equal": same,
                          "spec": spec, "max_err": err, "differs_from_q": not torch.equal(ridx, plain)}),
              flush=True)


def _dispatch():
    """dispatch.sparse_decode_attention: the kernels where they apply, else the reference."""
    import torch

    from ssa_megatron.ops import dispatch, reference, triton_sparse_decode
    calls = []
    kernel = triton_sparse_decode.sparse_decode_attention
    triton_sparse_decode.sparse_decode_attention = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    torch.manual_seed(0)
    rows = []
    for bs, d, tq, dtype in ((16, 32, 1, torch.float32), (8, 32, 1, torch.float32),
                             (16, 24, 1, torch.float32), (16, 32, 3, torch.float32),
                             (16, 32, 1, torch.float64)):  # q and cache of different dtypes
        k, v = torch.randn(2, 1, 70, d), torch.randn(2, 1, 70, d)
        q = torch.randn(2, tq, 4, d).to(dtype)
        past = 70 - tq
        pooled = reference.mean_pool_blocks(k.transpose(1, 2), bs)
        before = len(calls)
        o = dispatch.sparse_decode_attention(q, k, v, pooled, past, bs, 3)
        ro = reference.sparse_decode_attention(q, k, v, pooled, past, bs, 3)
        rows.append({"kernel": len(calls) > before, "err": (o - ro).abs().max().item()})
    ok = [r["kernel"] for r in rows] == [True, False, False, False, False] and max(r["err"] for r in rows) < 1e-5
    print(json.dumps({"ok": bool(ok), "rows": rows}), flush=True)


def _model(**variant):
    import torch

    from ssa_megatron.hf import modeling_ssa
    from ssa_megatron.hf.configuration_ssa import SSAConfig
    from ssa_megatron.ops import dispatch, triton_sparse_decode
    modeling_ssa._ops_for = lambda t: dispatch  # CPU tensors: the kernels, interpreted
    calls = []
    kernel = triton_sparse_decode.sparse_decode_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    triton_sparse_decode.sparse_decode_attention = counted
    torch.manual_seed(0)
    cfg = SSAConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                    initializer_range=0.3, block_size=BS, block_counts=2, **variant)
    model = modeling_ssa.SSAForCausalLM(cfg).eval()
    model.set_inference_mode("sparse")
    prompt = torch.randint(0, 64, (1, 13))
    steps = 3 * BS  # past block_counts * block_size tokens: the selection matters
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, pad_token_id=0)
        whole = model(out, use_cache=False).logits  # the prefill kernels over every position
    greedy = whole[0, prompt.shape[1] - 1:-1].argmax(-1)
    ok = torch.equal(greedy, out[0, prompt.shape[1]:]) and len(calls) == (steps - 1) * 2
    print(json.dumps({"ok": bool(ok), "kernel_calls": len(calls), "tokens": out[0].tolist(),
                      "score": getattr(cfg, "ssa_selection_score", "mean")}), flush=True)


def _bench_check():
    import torch

    from ssa_megatron.bench.decode import check_decode_kernels
    from ssa_megatron.hf.ssa_cache import SSACacheLayer
    from ssa_megatron.ops import triton_sparse_decode as tsd
    kernel = tsd.sparse_decode_attention
    ctx, bc = 200, 5

    def future_block(o, idx):
        idx = idx.clone()
        idx[..., -1] = ctx // BS + 1
        return o, idx

    disturb = {"output x1.1": lambda o, idx: (o * 1.1, idx), "future block": future_block}
    layouts = (("8/2/128 b1", 8, 2, 128, 1), ("16/1/64 b2 q3d", 16, 1, 64, 2),
               ("8/2/64 moment2", 8, 2, 64, 1), ("8/2/128 map", 8, 2, 128, 1),
               ("8/2/64 sub4", 8, 2, 64, 1), ("output x1.1", 8, 2, 128, 1),
               ("future block", 8, 2, 128, 1))
    for name, hq, h, d, b in layouts:
        torch.manual_seed(hq)
        moment2 = "moment2" in name
        score = "moment2" if moment2 else "sub4" if "sub4" in name else "mean"
        layer = SSACacheLayer(BS, squares=moment2, parts=4 if score == "sub4" else 1)
        layer.update(torch.randn(b, h, ctx, d), torch.randn(b, h, ctx, d))
        q = torch.randn(b, 1, hq, d)
        q_select = q + torch.randn(b, 1, hq, d) if "map" in name else None
        if name in disturb:
            tsd.sparse_decode_attention = lambda *a, f=disturb[name], **kw: f(*kernel(*a, **kw))
        row = check_decode_kernels(q[:, 0] if "q3d" in name else q, torch.randn(b, h, 1, d), layer,
                                   ctx, BS, bc, d ** -0.5, score, q_select)
        tsd.sparse_decode_attention = kernel
        print(json.dumps(dict(row, layout=name)), flush=True)


if __name__ == "__main__":
    from ssa_megatron.ops import dispatch
    with dispatch.attention_backend("triton" if sys.argv[1] in ("dispatch", "model", "model_variants") else None):
        {"cases": _cases, "model": _model, "dispatch": _dispatch, "bench_check": _bench_check,
         "selection_queries": _selection_queries,
         "model_variants": lambda: [_model(ssa_selection_score=s) for s in ("moment2", "sub4")],
         }[sys.argv[1]]()
