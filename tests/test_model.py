"""SSA model in one process: gradient injection, modes, inference switches, clear errors."""
import pytest
import torch

from model_utils import build_tiny_model, ce_loss, full_grads, random_batches, tiny_args
from ssa_megatron.model import SSACoreAttention, align_loss, draw_mode, set_inference_mode
from ssa_megatron.model.runtime import forward_params
from ssa_megatron.model.align_loss import AlignLossAutoScaler, AlignLossLoggingHelper
from ssa_megatron.model.config import ConfigError


@pytest.fixture(autouse=True)
def _loss_scale_reset():
    yield
    AlignLossAutoScaler.set_loss_scale(1.0)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("gas", [1, 3])
def test_injected_alignment_gradient_equals_direct_autograd(single_process_parallel_state, gas,
                                                            monkeypatch):
    args = tiny_args("--ssa-align-coef", "1000")  # make the alignment term visible in grads
    model = build_tiny_model(args)
    batches = random_batches(gas)
    modes = [draw_mode(7, 0, i) for i in range(gas)]

    # what the trainer does: CE scaled by 1/GAS (as DeepSpeed does), alignment via the autoscaler
    model.zero_grad()
    AlignLossAutoScaler.set_loss_scale(1.0 / gas)
    for mode, batch in zip(modes, batches):
        (ce_loss(model, batch, branch=mode) / gas).backward()
    injected = _grads(model)

    # direct: (CE + alpha * mean-over-layers alignment) / GAS through plain autograd; the layers
    # hand their weighted alignment loss (with graph) to us instead of the autoscaler
    model.zero_grad()
    for mode, batch in zip(modes, batches):
        collected = []
        with monkeypatch.context() as patch:
            patch.setattr(align_loss, "attach_alignment_loss",
                          lambda output, weighted: collected.append(weighted) or output)
            loss = ce_loss(model, batch, branch=mode) + sum(collected)
        assert len(collected) == args.num_layers
        (loss / gas).backward()
    direct = _grads(model)

    # and CE alone, so the test would notice a missing alignment gradient
    model.zero_grad()
    AlignLossAutoScaler.set_loss_scale(0.0)
    for mode, batch in zip(modes, batches):
        (ce_loss(model, batch, branch=mode) / gas).backward()
    ce_only = _grads(model)

    assert injected.keys() == direct.keys()
    differs = 0
    for name in direct:
        torch.testing.assert_close(injected[name], direct[name], atol=1e-6, rtol=1e-5, msg=name)
        if not torch.allclose(direct[name], ce_only[name], atol=1e-6, rtol=1e-4):
            differs += 1
    assert differs > 0, "alignment loss had no effect on any gradient"
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert not torch.allclose(direct[qkv], ce_only[qkv], atol=1e-6, rtol=1e-4)


