"""Sparse decoding with a KV cache that keeps the pooled block keys (HF export, ssa_cache.py):
the cached selection equals select_blocks row for row (ties included), cached greedy and beam
generation equal uncached recomputation for GQA G in {1, 2, 4}, and the export decodes without
ssa_megatron installed."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ssa_megatron.ops import reference as ref

# (query heads, kv heads, block_size, block_counts): G = 1, 2, 4
LAYOUTS = {1: (4, 4, 4, 3), 2: (4, 2, 16, 2), 4: (4, 1, 8, 2)}


def write_random_export(out, heads, kv_heads, block_size, block_counts, seed=0):
    """A tiny random SSA model written by the converter's writer (config, safetensors, model code)."""
    from ssa_megatron.convert.hf_ckpt import write_hf
    from ssa_megatron.hf.configuration_ssa import SSAConfig
    from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
    spec = dict(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=2,
                num_attention_heads=heads, num_query_groups=kv_heads, kv_channels=8,
                max_position_embeddings=256, norm_epsilon=1e-5, rotary_base=10000.0,
                ssa_block_size=block_size, ssa_block_counts=block_counts, attention_mode="ssa",
                inference_mode="sparse")
    torch.manual_seed(seed)
    # large weights: peaked attention and logits, so greedy choices are far from float ties
    cfg = SSAConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                    initializer_range=0.3, block_size=block_size, block_counts=block_counts)
    state = {k: v for k, v in SSAForCausalLM(cfg).state_dict().items() if k != "lm_head.weight"}
    write_hf(str(out), state, spec)
    return str(out)


