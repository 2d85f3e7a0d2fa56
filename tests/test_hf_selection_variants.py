"""The Hugging Face export of the trained selection variants: a learned selection map
(--ssa-select-proj: ``self_attn.select_proj`` [heads, D, D]), the moment2 score
(--ssa-selection-score moment2: the KV cache keeps each block's [mean, var] of its keys) and the
sub4 score (--ssa-selection-score sub4: the KV cache keeps 4 sub-block means per block).

Checkpoints are built from an imported random Qwen2 model with maps drawn large enough to change
the selection (a trained map after a few CPU steps is too close to 0 to tell an export that
ignores it). For each variant: the HF model computes the megatron model's logits in both modes
and would not without the variant; cached generation equals uncached generation (token by token
and in the logits); HF -> megatron -> HF is bit-identical with the shape kept; a TP=2 checkpoint
exports the same tensors; the export loads without ssa_megatron. And the moment2 cache under
the cache operations generation uses (crop, beam reordering, batch repetition and selection)."""
import os
import subprocess
import sys

import pytest
import torch

from test_hf_conversion import CHECK_SCRIPT, hf_logits, load_hf
from test_hf_import import SEQ, build_source, megatron_logits

VARIANTS = {"map": dict(ssa_select_proj=True),  # the trainer refuses the two together
            "moment2": dict(ssa_selection_score="moment2"),
            "sub4": dict(ssa_selection_score="sub4")}
BUDGET = 2  # blocks of 16 of SEQ = 80 tokens


@pytest.fixture(scope="module")
def variant_checkpoints(tmp_path_factory):
    """{variant: (TP=1 checkpoint, TP=2 checkpoint)} of one imported model."""
    from ssa_megatron.convert import api
    from ssa_megatron.convert.layout import SELECT_PROJ
    from ssa_megatron.convert.megatron_ckpt import read_checkpoint, write_checkpoint
    root = tmp_path_factory.mktemp("variants")
    build_source("qwen2", str(root / "src"))
    api.hf_to_megatron_checkpoint(str(root / "src"), str(root / "base"))
    full, meta, shape = read_checkpoint(str(root / "base"))
    heads, d = shape.num_attention_heads, shape.kv_channels
    out = {}
    for name, options in VARIANTS.items():
        state = dict(full)
        if options.get("ssa_select_proj"):
            gen = torch.Generator().manual_seed(7)
            for i in range(shape.num_layers):
                state[f"decoder.layers.{i}.{SELECT_PROJ}"] = torch.randn(heads, d, d, generator=gen)
        variant = shape.replace(ssa_block_counts=BUDGET, **options)
        paths = []
        for tp in (1, 2):
            paths.append(str(root / f"{name}_tp{tp}"))
            write_checkpoint(state, variant, paths[-1], tp, data=meta.get("data"), source="test")
        out[name] = tuple(paths)
    return out