def test_selection_alignment_loss_trains_through_the_autoscaler(single_process_parallel_state,
                                                                monkeypatch):
    """--ssa-select-align-coef: each SSA layer adds coef / layers x its selection loss (sampled
    rows) through the autoscaler, in both branches; the tracker records it; coef 0 adds none."""
    from ssa_megatron.ops import selection_loss
    args = tiny_args("--ssa-align-coef", "0", "--ssa-select-align-coef", "50")
    model = build_tiny_model(args)
    batch = random_batches(1)[0]
    tracker = AlignLossLoggingHelper.selection_tracker
    tracker.configure(args.num_layers)

    def injected(coef):
        for m in model.modules():
            if isinstance(m, SSACoreAttention):
                m.select_align_coef = coef
        model.zero_grad()
        torch.manual_seed(3)  # the sampled rows
        ce_loss(model, batch, branch=torch.tensor([True, False])).backward()
        return _grads(model)

    with_loss, without = injected(50.0), injected(0.0)
    assert tracker._count.tolist() == [1.0] * args.num_layers and bool((tracker._sum > 0).all())

    # direct autograd of CE + the weighted losses the layers hand over, on the same rows
    model.zero_grad()
    collected, losses = [], []
    real = selection_loss.selection_alignment_loss
    for m in model.modules():
        if isinstance(m, SSACoreAttention):
            m.select_align_coef = 50.0
    with monkeypatch.context() as patch:
        patch.setattr(align_loss, "attach_alignment_loss",
                      lambda output, weighted: collected.append(weighted) or output)
        patch.setattr(selection_loss, "selection_alignment_loss",
                      lambda *a, **kw: losses.append(real(*a, **kw)) or losses[-1])
        torch.manual_seed(3)
        loss = ce_loss(model, batch, branch=torch.tensor([True, False]))
        (loss + sum(collected)).backward()
    assert len(losses) == args.num_layers and len(collected) == 2 * args.num_layers
    direct = _grads(model)
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    torch.testing.assert_close(with_loss[qkv], direct[qkv], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(with_loss[qkv], without[qkv], atol=1e-6, rtol=1e-4)
    with pytest.raises(ConfigError, match="needs --attention-mode ssa"):
        tiny_args("--attention-mode", "full", "--ssa-select-align-coef", "1")


def _sparsity_through_the_hook(model, layer, batch):
    """evaluate.py's sparsity analysis of one forward (full mode, first sequence): the selected
    mass (k = 2) it records for ``layer``, and the q, k, v that layer saw."""
    from ssa_megatron.eval.sparsity import SparsityCollector
    collector = SparsityCollector(model, [2])
    set_inference_mode(model, "full")
    model.eval()
    captured = {}
    hook = layer.register_forward_pre_hook(
        lambda m, a, kw: captured.update(qkv=[x.transpose(0, 1) for x in a[:3]]), with_kwargs=True)
    collector.enabled = True
    with torch.no_grad():
        model(batch["tokens"][:1], batch["position_ids"][:1], None)
    hook.remove()
    collector.close()
    return collector.stats[layer.layer_number]["selected_mass"], captured["qkv"]


def test_a_selection_map_is_trained_by_the_selection_loss_alone(single_process_parallel_state):
    """--ssa-select-proj: the selection scores q + q P_h (P_h = 0 at init: SSA's own selection);
    the selection loss trains P and nothing else, and P changes which blocks are selected."""
    from ssa_megatron.ops import reference
    args = tiny_args("--ssa-select-proj", "--ssa-select-align-coef", "50", "--ssa-align-coef", "0")
    model = build_tiny_model(args)
    layers = [m for m in model.modules() if isinstance(m, SSACoreAttention)]
    assert all(m.select_proj is not None and float(m.select_proj.abs().max()) == 0 for m in layers)
    batch = random_batches(1)[0]

    def grads(coef):
        for m in layers:
            m.select_align_coef = coef
        model.zero_grad()
        torch.manual_seed(3)
        ce_loss(model, batch, branch=torch.tensor([True, False])).backward()
        return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in model.named_parameters()}

    on, off = grads(50.0), grads(0.0)
    for name in on:
        if name.endswith("select_proj"):
            assert float(on[name].abs().max()) > 0 and float(off[name].abs().max()) == 0, name
        else:
            torch.testing.assert_close(on[name], off[name], atol=0, rtol=0, msg=name)
    q = torch.randn(1, 64, 8, 8)  # the tiny model's 8 query heads of 8, 2 kv heads
    k = torch.randn(1, 64, 2, 8)
    layer = layers[0]
    assert torch.equal(layer.selection_query(q), q)
    with torch.no_grad():
        layer.select_proj.copy_(torch.randn_like(layer.select_proj))
    moved = layer.selection_query(q)
    assert not torch.equal(reference.select_blocks(moved, k, 16, 2), reference.select_blocks(q, k, 16, 2))
    # every place that selects blocks scores with the map: the sparse branch ...
    v = torch.randn_like(k)
    _, used = layer.sparse_branch(q, k, v, None, return_indices=True)
    assert torch.equal(used, reference.select_blocks(moved, k, 16, 2))
    # ... and evaluate.py's sparsity analysis (selected mass with the map's selection)
    from ssa_megatron.eval.sparsity import layer_attention_stats
    got, (cq, ck, cv) = _sparsity_through_the_hook(model, layer, batch)
    with_map = layer_attention_stats(cq, ck, cv, 16, [2], gap=False, q_select=layer.selection_query(cq))
    without = layer_attention_stats(cq, ck, cv, 16, [2], gap=False)
    assert torch.allclose(got, with_map["selected_mass"]) and not torch.allclose(got, without["selected_mass"])
    with pytest.raises(ConfigError, match="add --ssa-select-align-coef"):
        tiny_args("--ssa-select-proj")


