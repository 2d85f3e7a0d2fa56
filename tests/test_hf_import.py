"""Importing the models people have (tiny random ones built with transformers' own classes):
Llama-3.1 (untied, llama3 RoPE), Mistral (untied, linear RoPE), Qwen2 (q/k/v biases), Qwen3
(per-head q/k norms, wide heads), Phi-3 (fused qkv and gate/up projections); GQA in all.
The import computes what the source computed (full mode), exports and re-imports bit-identically,
splits over TP exactly, trains at TP=2; what SSA cannot compute is refused in one line."""
import json
import os

import pytest
import torch

from dist_utils import run_workers
from test_hf_conversion import convert, hf_logits, load_hf

SEQ = 80  # 5 blocks of 16: longer than a 2-block budget
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {
    "llama31": ("Llama", dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("Mistral", dict(tie_word_embeddings=False, sliding_window=None,
                                rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                 "factor": 2.0})),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # per-head q/k RMSNorm (--qk-layernorm), heads of 16 channels though hidden / heads is 8
    "qwen3": ("Qwen3", dict(tie_word_embeddings=False, head_dim=16,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # fused qkv_proj and gate_up_proj
    "phi3": ("Phi3", dict(tie_word_embeddings=False, sliding_window=None, pad_token_id=0,
                          eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
}
# what each family's import must turn on (the flags the converter prints)
OPTIONS = {"llama31": {"untie_embeddings_and_output_weights", "use_rope_scaling"},
           "mistral": {"untie_embeddings_and_output_weights", "use_rope_scaling"},
           "qwen2": {"add_qkv_bias"},
           "qwen3": {"untie_embeddings_and_output_weights", "qk_layernorm"},
           "phi3": {"untie_embeddings_and_output_weights"}}


def build_source(family: str, path: str, **overrides):
    """A saved random model of ``family`` whose norms and biases are random too (zeros and ones
    would hide swapped or dropped tensors)."""
    import transformers
    kind, options = FAMILIES[family]
    config = getattr(transformers, f"{kind}Config")(**{**SMALL, **options, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return model


def megatron_logits(model, tokens, mode="full", block_counts=None):
    from ssa_megatron.model.attention import set_inference_mode
    set_inference_mode(model, mode, block_counts)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1), None).float()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_import_computes_the_source_and_round_trips(tmp_path, family, single_process_parallel_state):
    from ssa_megatron.convert import api
    from ssa_megatron.convert.hf_ckpt import load_safetensors_dir
    from ssa_megatron.convert.megatron_ckpt import read_checkpoint
    from ssa_megatron.eval.model import load_model
    src = build_source(family, str(tmp_path / "src"))
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = src(tokens).logits.float()
    assert api.hf_to_megatron_checkpoint(str(tmp_path / "src"), str(tmp_path / "tp1")) == "llama"
    meta = json.load(open(tmp_path / "tp1" / "iter_0000000" / "ssa_meta.json"))["args"]
    for option in ("untie_embeddings_and_output_weights", "add_qkv_bias", "use_rope_scaling",
                   "qk_layernorm"):
        assert meta[option] == (option in OPTIONS[family]), option

    # the megatron model (TP=1): the source's logits in full mode; sparse with every block = full
    model, _, _ = load_model(str(tmp_path / "tp1"), device="cpu")
    full = megatron_logits(model, tokens)[..., :256]
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(megatron_logits(model, tokens, "sparse", SEQ // 16), full, atol=1e-5, rtol=0)
    assert (megatron_logits(model, tokens, "sparse", 2)[..., :256] - full).abs().max() > 1e-3

    # exported HF model (its own code): the same logits; sparse with every block = full
    api.megatron_to_hf(str(tmp_path / "tp1"), str(tmp_path / "hf"))
    hf = load_hf(str(tmp_path / "hf"))
    torch.testing.assert_close(hf_logits(hf, tokens, "full"), ref, atol=1e-5, rtol=0)
    hf.set_inference_mode("sparse", SEQ // 16)
    torch.testing.assert_close(hf_logits(hf, tokens, "sparse"), ref, atol=1e-5, rtol=0)

    # export -> re-import at TP=2 -> export: bit-identical tensors, TP shards merge back exactly
    api.hf_to_megatron_checkpoint(str(tmp_path / "hf"), str(tmp_path / "tp2"), tp=2)
    a, _, shape_a = read_checkpoint(str(tmp_path / "tp1"))
    b, _, shape_b = read_checkpoint(str(tmp_path / "tp2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert dict(shape_a, inference_mode="full") == shape_b  # the export names the mode it runs in
    api.megatron_to_hf(str(tmp_path / "tp2"), str(tmp_path / "hf2"))
    x, y = load_safetensors_dir(str(tmp_path / "hf")), load_safetensors_dir(str(tmp_path / "hf2"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert ("lm_head.weight" in x) == ("untie_embeddings_and_output_weights" in OPTIONS[family])
    assert ("model.layers.1.self_attn.k_proj.bias" in x) == ("add_qkv_bias" in OPTIONS[family])
    assert ("model.layers.1.self_attn.k_norm.weight" in x) == ("qk_layernorm" in OPTIONS[family])


def test_untied_scaled_biased_import_trains_at_tp2(tmp_path, random_dataset):
    """All three options in one model (Qwen2 class: biases, untied, llama3 RoPE) -> CLI import at
    TP=2 -> the trainer with the flags the converter printed: its logits before the first step
    equal the source's, and a few steps lower the loss."""
    # initializer_range 0.1: random logits well above the uniform loss, so a few steps show a fall
    src = build_source("qwen2", str(tmp_path / "src"), tie_word_embeddings=False,
                       rope_parameters=LLAMA3_ROPE, initializer_range=0.1)
    proc = convert("from-hf", "--input", str(tmp_path / "src"), "--output", str(tmp_path / "ckpt"),
                   "--tensor-model-parallel-size", "2")
    line = next(s for s in proc.stdout.splitlines() if s.startswith("train it with"))
    model_flags = line.split(": ", 1)[1].split()
    for flag in ("--untie-embeddings-and-output-weights", "--add-qkv-bias", "--use-rope-scaling"):
        assert flag in model_flags
    res = run_workers("ckpt_workers:train_logits_first", 2, str(tmp_path / "run"), *model_flags,
                      "--seq-length", "64", "--ssa-block-counts", "2", "--micro-batch-size", "2",
                      "--global-batch-size", "4", "--lr", "1e-2", "--lr-warmup-iters", "2",
                      "--log-interval", "1", "--split", "100,0,0", "--num-workers", "0",
                      "--data-path", random_dataset, "--train-iters", "8",
                      "--load", str(tmp_path / "ckpt"), "--tensor-model-parallel-size", "2")
    with open(tmp_path / "run" / "rank0.log") as f:
        assert "weights-only" in f.read()
    with torch.no_grad():
        ref = src(res["tokens"]).logits.float()
    torch.testing.assert_close(res["logits"]["full"][..., :256], ref, atol=1e-5, rtol=0)
    losses = res["lm_loss"]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.15, losses


def test_what_ssa_cannot_compute_is_refused_naming_the_field(tmp_path, capsys):
    import transformers

    from ssa_megatron.convert import api
    from ssa_megatron.convert.layout import ConversionError
    cases = {
        "sliding_window=32": ("mistral", dict(sliding_window=32)),
        "use_sliding_window": ("qwen2", dict(use_sliding_window=True, sliding_window=32)),
        "attention_bias=True": ("llama31", dict(attention_bias=True)),
        "mlp_bias=True": ("llama31", dict(mlp_bias=True)),
        "rope_type 'yarn'": ("llama31", dict(rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
            "original_max_position_embeddings": 64})),
        # Phi-3-mini-4k ships a window below its context; Phi-4-mini rotates 3/4 of each head
        "sliding_window=31": ("phi3", dict(sliding_window=31)),
        "partial_rotary_factor=0.75": ("phi3", dict(rope_parameters={
            "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75})),
        r"qkv_proj.weight has 96 rows; the config's heads make 64 \+ 2 x 8": (
            "phi3", dict(num_key_value_heads=2, _config_edit={"num_key_value_heads": 1})),
    }
    for i, (field, (family, overrides)) in enumerate(cases.items()):
        edit = overrides.pop("_config_edit", {})
        build_source(family, str(tmp_path / f"m{i}"), **overrides)
        if edit:  # a config.json that does not fit the weights
            cfg_path = tmp_path / f"m{i}" / "config.json"
            cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **edit}))
        with pytest.raises(ConversionError, match=field.replace("(", r"\(")):
            api.hf_to_megatron_checkpoint(str(tmp_path / f"m{i}"), str(tmp_path / f"out{i}"))
        assert not os.path.exists(tmp_path / f"out{i}")
    # q/k norms over the whole projection (OLMo-2's), not per head (Qwen3's)
    from safetensors.torch import load_file, save_file
    build_source("qwen3", str(tmp_path / "whole"))
    weights = load_file(str(tmp_path / "whole" / "model.safetensors"))
    for name in [n for n in weights if n.endswith(("q_norm.weight", "k_norm.weight"))]:
        weights[name] = torch.ones(weights[name].numel() * 8)
    save_file(weights, str(tmp_path / "whole" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"q_norm has \(128,\) weights, not one per channel "
                                              "of a 16-channel head"):
        api.hf_to_megatron_checkpoint(str(tmp_path / "whole"), str(tmp_path / "whole_out"))
    assert not os.path.exists(tmp_path / "whole_out")
    moe = transformers.MixtralConfig(**{**SMALL, "num_local_experts": 4, "sliding_window": None})
    transformers.MixtralForCausalLM(moe).save_pretrained(str(tmp_path / "moe"))
    from ssa_megatron.convert.cli import main
    capsys.readouterr()  # the progress bars of saving the sources
    assert main(["from-hf", "--input", str(tmp_path / "moe"), "--output", str(tmp_path / "moe_out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "num_local_experts=4" in err, err
    assert not os.path.exists(tmp_path / "moe_out")


def test_checkpoints_without_the_options_read_as_before():
    """ssa_meta.json written before the options existed: a tied, bias-free, plain-RoPE model; a
    run that asks for an untied head is refused in one line, a RoPE change gets a note."""
    import argparse

    from ssa_megatron.model.config import ConfigError
    from ssa_megatron.model.options import MODEL_OPTIONS, rope_change_note
    from ssa_megatron.model.shape import ModelShape
    from ssa_megatron.training.checkpointing import check_compatible
    old = {"args": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "rotary_base": 1e4}}
    shape = ModelShape.from_meta(old, 256)
    assert {k: shape[k] for k in MODEL_OPTIONS} == {k: d for k, (d, _) in MODEL_OPTIONS.items()}
    run = argparse.Namespace(**old["args"], rope_scaling_factor=8.0)
    check_compatible(old, run, "ckpt")
    assert rope_change_note(old["args"], run) is None
    run.ssa_select_proj = True  # a switch that adds weights, newer than the checkpoint: refused
    with pytest.raises(ConfigError, match="--ssa-select-proj False \\(flags say True\\).*new --save dir"):
        check_compatible(old, run, "ckpt")
    run.ssa_select_proj = False
    check_compatible(old, run, "ckpt")
    run.untie_embeddings_and_output_weights = True
    with pytest.raises(ConfigError, match="--untie-embeddings-and-output-weights False.*new --save dir"):
        check_compatible(old, run, "ckpt")
    # against an import (weights only) a new --save cannot help: the import's own flags do
    with pytest.raises(ConfigError, match="pass the model flags tools/convert_checkpoint.py from-hf printed"):
        check_compatible(dict(old, weights_only=True), run, "ckpt")
    run.use_rope_scaling = True
    assert "type llama3 factor 8" in rope_change_note(old["args"], run)


def test_export_dtype_follows_the_training_precision():
    """to-hf's default dtype is the precision the checkpoint trained in: a bf16 run exports
    bfloat16 (half the size of float32), a CPU run float32; --dtype still chooses."""
    from ssa_megatron.convert.api import training_dtype
    from ssa_megatron.convert.cli import build_parser
    assert training_dtype({"args": {"bf16": True, "fp16": False}}) == "bfloat16"
    assert training_dtype({"args": {"bf16": False, "fp16": True}}) == "float16"
    assert training_dtype({"args": {"bf16": False}}) == training_dtype({}) == "float32"
    args = build_parser().parse_args(["to-hf", "--input", "a", "--output", "b"])
    assert args.dtype == "auto"


def test_exported_sentencepiece_tokenizer_begins_texts_as_the_training_data_did(tmp_path):
    """A SentencePiece model whose training data began each document with BOS (preprocess_data
    --bos auto, recorded in the data and the checkpoint) exports a tokenizer that puts BOS before
    a text, so generation prompts look like the training documents; without it, none."""
    import glob

    from transformers import AutoTokenizer

    from ssa_megatron.convert import hf_ckpt
    from ssa_megatron.data.demo_corpus import sotu_speeches_dir
    from ssa_megatron.data.tokenizer import build_tokenizer
    from ssa_megatron.data.tokenizer_training import train_sentencepiece
    files = sorted(glob.glob(os.path.join(sotu_speeches_dir(), "*.txt")))[:20]
    model = train_sentencepiece(files, str(tmp_path / "spm"), vocab_size=500)["model"]
    desc = build_tokenizer(model).describe()
    plain = build_tokenizer(model).tokenize("Hello world")
    for bos, expect in (([], plain), ([1], [1] + plain)):
        out = tmp_path / f"hf{len(bos)}"
        out.mkdir()
        assert hf_ckpt.write_tokenizer(str(out), {"tokenizer": dict(desc, bos=bos)}) is None
        tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
        assert tok.encode("Hello world") == expect
