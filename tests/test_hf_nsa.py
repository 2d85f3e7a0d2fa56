"""Hugging Face export/import of --attention-mode nsa checkpoints: same logits as
megatron, bit-identical HF -> megatron -> HF round trip, cached generation == uncached, and a
directory that loads with transformers alone."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import ROOT, run_workers
from test_hf_conversion import STANDALONE_LOADER_PREAMBLE
from test_parallel import COMMON

CONVERT = [sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py")]
NSA = ["--attention-mode", "nsa", "--nsa-window-size", "24"]


def convert(*argv):
    proc = subprocess.run(CONVERT + list(argv), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def load_hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def nsa_source(tmp_path_factory, random_dataset):
    """A tiny NSA checkpoint (2 layers, hidden 64, seq 64, window 24, 3 steps), its logits, and
    its HF export."""
    root = tmp_path_factory.mktemp("nsa")
    save = str(root / "ckpt")
    res = run_workers("ckpt_workers:train_logits", 1, str(root / "run"), *COMMON, *NSA,
                      "--data-path", random_dataset, "--train-iters", "3", "--save", save)
    hf_dir = str(root / "hf")
    convert("to-hf", "--input", save, "--output", hf_dir)
    return dict(res, ckpt=save, hf=hf_dir, root=root)


def test_nsa_export_layout_and_logits(nsa_source):
    from ssa_megatron.convert.hf_ckpt import load_safetensors_dir
    from ssa_megatron.convert.megatron_ckpt import read_checkpoint
    hf_dir = nsa_source["hf"]
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    assert cfg["attention_mode"] == "nsa" and cfg["window_size"] == 24
    assert {"ssa_nsa.py", "ssa_ops.py", "modeling_ssa.py"} <= set(os.listdir(hf_dir))
    full, _, spec = read_checkpoint(nsa_source["ckpt"])
    hf = load_safetensors_dir(hf_dir)
    for i in range(2):  # g_proj is linear_gate as is: [3 * heads, hidden]
        g = hf[f"model.layers.{i}.self_attn.g_proj.weight"]
        assert g.shape == (3 * 8, 64)
        assert torch.equal(g, full[f"decoder.layers.{i}.self_attention.linear_gate.weight"])
    model = load_hf(hf_dir)
    with torch.no_grad():
        got = model(nsa_source["tokens"], use_cache=False).logits.float()
    # nsa computes the same three branches whatever the inference mode
    torch.testing.assert_close(got, nsa_source["logits"]["full"][..., :256], atol=1e-4, rtol=0)
    # the branches matter: dropping the window branch's gate changes the logits
    for layer in model.model.layers:
        layer.self_attn.g_proj.weight.data.view(8, 3, 64)[:, 2] = -1e4
    with torch.no_grad():
        assert (model(nsa_source["tokens"], use_cache=False).logits - got).abs().max() > 1e-3


def test_nsa_round_trip_is_bit_identical(tmp_path, nsa_source):
    from ssa_megatron.convert.hf_ckpt import load_safetensors_dir
    convert("from-hf", "--input", nsa_source["hf"], "--output", str(tmp_path / "m"),
            "--tensor-model-parallel-size", "2")
    meta = json.load(open(tmp_path / "m" / "iter_0000000" / "ssa_meta.json"))
    assert meta["args"]["attention_mode"] == "nsa" and meta["args"]["nsa_window_size"] == 24
    convert("to-hf", "--input", str(tmp_path / "m"), "--output", str(tmp_path / "b"))
    a, b = load_safetensors_dir(nsa_source["hf"]), load_safetensors_dir(str(tmp_path / "b"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (nsa_source["hf"], str(tmp_path / "b")))
    ca.pop("eos_token_id")  # (the HF dir has no tokenizer file: its eod is not carried back)
    assert ca == cb


def test_paper_layout_imports_all_three_gates_as_nsa(nsa_source):
    from ssa_megatron.convert.hf_ckpt import load_safetensors_dir, read_hf
    got, spec, flavour = read_hf(nsa_source["hf"])
    assert flavour == "ssa" and spec["attention_mode"] == "nsa" and spec["nsa_window_size"] == 24
    ref = load_safetensors_dir(nsa_source["hf"])
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
    # the same weights imported as SSA: the selection gate (row 3h + 1) only
    got, spec, _ = read_hf(nsa_source["hf"], attention_mode="ssa")
    g = ref["model.layers.0.self_attn.g_proj.weight"]
    assert torch.equal(got["model.layers.0.self_attn.g_proj.weight"], g.view(8, 3, 64)[:, 1])


def test_nsa_generation_with_cache_equals_without(nsa_source):
    model = load_hf(nsa_source["hf"])
    prompt = nsa_source["tokens"][:, :21]
    kw = dict(max_new_tokens=40, do_sample=False, min_new_tokens=40)  # past the window, many blocks
    with_cache = model.generate(prompt, use_cache=True, **kw)
    without = model.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape == (2, 61)
    assert torch.equal(with_cache, without)
    with torch.no_grad():  # step-wise cached logits (and a 5-token chunk) equal the full forward pass
        ref = model(with_cache, use_cache=False).logits
        out = model(with_cache[:, :30], use_cache=True)
        steps = [out.logits]
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        out = model(with_cache[:, 30:35], cache=cache, use_cache=True)
        steps.append(out.logits)
        for t in range(35, 61):
            out = model(with_cache[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-5, rtol=0)


CHECK_SCRIPT = STANDALONE_LOADER_PREAMBLE + r"""
from transformers import AutoModelForCausalLM
from safetensors.torch import load_file, save_file
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
tokens = load_file(sys.argv[2])["tokens"]
with torch.no_grad():
    logits = model(tokens, use_cache=False).logits.float().contiguous()
gen = model.generate(tokens[:, :10], max_new_tokens=8, min_new_tokens=8, do_sample=False)
save_file({"logits": logits, "gen": gen.contiguous()}, sys.argv[3])
print("modules:", sorted(m for m in sys.modules if m.startswith("ssa_megatron")))
"""


def test_nsa_export_loads_without_ssa_megatron(tmp_path, nsa_source):
    from safetensors.torch import load_file, save_file
    save_file({"tokens": nsa_source["tokens"].contiguous()}, str(tmp_path / "tokens.safetensors"))
    script = tmp_path / "check.py"
    script.write_text(CHECK_SCRIPT)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    proc = subprocess.run([sys.executable, str(script), nsa_source["hf"], str(tmp_path / "tokens.safetensors"),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "modules: []" in proc.stdout
    got = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(got["logits"], nsa_source["logits"]["full"][..., :256], atol=1e-4, rtol=0)
    assert got["gen"].shape == (2, 18)
