"""Evaluation: perplexity = exp(mean CE), full == sparse when the budget covers the
context, sparsity numbers == a brute-force softmax(QK^T), needle generator/scorer, DP=2 == DP=1."""
import importlib.util
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_workers
from test_parallel import COMMON

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
SEQ = 64  # the tiny model's training length (COMMON), 4 blocks of 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, random_dataset):
    root = tmp_path_factory.mktemp("eval")
    save = str(root / "ckpt")
    run_workers("train", 1, str(root / "train"), *COMMON, "--data-path", random_dataset,
                "--train-iters", "10", "--save", save)
    return save


@pytest.fixture(scope="module")
def loaded(ckpt, single_process_parallel_state):
    from ssa_megatron.eval.model import load_model
    model, spec, meta = load_model(ckpt, device="cpu", max_seq_length=2 * SEQ)
    return model, spec


def _windows(random_dataset, length, n):
    from ssa_megatron.eval import data as evdata
    stream = evdata.indexed_stream(random_dataset, "100,0,0", "all")
    return stream, evdata.make_windows(len(stream), length, None, n)


def test_perplexity_is_exp_mean_ce(loaded, random_dataset):
    from ssa_megatron.eval.data import batch_windows
    from ssa_megatron.eval.perplexity import evaluate_perplexity, reduce_perplexity
    from ssa_megatron.model.attention import set_inference_mode
    model, spec = loaded
    stream, windows = _windows(random_dataset, SEQ, 5)
    settings = [("full", None), ("sparse", 1), ("sparse", SEQ // 16)]
    res = reduce_perplexity(evaluate_perplexity(model, stream, windows, SEQ, settings, 2))
    # independently: logits of each window, F.cross_entropy, exp of the mean over all tokens
    tokens, labels, _ = batch_windows(stream, windows, SEQ)
    assert torch.equal(tokens[0], torch.as_tensor(stream[:SEQ].astype("int64")))
    for mode, bc in settings:
        set_inference_mode(model, mode, bc)
        with torch.no_grad():
            logits = model(tokens, torch.arange(SEQ).expand_as(tokens), None).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        assert res[(mode, bc)]["tokens"] == 5 * SEQ
        assert res[(mode, bc)]["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    # the budget covers the whole context: sparse is full attention
    assert res[("sparse", SEQ // 16)]["ppl"] == pytest.approx(res[("full", None)]["ppl"], rel=1e-5)
    assert res[("sparse", 1)]["ppl"] != pytest.approx(res[("full", None)]["ppl"], rel=1e-5)


def test_hybrid_sparse_mode_keeps_the_first_layers_full(loaded, random_dataset):
    """--dense-layers N: sparse mode with attention layers 1..N in full attention. N = all layers
    is full mode; N = 1 equals switching layer 1 to full by hand."""
    from ssa_megatron.eval.perplexity import evaluate_perplexity, reduce_perplexity, settings_for
    from ssa_megatron.model.attention import SSACoreAttention, set_inference_mode
    model, spec = loaded
    layers = [m for m in model.modules() if isinstance(m, SSACoreAttention)]
    stream, windows = _windows(random_dataset, SEQ, 3)
    settings = settings_for(["full", "sparse"], [1], dense_layers=[1, len(layers)])
    assert settings == [("full", None), ("sparse", 1), ("sparse+dense1", 1), (f"sparse+dense{len(layers)}", 1)]
    res = reduce_perplexity(evaluate_perplexity(model, stream, windows, SEQ, settings, 3))
    assert res[(f"sparse+dense{len(layers)}", 1)]["ppl"] == pytest.approx(res[("full", None)]["ppl"], rel=1e-6)
    set_inference_mode(model, "sparse", 1)
    layers[0].inference_mode = "full"  # by hand
    by_hand = reduce_perplexity(evaluate_perplexity(model, stream, windows, SEQ, [("by-hand", None)], 3))
    assert res[("sparse+dense1", 1)]["ppl"] == pytest.approx(by_hand[("by-hand", None)]["ppl"], rel=1e-6)
    assert res[("sparse+dense1", 1)]["ppl"] != pytest.approx(res[("sparse", 1)]["ppl"], rel=1e-5)
    set_inference_mode(model, "sparse", 1)  # a plain mode puts every layer back
    assert [m.inference_mode for m in layers] == ["sparse"] * len(layers)
    with pytest.raises(ValueError):
        set_inference_mode(model, None, 1, dense_layers=1)


def test_sparse_mode_under_other_selections(loaded, random_dataset):
    """--selections: 'sparse@NAME' evaluates sparse mode with that block selection in every layer;
    recent1 is SSA's own selection, a budget covering the context is full attention whatever the
    selection, and a plain setting afterwards is SSA's selection again."""
    from ssa_megatron.eval.perplexity import evaluate_perplexity, reduce_perplexity, settings_for
    from ssa_megatron.model.attention import SSACoreAttention
    model, spec = loaded
    stream, windows = _windows(random_dataset, SEQ, 3)
    settings = settings_for(["full", "sparse"], [2, SEQ // 16], selections=["oracle", "recent1"])
    assert settings == [("full", None), ("sparse", 2), ("sparse", 4), ("sparse@oracle", 2),
                        ("sparse@oracle", 4), ("sparse@recent1", 2), ("sparse@recent1", 4)]
    res = reduce_perplexity(evaluate_perplexity(model, stream, windows, SEQ,
                                                settings + [("sparse", 2)], 3))
    full = res[("full", None)]["ppl"]
    for name in ("sparse", "sparse@oracle", "sparse@recent1"):
        assert res[(name, 4)]["ppl"] == pytest.approx(full, rel=1e-5)
    assert res[("sparse@recent1", 2)]["ppl"] == pytest.approx(res[("sparse", 2)]["ppl"], rel=1e-6)
    assert res[("sparse@oracle", 2)]["ppl"] != pytest.approx(res[("sparse", 2)]["ppl"], rel=1e-5)
    assert {m.selection for m in model.modules() if isinstance(m, SSACoreAttention)} == {"pooled"}


def test_evaluate_refuses_an_unknown_selection(ckpt, random_dataset, tmp_path):
    from ssa_megatron.eval.cli import build_parser, check_inputs
    from ssa_megatron.eval.model import EvalError
    args = build_parser().parse_args(["--checkpoint", ckpt, "--data-path", random_dataset,
                                      "--selections", "oracle", "best"])
    with pytest.raises(EvalError, match="--selections: unknown block selection 'best'"):
        check_inputs(args)


def test_evaluate_says_a_missing_tokenizer_in_one_line(ckpt, random_dataset, tmp_path):
    """A --tokenizer that does not exist (a CorpusError of the data code) ends in the tool's one
    error line, not a traceback."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "evaluate.py"), "--checkpoint", ckpt,
                           "--data-path", random_dataset, "--device", "cpu", "--tokenizer",
                           str(tmp_path / "missing.model")], capture_output=True, text=True, cwd=root,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: tokenizer {tmp_path / 'missing.model'} does not exist")


def test_evaluate_refuses_sub_blocks_that_do_not_divide_the_block_size():
    """subN is checked against the checkpoint's block size before any window is evaluated."""
    from types import SimpleNamespace

    from ssa_megatron.eval.cli import evaluate_perplexities
    from ssa_megatron.eval.model import EvalError
    args = SimpleNamespace(dense_layers=[], selections=["sub4", "sub3"], modes=["sparse"],
                           block_counts=[2])
    ev = SimpleNamespace(args=args, shape={"ssa_block_size": 16, "num_layers": 2},
                         ssa_layers=[object()], notes=[], lengths=[])
    with pytest.raises(EvalError, match="--selections sub3: N must divide the block size 16"):
        evaluate_perplexities(ev)


def _brute_force(q, k, v, block_size, block_counts, gate=None):
    """Per (token, head) selected / top-k mass and the gap, from the explicit attention matrix."""
    from ssa_megatron.ops import reference
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    logits = torch.einsum("bihd,bjhd->bhij", q.double(), kk.double()) / math.sqrt(d)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), -1)  # [B, HQ, T, T]
    o_full = torch.einsum("bhij,bjhd->bihd", p, vv.double())
    gw = 1.0 if gate is None else gate.double().unsqueeze(-1)
    out = []
    for bc in block_counts:
        idx = reference.select_blocks(q, k, block_size, bc)
        mask = reference.selection_mask(idx, block_size, t).repeat_interleave(g, 1)  # [B, HQ, T, T]
        sel = (p * mask).sum(-1)  # [B, HQ, T]
        top = torch.zeros_like(sel)
        for bi in range(b):
            for h in range(hq):
                for i in range(t):
                    masses = sorted((float(p[bi, h, i, j: j + block_size].sum())
                                     for j in range(0, t, block_size)), reverse=True)
                    top[bi, h, i] = sum(masses[:bc])
        ps = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)
        o_sp = torch.einsum("bhij,bjhd->bihd", ps, vv.double())
        gap = ((o_sp - o_full) * gw).norm() / (o_full * gw).norm()
        out.append((sel, top, float(gap)))
    return out


def test_sparsity_numbers_equal_brute_force():
    from ssa_megatron.eval.sparsity import layer_attention_stats
    torch.manual_seed(0)
    b, t, hq, h, d, bs = 2, 72, 4, 2, 8, 16  # 72: a partial last block
    q, k, v = torch.randn(b, t, hq, d) * 2, torch.randn(b, t, h, d) * 2, torch.randn(b, t, h, d)
    gate = torch.rand(b, t, hq)
    bcs = [1, 2, 3, 5]
    got = layer_attention_stats(q, k, v, bs, bcs, gate=gate, chunk=16)
    assert float(got["tokens"]) == b * t
    for i, (sel, top, gap) in enumerate(_brute_force(q, k, v, bs, bcs, gate)):
        assert torch.allclose(got["selected_mass"][i], sel.sum((0, 2)), atol=1e-4)
        assert torch.allclose(got["topk_mass"][i], top.sum((0, 2)), atol=1e-4)
        assert torch.equal(got["selected_ge90"][i], (sel >= 0.9).double().sum((0, 2)))
        assert torch.equal(got["topk_ge90"][i], (top >= 0.9).double().sum((0, 2)))
        assert math.sqrt(float(got["gap_num"][i] / got["gap_den"])) == pytest.approx(gap, rel=1e-4, abs=1e-5)
    # 5 blocks cover all 72 tokens: nothing is dropped, no gap
    assert torch.allclose(got["selected_mass"][-1], torch.full((hq,), float(b * t), dtype=torch.float64))
    assert float(got["gap_num"][-1]) < 1e-8 * float(got["gap_den"])


def test_model_sparsity_hooks_match_brute_force(loaded, random_dataset):
    from ssa_megatron.eval.data import batch_windows
    from ssa_megatron.eval.sparsity import SparsityCollector
    from ssa_megatron.model.attention import SSACoreAttention, set_inference_mode
    model, spec = loaded
    stream, windows = _windows(random_dataset, SEQ, 2)
    tokens, _, _ = batch_windows(stream, windows, SEQ)
    captured = {}

    def grab(module, args, kwargs):
        gate = kwargs["packed_seq_params"].ssa_gate.transpose(0, 1).float()
        captured[module.layer_number] = [x.transpose(0, 1).detach().clone() for x in args[:3]] + [gate]

    cores = [m for m in model.modules() if isinstance(m, SSACoreAttention)]
    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in cores]
    bcs = [1, 2, SEQ // 16]
    col = SparsityCollector(model, bcs)
    set_inference_mode(model, "full")
    col.enabled = True
    try:
        with torch.no_grad():
            model(tokens, torch.arange(SEQ).expand_as(tokens), None)
    finally:
        col.close()
        for hd in handles:
            hd.remove()
    summary = col.summarize()
    assert [e["layer"] for e in summary["per_layer"]] == [1, 2]
    for entry in summary["per_layer"]:
        q, k, v, gate = captured[entry["layer"]]
        for bc, (sel, top, gap) in zip(bcs, _brute_force(q, k, v, 16, bcs, gate)):
            got = entry["by_block_counts"][str(bc)]
            assert got["dropped_mass"] == pytest.approx(1 - float(sel.mean()), abs=1e-5)
            assert got["topk_mass"] == pytest.approx(float(top.mean()), abs=1e-5)
            head_means = top.mean((0, 2))
            assert got["topk_ge90_heads"] == pytest.approx(float((head_means >= 0.9).double().mean()))
            assert got["selected_ge90_pairs"] == pytest.approx(float((sel >= 0.9).double().mean()))
            assert got["alignment_gap"] == pytest.approx(gap, rel=1e-3, abs=1e-6)
    full_budget = summary["mean"][str(SEQ // 16)]
    assert full_budget["dropped_mass"] == pytest.approx(0.0, abs=1e-6)
    assert full_budget["alignment_gap"] == pytest.approx(0.0, abs=1e-5)
    assert summary["mean"]["1"]["dropped_mass"] > 0.05


def test_windows_and_rope_scaling():
    from ssa_megatron.eval.data import make_windows, split_document_range
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from ssa_megatron.eval.model import set_rope_scaling
    ws = make_windows(1000, 100, stride=25)
    scored = [(w.start + w.score_from, w.start + 100) for w in ws]
    assert scored[0] == (0, 100) and all(a == prev[1] for a, prev in zip([s[0] for s in scored[1:]], scored))
    assert [w.start for w in make_windows(1000, 100)] == list(range(0, 900, 100))
    assert split_document_range(1000, "969,30,1", "valid") == (969, 999)
    model = torch.nn.Module()
    model.rotary_pos_emb = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, rotary_base=500000,
                                           use_cpu_initialization=True)
    inv = model.rotary_pos_emb.inv_freq.clone()
    torch.testing.assert_close(inv, 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64)))
    set_rope_scaling(model, 4.0, 64)
    sc = model.rotary_pos_emb.inv_freq
    wave = 2 * math.pi / inv
    assert torch.equal(sc[wave < 16], inv[wave < 16])           # high frequencies kept
    assert torch.allclose(sc[wave > 64], inv[wave > 64] / 4)     # low frequencies interpolated
    mid = (wave >= 16) & (wave <= 64)
    assert bool(((sc[mid] <= inv[mid]) & (sc[mid] >= inv[mid] / 4)).all())
    set_rope_scaling(model, 2.0, 64)  # from the model's own frequencies, not the last scaled ones
    assert torch.allclose(model.rotary_pos_emb.inv_freq[wave > 64], inv[wave > 64] / 2)
    set_rope_scaling(model, None, 64)
    assert torch.equal(model.rotary_pos_emb.inv_freq, inv)


class ByteTokenizer:
    eod = 0
    vocab_size = 256

    def tokenize(self, text):
        return list(text.encode())

    def document_prefix(self):
        return []

    def detokenize(self, ids):
        return bytes(int(i) for i in ids).decode(errors="replace")


def copy_next_token(tokens, m=10):
    """An induction 'model': find the last earlier occurrence of the final m tokens, copy what followed."""
    out = []
    for row in tokens.tolist():
        tail = row[-m:]
        nxt = 0
        for s in range(len(row) - m - 1, -1, -1):
            if row[s: s + m] == tail:
                nxt = row[s + m]
                break
        out.append(nxt)
    return torch.tensor(out)


def test_needle_generator_and_scorer():
    from ssa_megatron.eval.needle import make_needle_set, needle_accuracy, score_answer
    tok = ByteTokenizer()
    samples = make_needle_set(tok, [600, 900], [0.0, 0.5, 1.0], trials=2)
    assert len(samples) == 12
    for s in samples:
        assert len(s.tokens) in (600, 900)
        text = tok.detokenize(s.tokens)
        needle = f"The secret number of the {s.key} is {s.answer}."
        assert text.count(s.answer) == 1 and needle in text
        assert text.endswith(f"The secret number of the {s.key} is")
        where = text.index(needle) / len(text)
        assert abs(where - s.depth * (1 - 90 / len(text))) < 0.1
    assert score_answer(" 48213.", "48213") == 1.0 and score_answer(" 4821", "48213") == 0.0
    recs = needle_accuracy(samples, tok, copy_next_token, micro_batch_size=4)
    assert len(recs) == 12 and all(r["score"] == 1.0 for r in recs)
    wrong = needle_accuracy(samples, tok, lambda t: torch.full((t.shape[0],), ord("7")), 4)
    assert all(r["score"] == 0.0 for r in wrong)


def test_text_stream_tokenises_with_eod(tmp_path):
    from ssa_megatron.eval.data import text_stream
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": "c"}) + "\n")
    assert text_stream([str(p)], ByteTokenizer()).tolist() == [97, 98, 0, 99, 0]

    class WithBos(ByteTokenizer):  # as the preprocessor writes an imported Llama's documents
        def document_prefix(self):
            return [1]
    assert text_stream([str(p)], WithBos()).tolist() == [1, 97, 98, 0, 1, 99, 0]
    # the training data's recorded prefix wins over the tokenizer's guess
    assert text_stream([str(p)], WithBos(), prefix=[]).tolist() == [97, 98, 0, 99, 0]


def evaluate_worker(out_dir, *argv):
    """tests/dist_workers.py entry: tools/evaluate.py's main on this rank."""
    import torch.distributed as dist
    from ssa_megatron.eval.cli import main
    path = os.path.join(out_dir, "eval.json")
    plot = ["--plot", os.path.join(out_dir, "eval.png")] if HAS_MPL else []
    assert main(list(argv) + ["--json", path, "--quiet"] + plot) == 0
    if int(os.environ.get("RANK", "0")) == 0:
        with open(path) as f:
            torch.save(json.load(f), os.path.join(out_dir, "result.pt"))


def test_cli_outputs_and_two_ranks_agree(tmp_path, ckpt, random_dataset):
    flags = ["--checkpoint", ckpt, "--data-path", random_dataset, "--split", "90,10,0",
             "--split-name", "valid", "--seq-length", str(SEQ), str(2 * SEQ), "--stride", "32",
             "--rope-scaling-factor", "auto", "--block-counts", "1", "2", "4",
             "--max-windows", "4", "--micro-batch-size", "2", "--sparsity-windows", "2",
             "--selections", "oracle"]
    one = run_workers("test_evaluate:evaluate_worker", 1, str(tmp_path / "dp1"), *flags)
    two = run_workers("test_evaluate:evaluate_worker", 2, str(tmp_path / "dp2"), *flags)
    if HAS_MPL:  # matplotlib is the optional [plots] extra
        assert os.path.getsize(tmp_path / "dp1" / "eval.png") > 1000
    rows = {(r["seq_length"], r["mode"], r["block_counts"]): r for r in one["perplexity"]}
    assert len(rows) == 14 and rows[(2 * SEQ, "full", None)]["rope_scaling_factor"] == 2.0
    assert rows[(SEQ, "sparse", 4)]["ppl"] == pytest.approx(rows[(SEQ, "full", None)]["ppl"], rel=1e-5)
    assert rows[(SEQ, "sparse@oracle", 4)]["ppl"] == pytest.approx(rows[(SEQ, "full", None)]["ppl"], rel=1e-5)
    # stride 32: the first window scores 64 targets, the other three 32 each
    assert rows[(SEQ, "full", None)]["tokens"] == 64 + 3 * 32
    for r in two["perplexity"]:
        r1 = rows[(r["seq_length"], r["mode"], r["block_counts"])]
        assert r["tokens"] == r1["tokens"] and r["ppl"] == pytest.approx(r1["ppl"], rel=1e-5)
    for bc in ("1", "2", "4"):
        assert two["sparsity"]["mean"][bc]["dropped_mass"] == pytest.approx(
            one["sparsity"]["mean"][bc]["dropped_mass"], rel=1e-6)
    assert one["sparsity"]["mean"]["4"]["dropped_mass"] == pytest.approx(0.0, abs=1e-6)


def test_backend_parity_tool_on_a_trained_checkpoint(ckpt, random_dataset, tmp_path):
    """tools/check_backend_parity.py: Triton (interpreter, fp32) and reference give the same
    losses and gradients for both branches, with and without the LM loss."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "parity.json"
    env = dict(os.environ, PYTHONPATH=root, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "check_backend_parity.py"),
                           "--checkpoint", ckpt, "--data-path", random_dataset, "--split", "50,50,0",
                           "--micro-batch-size", "2", "--tolerance", "1e-4", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["dtype"] == "fp32" and len(report["cases"]) == 4
    for case in report["cases"]:
        assert abs(case["lm_triton"] - case["lm_reference"]) < 1e-5
        assert case["worst_grad_rel"] < 1e-4 and case["worst_tensor"] is not None
        assert case["align_triton"] == pytest.approx(case["align_reference"], rel=1e-5)


def test_document_masks_are_refused_for_megatron_local_layers(monkeypatch, single_process_parallel_state):
    """megatron's local attention takes no document boundaries: evaluating such a checkpoint with
    --reset-attention-mask on ends in one line that says what to change."""
    from ssa_megatron.eval import cli
    from ssa_megatron.eval import model as evmodel
    from ssa_megatron.model.shape import ModelShape
    sizes = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                 num_query_groups=2, vocab_size=256)
    shape = dict(ModelShape(**sizes), train_seq_length=SEQ, layer_spec="megatron-local",
                 reset_attention_mask=False)  # what load_model returns for such a checkpoint
    monkeypatch.setattr(evmodel, "init_single_process_or_dp", lambda seed: None)
    monkeypatch.setattr(evmodel, "load_model", lambda *a, **kw: (None, shape, {"args": {}}))
    args = cli.build_parser().parse_args(["--checkpoint", "x", "--data-path", "y",
                                          "--reset-attention-mask", "on"])
    with pytest.raises(evmodel.EvalError, match="use --reset-attention-mask off"):
        cli.load_evaluation(args)
    args = cli.build_parser().parse_args(["--checkpoint", "x", "--data-path", "y"])
    monkeypatch.setattr(cli, "_find_tokenizer", lambda *a: None)
    assert cli.load_evaluation(args).reset is False  # auto: the checkpoint's own setting


def test_generate_picks_device_and_dtype(monkeypatch):
    """tools/generate.py: the GPU in bf16 when there is one, else the CPU in fp32; asking for a GPU
    that is not there ends in one line."""
    import torch

    from ssa_megatron.eval.generate import device_and_dtype
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_and_dtype("auto", "auto") == (torch.device("cpu"), torch.float32, "fp32")
    assert device_and_dtype("cpu", "bf16")[1] is torch.bfloat16
    with pytest.raises(SystemExit, match="--device cpu"):
        device_and_dtype("cuda", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_and_dtype("auto", "auto") == (torch.device("cuda"), torch.bfloat16, "bf16")


def test_data_of_another_tokenizer_is_noted(tmp_path, random_dataset):
    """Evaluating on data tokenized with another tokenizer than the checkpoint's (same vocabulary
    size, so nothing else notices): a note says the perplexities are not comparable."""
    from types import SimpleNamespace

    from ssa_megatron.eval.cli import read_evaluation_data
    with open(random_dataset + ".tokenizer.json") as f:
        given = json.load(f)["tokenizer"]["sha256"]
    args = SimpleNamespace(data_path=random_dataset, split="90,10,0", split_name="valid", text=None)
    for trained, noted in ((given, False), ("f" * 64, True)):
        ev = SimpleNamespace(args=args, meta={"args": {"split": "90,10,0"},
                                              "data": {"tokenizer": {"kind": "synthetic", "sha256": trained}}},
                             notes=[], tokenizer=None, reset=False)
        read_evaluation_data(ev)
        assert any("was tokenized with another tokenizer" in n for n in ev.notes) is noted, ev.notes


def test_generate_refuses_bad_inputs_in_one_line(tmp_path, capsys):
    """generate.py: a training checkpoint as --model names the to-hf command with another
    output folder; an empty prompt and a zero block budget are refused before any model loads."""
    from ssa_megatron.eval.generate import main
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("iter_0000002")
    assert main(["--model", str(ckpt), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--input {ckpt} --output {ckpt}-hf," in err and "\n" not in err
    (ckpt / "config.json").write_text("{}")
    for flags, says in ((["--prompt", ""], "--prompt is empty"),
                        (["--prompt", "x", "--block-counts", "0"], "--block-counts must be at least 1")):
        assert main(["--model", str(ckpt), *flags]) == 2
        assert says in capsys.readouterr().err
    # an exported directory without tokenizer files (to-hf only notes their absence)
    assert main(["--model", str(ckpt), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --model {ckpt} holds no tokenizer") and "\n" not in err
    (ckpt / "tokenizer.json").write_text("not json")
    assert main(["--model", str(ckpt), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot load the tokenizer of {ckpt}") and "\n" not in err


def test_evaluation_data_defaults_to_what_the_checkpoint_trained_on(tmp_path, random_dataset):
    """Without --data-path or --text: the one dataset the checkpoint recorded, when it is here;
    a blend, or data not on this machine, is one line naming it."""
    from ssa_megatron.eval import cli
    from ssa_megatron.eval.model import EvalError
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000003").mkdir(parents=True)
    (ckpt / "latest").write_text("iter_0000003")

    def checked(data_path):
        (ckpt / "iter_0000003" / "ssa_meta.json").write_text(json.dumps({"data": {"data_path": data_path}}))
        args = cli.build_parser().parse_args(["--checkpoint", str(ckpt)])
        cli.check_inputs(args)
        return args

    assert checked([random_dataset]).data_path == random_dataset
    for data_path, why in (([str(tmp_path / "gone")], "not on this machine"),
                           (["0.5", random_dataset, "0.5", random_dataset], "a blend")):
        with pytest.raises(EvalError, match=why):
            checked(data_path)


def test_generation_past_the_trained_context_is_noted():
    """generate.py notes a generation that runs past the context the model trained at, with the
    largest --max-new-tokens that stays inside (or, when the prompt alone fills it, to shorten it)."""
    from ssa_megatron.eval.generate import context_note
    assert context_note(100, 28, 128) is None
    note = context_note(100, 64, 128)
    assert note.startswith("note: the prompt (100 tokens) plus --max-new-tokens 64 run past the model's "
                           "128 positions")
    assert note.endswith("--max-new-tokens 28 or fewer stays inside it")
    assert context_note(128, 1, 128).endswith("shorten the prompt to stay inside it")


def test_a_checkpoint_that_records_no_score_evaluates_with_the_mean_score():
    """Checkpoints saved before --ssa-selection-score existed select as they trained, with the
    paper's mean score, although a new training run now defaults to sub4; a recorded score is
    kept."""
    from ssa_megatron.eval.model import _namespace_from_meta
    recorded = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                    attention_mode="ssa")
    assert _namespace_from_meta(recorded).ssa_selection_score == "mean"
    assert _namespace_from_meta(dict(recorded, ssa_selection_score="sub4")).ssa_selection_score == "sub4"