@pytest.mark.parametrize("score", ["moment2", "sub4"])
def test_selection_scores_reach_every_place_that_selects(single_process_parallel_state, score):
    """--ssa-selection-score moment2 / sub4: the sparse branch, the diagnostics probe and evaluate.py's
    sparsity analysis select with it; "mean" keeps the paper's; misuse is one line."""
    from ssa_megatron.eval.sparsity import layer_attention_stats
    from ssa_megatron.ops import reference
    plain = build_tiny_model(tiny_args("--ssa-selection-score", "mean"))
    model = build_tiny_model(tiny_args("--ssa-selection-score", score))
    layer = [m for m in model.modules() if isinstance(m, SSACoreAttention)][0]
    assert layer.selection_score == score
    assert [m for m in plain.modules() if isinstance(m, SSACoreAttention)][0].selection_score == "mean"
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 8, 8, generator=gen)
    k = torch.randn(1, 64, 2, 8, generator=gen) * torch.rand(1, 64, 2, 8, generator=gen) * 2
    want = reference.select_blocks(q, k, 16, 2, score=score)
    assert not torch.equal(want, reference.select_blocks(q, k, 16, 2))
    _, used = layer.sparse_branch(q, k, torch.randn_like(k), None, return_indices=True)
    assert torch.equal(used, want)
    from ssa_megatron.model.diagnostics import AttentionProbe
    probe = AttentionProbe(samples=8)
    probe.record(layer, q, k, None, None, None, None, None)
    mean_probe = AttentionProbe(samples=8)
    layer.selection_score = "mean"
    mean_probe.record(layer, q, k, None, None, None, None, None)
    layer.selection_score = score
    assert probe.layers != mean_probe.layers
    # evaluate.py's sparsity analysis, through its hook on a forward of the model
    with torch.no_grad():
        for name, param in model.named_parameters():  # sharper attention than at init
            if "linear_qkv" in name:
                param.mul_(8)
    got, (cq, ck, cv) = _sparsity_through_the_hook(model, layer, random_batches(1)[0])
    stats = layer_attention_stats(cq, ck, cv, 16, [2], gap=False, score=score)
    mean = layer_attention_stats(cq, ck, cv, 16, [2], gap=False)
    assert torch.allclose(got, stats["selected_mass"], rtol=0, atol=1e-9)
    assert not torch.allclose(got, mean["selected_mass"], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="needs --attention-mode ssa or sparse"):
        tiny_args("--ssa-selection-score", score, "--attention-mode", "full")
    with pytest.raises(ConfigError, match="keep --ssa-selection-score mean"):
        tiny_args("--ssa-selection-score", score, "--ssa-select-align-coef", "1")
    # the map with moment2 is named as such, with or without the loss (not "add the loss" first)
    for loss in ([], ["--ssa-select-align-coef", "1"]):
        with pytest.raises(ConfigError, match=f"cannot go with --ssa-selection-score {score}; drop one"):
            tiny_args("--ssa-selection-score", score, "--ssa-select-proj", *loss)
    if score == "moment2":
        with pytest.raises(ConfigError, match="use heads of at most 64 channels"):
            tiny_args("--ssa-selection-score", score, "--kv-channels", "128")
    else:
        tiny_args("--ssa-selection-score", score, "--kv-channels", "128")  # no kernel limit
        with pytest.raises(ConfigError, match="use an --ssa-block-size that 4 divides"):
            tiny_args("--ssa-selection-score", score, "--ssa-block-size", "2")
    # a resume that changes the score is named in the recipe note
    from ssa_megatron.training.ssa_recipe import recipe_change_note
    note = recipe_change_note(vars(tiny_args("--ssa-selection-score", "mean")),
                              tiny_args("--ssa-selection-score", score))
    assert note is not None and "ssa_selection_score" in note.replace("-", "_")