def load(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {g: write_random_export(root / f"g{g}", *layout) for g, layout in LAYOUTS.items()}


def _generate(model, prompt, steps, **kw):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("group", [1, 2, 4])
def test_cached_sparse_generation_equals_uncached(exports, group):
    from transformers import DynamicCache
    model = load(exports[group])
    bs, bc = model.config.block_size, model.config.block_counts
    steps = 3 * bc * bs  # well past block_counts * block_size tokens
    torch.manual_seed(group)
    prompt = torch.randint(0, 64, (2, bs + 3))  # batch 2, not block-aligned
    for mode in ("sparse", "full"):
        model.set_inference_mode(mode)
        cache = DynamicCache(config=model.config)
        cached = _generate(model, prompt, steps, cache=cache)
        assert torch.equal(cached, _generate(model, prompt, steps, use_cache=False)), mode
        layer = cache.layers[1]
        assert type(layer).__name__ == "SSACacheLayer"
        length = prompt.shape[1] + steps - 1  # the last token is never fed back
        assert layer.get_seq_length() == length and layer.pooled_keys.shape[1] == length // bs
        torch.testing.assert_close(layer.pooled_keys, ref.mean_pool_blocks(layer.keys.transpose(1, 2), bs),
                                   atol=0, rtol=0)
        # step by step: cached logits equal the no-cache forward pass of the whole sequence
        with torch.no_grad():
            whole = model(cached, use_cache=False).logits
            out = model(cached[:, :prompt.shape[1]], use_cache=True)
            steps_logits = [out.logits]
            for t in range(prompt.shape[1], cached.shape[1]):
                out = model(cached[:, t:t + 1], cache=out.past_key_values, use_cache=True)
                steps_logits.append(out.logits)
        torch.testing.assert_close(torch.cat(steps_logits, 1), whole, atol=2e-5, rtol=0)
        if mode == "sparse":
            sparse_logits = whole
    with torch.no_grad():  # sparse really attends fewer tokens than full at this length
        assert (sparse_logits - model(cached, use_cache=False).logits).abs().max() > 1e-2


def test_beam_search_and_cache_kinds(exports):
    model = load(exports[2]).set_inference_mode("sparse")
    prompt = torch.randint(0, 64, (1, 21))
    # beam search reorders the cache every step: the pooled keys must follow
    beams = dict(num_beams=3, num_return_sequences=3, early_stopping=False)
    cached = _generate(model, prompt, 40, **beams)
    assert torch.equal(cached, _generate(model, prompt, 40, use_cache=False, **beams))
    with pytest.raises(ValueError, match="DynamicCache"):
        _generate(model, prompt, 4, cache_implementation="static")


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("ties", [False, True])
def test_pooled_selection_equals_select_blocks(heads, kv_heads, ties):
    """Keys appended to an SSACacheLayer in pieces of 1-3 tokens; every new query's blocks,
    selected from the layer's pooled keys, equal select_blocks' row. With duplicated blocks
    (equal means) the two computations' q . mean(K) products may round differently (their matmul
    shapes differ), so there rows may differ only by swapping blocks whose scores are within
    rounding of the k-th; without ties they are identical."""
    from ssa_megatron.hf.ssa_cache import SSACacheLayer
    torch.manual_seed(heads + kv_heads)
    b, t, d, bs, bc = 2, 83, 8, 4, 5
    q = torch.randn(b, t, heads, d)
    k = torch.randn(b, t, kv_heads, d)
    if ties:
        for src, dst in ((1, 6), (2, 9), (2, 14), (0, 17)):
            k[:, dst * bs:(dst + 1) * bs] = k[:, src * bs:(src + 1) * bs]
    want = ref.select_blocks(q, k, bs, bc)
    layer = SSACacheLayer(bs)
    got = []
    pos, piece = 0, 0
    while pos < t:
        n = min(1 + piece % 3, t - pos)
        kv = k[:, pos:pos + n].transpose(1, 2)
        layer.update(kv, kv.clone())
        got.append(ref.select_blocks_from_pooled(q[:, pos:pos + n], layer.pooled_keys, pos, pos + n, bs, bc))
        pos, piece = pos + n, piece + 1
    got = torch.cat(got, 1)
    if not ties:
        assert torch.equal(got, want)
        return
    scores = ref.block_scores(q, k, bs)  # [B, T, H, nb]
    differ = (got != want).any(-1).nonzero().tolist()
    assert len(differ) < 0.1 * got[..., 0].numel()
    for bi, ti, hi in differ:
        row = scores[bi, ti, hi]
        kth = row[want[bi, ti, hi][want[bi, ti, hi] >= 0]].min()
        swapped = set(got[bi, ti, hi].tolist()) ^ set(want[bi, ti, hi].tolist())
        for blk in swapped:
            torch.testing.assert_close(row[blk], kth, rtol=1e-6, atol=0)


@pytest.mark.parametrize("parts", [1, 2])
def test_cache_layer_crop_reorder_select_keep_pooled_keys(parts):
    """The pooled keys (with parts = N: the means of each complete block's N sub-blocks, a subN
    model's cache) stay those of the cached keys through growth, crops, beam reordering and
    batch selection; a cache cannot keep sub-blocks that do not split a block, nor both kinds."""
    from ssa_megatron.hf.ssa_cache import SSACacheLayer
    torch.manual_seed(0)
    bs = 4
    k, v = torch.randn(3, 2, 300, 8), torch.randn(3, 2, 300, 8)
    layer = SSACacheLayer(bs, parts=parts)
    for a in range(0, 300, 7):  # grows its buffers several times
        layer.update(k[:, :, a:a + 7], v[:, :, a:a + 7])

    def check(keys, values):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert layer.get_seq_length() == keys.shape[2]
        nb = keys.shape[2] // bs
        want = ref.mean_pool_blocks(keys.transpose(1, 2)[:, :nb * bs], bs // parts)
        assert torch.equal(layer.pooled_keys, want)
    check(k, v)
    layer.crop(-6)  # cuts into block 73: its mean goes
    check(k[:, :, :294], v[:, :, :294])
    layer.update(k[:, :, 294:], v[:, :, 294:])
    check(k, v)
    beam = torch.tensor([2, 2, 0])
    layer.reorder_cache(beam)
    check(k[beam], v[beam])
    layer.batch_select_indices(torch.tensor([0, 2]))
    check(k[[2, 0]], v[[2, 0]])
    layer.update(k[:2, :, :5], v[:2, :, :5])
    check(torch.cat([k[[2, 0]], k[:2, :, :5]], 2), torch.cat([v[[2, 0]], v[:2, :, :5]], 2))
    with pytest.raises(ValueError, match="must divide the block size 4"):
        SSACacheLayer(bs, parts=3)
    with pytest.raises(ValueError, match="not both"):
        SSACacheLayer(bs, squares=True, parts=2)


STANDALONE_DECODE = r"""
from transformers import AutoModelForCausalLM, DynamicCache
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
model.set_inference_mode("sparse")
prompt = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(0))
kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=50, min_new_tokens=50,
          do_sample=False, pad_token_id=0)
cache = DynamicCache(config=model.config)
with torch.no_grad():
    a = model.generate(prompt, cache=cache, **kw)
    b = model.generate(prompt, use_cache=False, **kw)
assert torch.equal(a, b)
print("layer:", type(cache.layers[0]).__name__, tuple(cache.layers[0].pooled_keys.shape))
print("modules:", sorted(m for m in sys.modules if m.startswith("ssa_megatron")))
"""


def test_export_decodes_sparse_without_ssa_megatron(tmp_path, exports):
    from test_hf_conversion import STANDALONE_LOADER_PREAMBLE
    assert "ssa_cache.py" in os.listdir(exports[2])
    script = tmp_path / "decode.py"
    script.write_text(STANDALONE_LOADER_PREAMBLE + STANDALONE_DECODE)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(script), exports[2]], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layer: SSACacheLayer (2, 3, 2, 8)" in proc.stdout and "modules: []" in proc.stdout


def test_bench_decode_cpu_smoke(tmp_path, capsys):
    from ssa_megatron.bench import decode as bench_decode
    out = tmp_path / "decode.json"
    assert bench_decode.main(["--device", "cpu", "--dtype", "fp32", "--context", "300",
                              "--heads", "4/2/16,4/1/16",
                              "--layers", "1", "--hidden", "32", "--ffn", "48", "--vocab", "64",
                              "--block-counts", "4", "--rep", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("card: CPU") and text.count("full/sparse") == 4
    rows = json.loads(out.read_text())["rows"]
    assert [r["heads"] for r in rows] == ["4/2/16", "4/1/16"]
    # 300 cached fp32 tokens: full reads 2 * 300 K/V rows, sparse 18 fp32 means + 2 * 64 rows
    assert rows[0]["pred_attention_ratio"] == pytest.approx(600 / (18 + 128))
    assert all(r["attention_ratio"] > 0 and r["model_ratio"] > 0 for r in rows)
    # a moment2 model reads twice the pooled widths; a map model also reads its map
    # (4 x 16 x 16 weights: 32 units of H x D)
    # a sub4 model four (its cache keeps 4 sub-block means per block)
    for flags, shown, sparse_units in ((["--selection-score", "moment2"], "selection moment2\n", 36 + 128),
                                       (["--selection-score", "sub4"], "selection sub4\n", 72 + 128),
                                       (["--select-proj"], "selection mean + map", 18 + 128 + 32)):
        assert bench_decode.main(["--device", "cpu", "--dtype", "fp32", "--context", "300",
                                  "--heads", "4/2/16", "--layers", "1", "--hidden", "32", "--ffn", "48",
                                  "--vocab", "64", "--block-counts", "4", "--rep", "2", *flags,
                                  "--json", str(out)]) == 0
        assert shown in capsys.readouterr().out
        row = json.loads(out.read_text())["rows"][0]
        assert row["pred_attention_ratio"] == pytest.approx(600 / sparse_units)
        assert row["attention_ratio"] > 0 and row["model_ratio"] > 0


def test_decoding_steps_compute_rotary_frequencies_once(monkeypatch):
    """A decode step must not build anything on the host and copy it over (that copy is what kept
    the model step out of a CUDA graph): the rotary frequencies are made once per device."""
    from ssa_megatron.hf import modeling_ssa
    from ssa_megatron.hf.configuration_ssa import SSAConfig
    calls = []
    real = modeling_ssa.rope_inv_freq
    monkeypatch.setattr(modeling_ssa, "rope_inv_freq", lambda config: calls.append(1) or real(config))
    cfg = SSAConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, block_size=4,
                    block_counts=2)
    model = modeling_ssa.SSAForCausalLM(cfg).eval()
    prompt = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        for token in (3, 5, 7):
            out = model(torch.tensor([[token]]), cache=out.past_key_values, use_cache=True)
        reference = model(torch.cat([prompt, torch.tensor([[3, 5, 7]])], 1), use_cache=False)
    assert len(calls) == 1
    torch.testing.assert_close(out.logits[:, -1], reference.logits[:, -1], atol=2e-5, rtol=0)
    original = model.config.rope_theta
    with torch.no_grad():  # a RoPE setting changed after loading takes effect
        model.config.rope_theta = 100.0
        changed = model(prompt, use_cache=False).logits
        model.config.rope_theta = original
        back = model(prompt, use_cache=False).logits
    assert len(calls) == 2  # the changed setting once; the original one is still cached
    assert not torch.allclose(changed, back)


def test_bench_decode_generation_check_cpu(monkeypatch):
    """The benchmark's greedy-generation check (run on GPUs with the decode kernels) agrees with
    itself on the CPU: cached sparse decoding gives the uncached pass's tokens."""
    from ssa_megatron.bench import decode as bench_decode
    row = bench_decode.check_greedy_generation("cpu", torch.float32, 8, 2, 16, 16, 4, prompt_len=100,
                                               new_tokens=20)
    assert row == {"generation_same": 1.0, "generation_first_diff": None}
    # judged in fp32, both modes; the benchmark's own dtype only reported
    seen = []

    def fake(device, dtype, hq, h, d, bs, bc, mode):
        seen.append((dtype, mode))
        return {"generation_same": 0.5 if dtype == torch.bfloat16 else 1.0, "generation_first_diff": None}
    monkeypatch.setattr(bench_decode, "check_greedy_generation", fake)
    out = bench_decode.generation_checks("cpu", "bf16", 8, 2, 16, 16, 4)
    assert out["generation_ok"] and set(out["generation"]) == {"full/bf16", "sparse/bf16",
                                                               "full/fp32", "sparse/fp32"}
    assert len(seen) == 4
    fake_fp32_fails = lambda *a, mode: {"generation_same": 0.9 if mode == "sparse" else 1.0,
                                        "generation_first_diff": 3}
    monkeypatch.setattr(bench_decode, "check_greedy_generation", fake_fp32_fails)
    assert not bench_decode.generation_checks("cpu", "fp32", 8, 2, 16, 16, 4)["generation_ok"]


def test_hybrid_sparse_mode_keeps_the_first_layers_full(exports):
    """set_inference_mode("sparse", dense_layers=N): layers 1..N in full attention; all layers
    dense is full mode; cached decoding still equals the uncached pass."""
    model = load(exports[2])
    prompt = torch.randint(0, 64, (1, 70))
    with torch.no_grad():
        full = model.set_inference_mode("full")(prompt).logits
        sparse = model.set_inference_mode("sparse", dense_layers=0)(prompt).logits
        hybrid = model.set_inference_mode("sparse", dense_layers=1)(prompt).logits
        every = model.set_inference_mode("sparse", dense_layers=2)(prompt).logits
    torch.testing.assert_close(every, full, atol=0, rtol=0)
    assert (hybrid - sparse).abs().max() > 1e-4 and (hybrid - full).abs().max() > 1e-4
    model.set_inference_mode("sparse", dense_layers=1)
    out = _generate(model, prompt[:, :20], 40)
    with torch.no_grad():
        whole = model(out, use_cache=False).logits[0, 19:-1].argmax(-1)
    assert torch.equal(whole, out[0, 20:])
    with pytest.raises(ValueError):
        model.set_inference_mode(dense_layers=3)


def test_selection_agreement_compares_sets_and_measures_swaps():
    """The benchmark's selection check: order inside a row does not matter, a swap at the K-th
    place is a near-tie (small gap), a block far below it (or a future block) is a wrong one."""
    from ssa_megatron.bench.decode import NEAR_TIE, selection_agreement
    scores = torch.tensor([[[5.0, 1.0, 0.50, 0.499, 0.1, float("-inf")],
                            [float("inf"), 2.0, 1.0, 0.3, 0.2, 0.1]]])  # [B 1, H 2, nb 6]
    exact = torch.tensor([[[0, 1, 2], [0, 1, 2]]], dtype=torch.int32)
    assert selection_agreement(exact, scores, 3) == {"check_indices_same": 1.0, "check_swap_gap": 0.0}
    reordered = torch.tensor([[[2, 0, 1], [1, 2, 0]]], dtype=torch.int32)
    assert selection_agreement(reordered, scores, 3)["check_indices_same"] == 1.0
    near_tie = torch.tensor([[[0, 1, 3], [0, 1, 2]]], dtype=torch.int32)
    got = selection_agreement(near_tie, scores, 3)
    assert got["check_indices_same"] == 0.5 and 0 < got["check_swap_gap"] <= NEAR_TIE
    wrong = torch.tensor([[[0, 1, 4], [0, 1, 2]]], dtype=torch.int32)
    assert selection_agreement(wrong, scores, 3)["check_swap_gap"] > NEAR_TIE
    for far in (5, 6, 99):  # a future block, scored -inf or past the scored range
        future = torch.tensor([[[0, 1, far], [0, 1, 2]]], dtype=torch.int32)
        assert selection_agreement(future, scores, 3)["check_swap_gap"] == float("inf")
    no_current = torch.tensor([[[0, 1, 2], [1, 2, 3]]], dtype=torch.int32)
    assert selection_agreement(no_current, scores, 3)["check_swap_gap"] == float("inf")
    for short in ([0, 1, -1], [0, 1, 1]):  # a block missing, or one kept twice
        bad = torch.tensor([[short, [0, 1, 2]]], dtype=torch.int32)
        assert selection_agreement(bad, scores, 3)["check_swap_gap"] == float("inf")


def test_the_hf_model_refuses_a_selection_score_it_does_not_implement():
    """A config edited by hand to a score the model code does not know must not run the mean
    score silently (the exported scores: tests/test_hf_selection_variants.py)."""
    from ssa_megatron.hf.configuration_ssa import SSAConfig
    from ssa_megatron.hf.modeling_ssa import SSAForCausalLM
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    for score in ("mean", "moment2", "sub2", "sub4"):
        SSAForCausalLM(SSAConfig(**cfg, ssa_selection_score=score))
    with pytest.raises(ValueError, match="'quest' must be one of mean, moment2, sub2, sub4"):
        SSAForCausalLM(SSAConfig(**cfg, ssa_selection_score="quest"))