def _without_variant(hf, options):
    """The HF model with its variant switched off in place (map 0, mean score)."""
    for layer in hf.model.layers:
        attn = layer.self_attn
        if options.get("ssa_select_proj"):
            attn.select_proj.data.zero_()
        attn.selection_score = "mean"
    hf.config.ssa_selection_score = "mean"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_computes_the_megatron_model_and_needs_the_variant(
        tmp_path, variant_checkpoints, name, single_process_parallel_state):
    from ssa_megatron.convert import api
    from ssa_megatron.eval.model import load_model
    tp1, _ = variant_checkpoints[name]
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    model, _, _ = load_model(tp1, device="cpu")
    ref = {mode: megatron_logits(model, tokens, mode, BUDGET)[..., :256] for mode in ("full", "sparse")}
    api.megatron_to_hf(tp1, str(tmp_path / "hf"))
    hf = load_hf(str(tmp_path / "hf"))
    assert {k: getattr(hf.config, k) for k in VARIANTS[name]} == VARIANTS[name]
    hf.set_inference_mode("sparse", BUDGET)
    for mode in ("full", "sparse"):
        torch.testing.assert_close(hf_logits(hf, tokens, mode), ref[mode], atol=1e-5, rtol=0)
    _without_variant(hf, VARIANTS[name])
    assert (hf_logits(hf, tokens, "sparse") - ref["sparse"]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_generation_equals_uncached(tmp_path, variant_checkpoints, name):
    from ssa_megatron.convert import api
    api.megatron_to_hf(variant_checkpoints[name][0], str(tmp_path / "hf"))
    hf = load_hf(str(tmp_path / "hf")).set_inference_mode("sparse", BUDGET)
    prompt = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=40, do_sample=False, min_new_tokens=40)  # crosses several blocks
    with_cache = hf.generate(prompt, use_cache=True, **kw)
    assert torch.equal(with_cache, hf.generate(prompt, use_cache=False, **kw))
    with torch.no_grad():  # step by step: the cached logits equal the full forward pass
        ref = hf(with_cache, use_cache=False).logits
        out = hf(with_cache[:, :30], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(30, with_cache.shape[1]):
            out = hf(with_cache[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-5, rtol=0)
    with torch.no_grad():  # a step of several tokens after a cached prefix (crossing a block edge)
        part = hf(with_cache[:, :27], use_cache=True)
        more = hf(with_cache[:, 27:50], past_key_values=part.past_key_values, use_cache=True)
    torch.testing.assert_close(more.logits, ref[:, 27:50], atol=1e-5, rtol=0)
    layer = cache.layers[0]
    moment2 = VARIANTS[name].get("ssa_selection_score") == "moment2"
    assert (layer.pooled_moment2 is not None) == moment2
    if moment2:  # the cache's [mean, var] are those of its keys
        keys = layer.keys.transpose(1, 2).double()
        nb = keys.shape[1] // 16
        blocks = keys[:, :nb * 16].reshape(2, nb, 16, *keys.shape[2:])
        want = torch.cat([blocks.mean(2), blocks.var(2, unbiased=False)], -1)
        torch.testing.assert_close(layer.pooled_moment2.double(), want, atol=1e-5, rtol=1e-5)
    if name == "sub4":  # the cache keeps 4 sub-block means per complete block, and a step reads them
        keys = layer.keys.transpose(1, 2)
        nb = keys.shape[1] // 16
        want = keys[:, :nb * 16].reshape(2, nb * 4, 4, *keys.shape[2:]).float().mean(2)
        assert layer.parts == 4
        torch.testing.assert_close(layer.pooled_keys, want, atol=1e-6, rtol=1e-6)
        with torch.no_grad():  # the last step again, with the cached means as kept, then negated
            for cached in cache.layers:
                cached.crop(-1)
            out = hf(with_cache[:, -1:], past_key_values=cache, use_cache=True)
            torch.testing.assert_close(out.logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)
            for cached in cache.layers:
                cached.crop(-1)
                cached.pooled_keys.neg_()  # the selection now ranks the blocks otherwise
            out = hf(with_cache[:, -1:], past_key_values=cache, use_cache=True)
        assert (out.logits[:, -1] - ref[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_round_trip_and_tp2_export_are_bit_identical(tmp_path, variant_checkpoints, name):
    from ssa_megatron.convert import api
    from ssa_megatron.convert.hf_ckpt import load_safetensors_dir
    from ssa_megatron.convert.megatron_ckpt import read_checkpoint
    tp1, tp2 = variant_checkpoints[name]
    api.megatron_to_hf(tp1, str(tmp_path / "hf1"))
    api.megatron_to_hf(tp2, str(tmp_path / "hf2"))
    a, b = load_safetensors_dir(str(tmp_path / "hf1")), load_safetensors_dir(str(tmp_path / "hf2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ("model.layers.1.self_attn.select_proj" in a) == bool(VARIANTS[name].get("ssa_select_proj"))
    api.hf_to_megatron_checkpoint(str(tmp_path / "hf1"), str(tmp_path / "back"))
    x, _, shape_x = read_checkpoint(tp1)
    y, _, shape_y = read_checkpoint(str(tmp_path / "back"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert dict(shape_x, inference_mode="sparse") == dict(shape_y, inference_mode="sparse")
    assert all(getattr(shape_y, k) == v for k, v in VARIANTS[name].items())


@pytest.mark.parametrize("name", ["moment2", "sub4"])
def test_export_loads_without_ssa_megatron(tmp_path, variant_checkpoints, name,
                                           single_process_parallel_state):
    """A moment2 or sub4 model (the variants with more model code) run by plain transformers
    from the exported files alone."""
    from safetensors.torch import load_file, save_file

    from ssa_megatron.convert import api
    from ssa_megatron.eval.model import load_model
    tp1 = variant_checkpoints[name][0]
    api.megatron_to_hf(tp1, str(tmp_path / "hf"), block_counts=BUDGET)
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(3))
    save_file({"tokens": tokens.contiguous()}, str(tmp_path / "tokens.safetensors"))
    (tmp_path / "check.py").write_text(CHECK_SCRIPT)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(tmp_path / "hf"),
                           str(tmp_path / "tokens.safetensors"), str(tmp_path / "logits.safetensors")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "modules: []" in proc.stdout
    got = load_file(str(tmp_path / "logits.safetensors"))
    model, _, _ = load_model(tp1, device="cpu")
    for mode in ("full", "sparse"):
        torch.testing.assert_close(got[mode], megatron_logits(model, tokens, mode, BUDGET)[..., :256],
                                   atol=1e-5, rtol=0)


def test_moment2_cache_follows_the_cache_operations():
    """Crop, beam reordering, batch repetition and selection keep [mean, var] equal to those of
    the keys the cache holds; a cache that pools means only is refused by a moment2 model."""
    from transformers import DynamicCache

    from ssa_megatron.hf.ssa_cache import SSACacheLayer, install_pooled_key_layers
    from ssa_megatron.ops import reference as R

    def expected(layer):
        return R.moment2_keys(*R.pooled_selection_keys(layer.keys.transpose(1, 2), 16, "moment2"))

    gen = torch.Generator().manual_seed(4)
    layer = SSACacheLayer(16, squares=True)
    layer.update(torch.randn(3, 2, 40, 8, generator=gen), torch.randn(3, 2, 40, 8, generator=gen))
    for step, change in enumerate((lambda: layer.update(torch.randn(3, 2, 30, 8, generator=gen),
                                                        torch.randn(3, 2, 30, 8, generator=gen)),
                                   lambda: layer.crop(-21),  # cuts into a block: its entry goes
                                   lambda: layer.reorder_cache(torch.tensor([2, 0, 1])),
                                   lambda: layer.batch_repeat_interleave(2),
                                   lambda: layer.batch_select_indices(torch.tensor([0, 3, 5])))):
        change()
        assert layer.pooled_moment2.shape == expected(layer).shape, step
        assert torch.equal(layer.pooled_moment2, expected(layer)), step
        assert torch.equal(layer.pooled_keys, layer.pooled_moment2[..., :8]), step
    cache = DynamicCache()
    cache.layers = [SSACacheLayer(16)]
    with pytest.raises(ValueError, match="keeps no key variances.*start generation with a fresh cache"):
        install_pooled_key_layers(cache, 1, 16, squares=True)


def test_a_config_whose_sub_blocks_do_not_split_its_blocks_is_refused_when_built():
    """A hand-made config with ssa_selection_score sub4 and blocks of 2 tokens fails when the
    attention is built, naming the rule, not at the first sparse forward."""
    from ssa_megatron.hf.configuration_ssa import SSAConfig
    from ssa_megatron.hf.modeling_ssa import SSAAttention
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2)
    SSAAttention(SSAConfig(**small, block_size=16, ssa_selection_score="sub4"), 0)
    with pytest.raises(ValueError, match="sub4: N must divide the block size 2"):
        SSAAttention(SSAConfig(**small, block_size=2, ssa_selection_score="sub4"), 0)