def test_modes_select_branches(single_process_parallel_state):
    args = tiny_args()
    model = build_tiny_model(args)
    batch = random_batches(1)[0]
    with torch.no_grad():
        train_full = ce_loss(model, batch, branch="full")
        train_sparse = ce_loss(model, batch, branch="sparse")
    assert not torch.allclose(train_full, train_sparse)
    model.eval()
    with torch.no_grad():
        set_inference_mode(model, "full")
        assert torch.allclose(ce_loss(model, batch), train_full)
        set_inference_mode(model, "sparse")
        assert torch.allclose(ce_loss(model, batch), train_sparse)
        # a budget covering the whole context makes sparse equal full
        set_inference_mode(model, "sparse", block_counts=64 // 16)
        assert torch.allclose(ce_loss(model, batch), train_full, atol=1e-6)
    cores = [m for m in model.modules() if isinstance(m, SSACoreAttention)]
    assert len(cores) == args.num_layers and all(c.block_counts == 4 for c in cores)
    with pytest.raises(ValueError, match="full or sparse"):
        set_inference_mode(model, "dense")


def test_training_without_a_mode_is_refused(single_process_parallel_state):
    model = build_tiny_model(tiny_args())
    with pytest.raises(RuntimeError, match="forward_params"):
        ce_loss(model, random_batches(1)[0])


def test_nothing_of_a_forward_stays_on_the_layers(single_process_parallel_state):
    """The branch, the gate and a probe travel in the forward's packed_seq_params: after a forward
    no attention module holds a tensor or setting of it, the next forward without a branch is
    refused (not trained on the last one), and a probe records only the forward it went with."""
    from ssa_megatron.model.diagnostics import AttentionProbe
    model = build_tiny_model(tiny_args())
    batch = random_batches(1)[0]
    before = {id(m): dict(vars(m)) for m in model.modules() if isinstance(m, SSACoreAttention)}
    probe = AttentionProbe()
    with torch.no_grad():
        full = ce_loss(model, batch, forward_params(seq_length=batch["tokens"].shape[-1], ssa_branch="full", ssa_probe=probe))
        assert sorted(r["layer"] for r in probe.summary()) == [1, 2]
        probe.layers.clear()
        with pytest.raises(RuntimeError, match="forward_params"):
            ce_loss(model, batch)
        assert not torch.allclose(ce_loss(model, batch, branch="sparse"), full)
        torch.testing.assert_close(ce_loss(model, batch, branch="full"), full)
    assert probe.summary() == []
    after = {id(m): dict(vars(m)) for m in model.modules() if isinstance(m, SSACoreAttention)}
    assert after.keys() == before.keys()
    for key in after:
        assert after[key].keys() == before[key].keys()
        assert not any(isinstance(v, torch.Tensor) for k, v in after[key].items() if k != "_parameters")
    with pytest.raises(ValueError, match="unknown SSA branch"):
        forward_params(ssa_branch="dense")


def test_a_recomputed_layer_is_probed_once(single_process_parallel_state, monkeypatch):
    """Under --recompute-activations the layers run their forward again in backward with the
    same arguments, the probe included: it records each layer once."""
    from ssa_megatron.model import diagnostics
    from ssa_megatron.model.diagnostics import AttentionProbe
    model = build_tiny_model(tiny_args("--recompute-activations"))
    calls, real = [], diagnostics.attention_stats
    monkeypatch.setattr(diagnostics, "attention_stats", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    batch = random_batches(1)[0]
    probe = AttentionProbe()
    ce_loss(model, batch, forward_params(seq_length=batch["tokens"].shape[-1], ssa_branch="full",
                                         ssa_probe=probe)).backward()
    assert len(calls) == 2 and sorted(r["layer"] for r in probe.summary()) == [1, 2]


def test_stock_megatron_layers_train_with_diagnostics(tmp_path, random_dataset):
    """--layer-spec megatron-local (megatron's own attention, which takes no packed_seq_params):
    the trainer hands SSA's per-forward data only to SSA layers."""
    from dist_utils import run_workers
    from test_parallel import COMMON
    result = run_workers("train", 1, str(tmp_path / "local"), *COMMON, "--data-path", random_dataset,
                         "--train-iters", "2", "--attention-mode", "full", "--layer-spec", "megatron-local",
                         "--diagnostics-interval", "1", "--diagnostics-json", str(tmp_path / "diag.jsonl"))
    assert len(result["lm_loss"]) == 2


def test_baseline_modes_train_one_branch(single_process_parallel_state):
    batch = random_batches(1)[0]
    for mode in ("full", "sparse"):
        model = build_tiny_model(tiny_args("--attention-mode", mode))
        AlignLossLoggingHelper.tracker.reset()
        ce_loss(model, batch).backward()
        assert AlignLossLoggingHelper.tracker._count.sum() == 0  # no alignment loss in the baselines
        assert model.decoder.layers[0].self_attention.linear_gate.weight.grad.abs().sum() > 0


def test_fused_swiglu_and_cross_entropy_match_the_unfused_model(single_process_parallel_state):
    """--bias-swiglu-fusion / --cross-entropy-loss-fusion (megatron-core's torch.compile kernels,
    on by default with CUDA) change no loss and no gradient beyond rounding."""
    from ssa_megatron.model.pipeline import lm_loss_fn
    batch = random_batches(1)[0]
    results = []
    for flag in ("--no-", "--"):
        model = build_tiny_model(tiny_args(f"{flag}bias-swiglu-fusion"))
        assert model.config.bias_activation_fusion == (flag == "--")
        loss = ce_loss(model, batch, branch="sparse")
        loss.backward()
        results.append((loss.detach(), full_grads(model)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-7, rtol=1e-5, msg=name)
    # the fused cross entropy works on bf16 logits (it returns bf16 gradients): the pipeline's
    # loss, forward and backward, against the unfused one
    logits = torch.randn(64, 2, 120, dtype=torch.bfloat16) * 3  # [s, b, vocab]
    labels = (batch["labels"], torch.ones(2, 64))
    grads = []
    for fused in (True, False):
        x = logits.clone().requires_grad_(True)
        loss = lm_loss_fn(x, labels, fused=fused)
        loss.backward()
        grads.append((loss.detach(), x.grad.float()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-2)
    with pytest.raises(ConfigError, match="--bf16"):
        tiny_args("--cross-entropy-loss-fusion")


def test_optimizer_flags_win_over_the_deepspeed_json(tmp_path, capsys):
    import json

    from ssa_megatron.training.arguments import load_deepspeed_config
    json_path = tmp_path / "ds.json"
    json_path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "optimizer": {
        "type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                    "weight_decay": 0.1, "torch_adam": True}}}))
    args = tiny_args("--deepspeed-config", str(json_path), "--lr", "3e-4", "--weight-decay", "0.01",
                     "--adam-beta2", "0.99", "--adam-eps", "1e-6")
    params = load_deepspeed_config(args, 1)["optimizer"]["params"]
    assert params["lr"] == 3e-4 and params["weight_decay"] == 0.01
    assert params["betas"] == [0.9, 0.99] and params["eps"] == 1e-6 and params["torch_adam"]
    note = capsys.readouterr().err
    assert "lr 0.001 -> 0.0003" in note and str(json_path) in note  # said, not silent
    default = load_deepspeed_config(tiny_args("--lr", "2e-4"), 1)["optimizer"]
    assert default["type"] == "AdamW" and default["params"]["lr"] == 2e-4


def test_mode_draw_is_deterministic_and_balanced():
    draws = [draw_mode(1234, it, mb) for it in range(200) for mb in range(4)]
    assert draws == [draw_mode(1234, it, mb) for it in range(200) for mb in range(4)]
    assert 0.4 < draws.count("full") / len(draws) < 0.6
    assert draws != [draw_mode(99, it, mb) for it in range(200) for mb in range(4)]
    assert all(draw_mode(1, i, 0, full_prob=1.0) == "full" for i in range(20))
    assert all(draw_mode(1, i, 0, full_prob=0.0) == "sparse" for i in range(20))


@pytest.mark.parametrize("flags,message", [
    (["--seq-length", "70"], "not a multiple of --ssa-block-size"),
    (["--tensor-model-parallel-size", "4", "--num-query-groups", "2"], "not divisible by --tensor-model-parallel-size"),
    (["--attention-mode", "dense"], "unknown --attention-mode"),
    (["--num-query-groups", "3"], "not a multiple of --num-query-groups"),
    (["--ssa-full-prob", "1.5"], "must lie in"),
])
def test_bad_layouts_fail_with_one_clear_line(flags, message):
    with pytest.raises(ConfigError, match=message):
        tiny_args(*flags)


def test_missing_data_path_is_refused(capsys):
    from ssa_megatron.training.arguments import parse_args
    argv = [a for a in tiny_args.__globals__["TINY"] if a not in ("--data-path", "unused")]
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert err.value.code == 2
    assert "no training data: pass --data-path" in capsys.readouterr().err
