"""SSA training recipes: per-sequence branch draws, schedules, attention diagnostics, evaluation
in several modes, and the quality-study summary."""
import json
import math
import os

import pytest
import torch

from dist_utils import run_workers
from ssa_megatron.model.diagnostics import attention_stats
from ssa_megatron.model.runtime import (PiecewiseLinear, collapse_branches, draw_sequence_branches,
                                        forward_params, packed_documents)
from ssa_megatron.ops import reference
from ssa_megatron.training.ssa_recipe import first_sample_of_micro

FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64",
         "--ssa-block-counts", "1", "--lr", "2e-3", "--log-interval", "1", "--num-workers", "0",
         "--zero-stage", "0", "--adam-eps", "1e-4", "--ssa-branch-draw", "sequence",
         "--global-batch-size", "4", "--train-iters", "2", "--seed", "3"]


def test_piecewise_schedule_interpolates_and_names_bad_specs():
    s = PiecewiseLinear("0:1.0,100:1.0,0.5:0.5", train_iters=400)  # 0.5 of 400 = step 200
    assert [s(i) for i in (0, 100, 150, 200, 300)] == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.5])
    with pytest.raises(ValueError, match="ITER:VALUE"):
        PiecewiseLinear("0-1.0", train_iters=10, name="--ssa-full-prob-schedule")
    down = PiecewiseLinear("0:1.0,100:1.0,100:0.5,200:0.5", train_iters=400)  # a step, as written
    assert [down(i) for i in (50, 100, 101, 300)] == pytest.approx([1.0, 1.0, 0.5, 0.5])


def test_diagnostics_record_dense_steps_then_every_interval(tmp_path):
    from types import SimpleNamespace
    from ssa_megatron.training.diagnostics import Diagnostics
    args = SimpleNamespace(diagnostics_interval=10, diagnostics_dense_until=3, diagnostics_json=None,
                           save=str(tmp_path))
    diag = Diagnostics(args, SimpleNamespace(module=torch.nn.Linear(2, 2)), {})
    assert [s for s in range(1, 41) if diag.due(s)] == [1, 2, 3, 10, 20, 30, 40]


def test_study_recipes_name_their_branch_draw_and_probability():
    """The trainer's defaults are the recipe's (a branch per sequence, full-branch probability
    0.5): every study recipe names both, so a later change of defaults cannot change it."""
    from ssa_megatron.study.quality import VARIANTS
    for name, flags in VARIANTS.items():
        if name.startswith("ssa-"):
            draw = flags[flags.index("--ssa-branch-draw") + 1]
            assert draw == ("micro-batch" if name.startswith("ssa-step") else "sequence"), name
            assert flags.count("--ssa-full-prob") + flags.count("--ssa-full-prob-schedule") >= 1, name
            assert flags.count("--ssa-full-prob") <= 1, name
    assert VARIANTS["ssa-step"][-4:] == ["--ssa-full-prob", "0.5", "--ssa-selection-score", "mean"]


def test_study_systems_name_their_selection_score():
    """The trainer's default score changed (mean to sub4) after most study systems were measured:
    each SSA system of both studies names its score, so its runs stay what they were."""
    from ssa_megatron.study.paper_comparison import SYSTEM_FLAGS
    from ssa_megatron.study.quality import VARIANTS
    for name, flags in [*SYSTEM_FLAGS.items(), *((n, f) for n, f in VARIANTS.items() if n.startswith("ssa-"))]:
        assert flags.count("--ssa-selection-score") == 1, name
        score = flags[flags.index("--ssa-selection-score") + 1]
        assert score == {"ssa-recipe-moment2": "moment2", "ssa-recipe-sub4": "sub4"}.get(name, "mean"), name


def test_a_new_ssa_run_selects_with_the_recipe_score():
    """--ssa-selection-score left out: sub4 for SSA (the recipe), and the recipe line says so;
    the paper's mean where sub4 cannot go (other attention modes, blocks that 4 does not divide,
    the selection alignment loss, which trains the mean score); a score asked for is kept."""
    from model_utils import tiny_args
    from ssa_megatron.training.ssa_recipe import BranchRecipe
    args = tiny_args()
    assert args.attention_mode == "ssa" and args.ssa_selection_score == "sub4"
    assert "sub4 selection score" in BranchRecipe(args).describe(args)
    assert tiny_args("--ssa-selection-score", "mean").ssa_selection_score == "mean"
    assert not getattr(tiny_args("--ssa-selection-score", "sub4"), "_selection_score_defaulted", False)
    for flags in (["--attention-mode", "full"], ["--attention-mode", "sparse"], ["--attention-mode", "nsa"],
                  ["--ssa-block-size", "2", "--ssa-block-counts", "4"],
                  ["--ssa-select-align-coef", "0.5"]):
        assert tiny_args(*flags).ssa_selection_score == "mean", flags
    small_blocks = tiny_args("--ssa-block-size", "2", "--ssa-block-counts", "4")
    assert ("mean (not sub4: its sub-blocks do not split 2-token blocks) selection score"
            in BranchRecipe(small_blocks).describe(small_blocks))
    explicit = tiny_args("--ssa-selection-score", "mean")
    assert ", mean selection score" in BranchRecipe(explicit).describe(explicit)


def test_a_resumed_run_keeps_its_checkpoint_score():
    """A checkpoint of the mean score (or of a time before the score was recorded) resumed
    without --ssa-selection-score goes on with the mean score, in one line; a score asked for,
    a checkpoint of the recipe's own score and converted weights (a new run) take the flags'."""
    from model_utils import tiny_args
    from ssa_megatron.training.ssa_recipe import keep_checkpoint_selection_score
    for saved in ({"attention_mode": "ssa", "ssa_selection_score": "mean"}, {"attention_mode": "ssa"}):
        args = tiny_args()
        note = keep_checkpoint_selection_score(args, {"args": saved})
        assert args.ssa_selection_score == "mean" and note.count("\n") == 0
        assert "keeps it (left out, these flags would give sub4)" in note
        assert note.endswith("pass --ssa-selection-score sub4 to change it")
    for args, meta in ((tiny_args("--ssa-selection-score", "sub4"), {"args": {"attention_mode": "ssa"}}),
                       (tiny_args(), {"args": {"attention_mode": "ssa", "ssa_selection_score": "sub4"}}),
                       (tiny_args(), {"args": {"attention_mode": "ssa"}, "weights_only": True}),
                       (tiny_args(), {"args": {"attention_mode": "full"}})):
        assert keep_checkpoint_selection_score(args, meta) is None
        assert args.ssa_selection_score == "sub4"
    # a relayout of a run (weights only, to continue at another TP size) is the run going on
    relayout = {"args": {"attention_mode": "ssa", "ssa_selection_score": "mean"}, "weights_only": True,
                "source": "relayout of runs/x/checkpoints"}
    args = tiny_args()
    assert keep_checkpoint_selection_score(args, relayout) and args.ssa_selection_score == "mean"
    # flags that now forbid the checkpoint's score win (the selection alignment loss: mean only)
    args = tiny_args("--ssa-select-align-coef", "1")
    sub4 = {"args": {"attention_mode": "ssa", "ssa_selection_score": "sub4"}}
    assert keep_checkpoint_selection_score(args, sub4) is None and args.ssa_selection_score == "mean"


def test_a_requeued_run_trains_on_with_its_checkpoint_score(tmp_path, random_dataset):
    """The trainer end to end: a run saved with the mean score and resumed without the flag
    trains its second step with the mean score, records it in its next checkpoint, and says so."""
    from ssa_megatron.training.checkpoint_format import read_meta
    base = FLAGS + ["--data-path", random_dataset, "--micro-batch-size", "4"]
    ckpt = str(tmp_path / "ckpt")
    run_workers("train", 1, str(tmp_path / "a"), *base, "--ssa-selection-score", "mean",
                "--save", ckpt, "--exit-interval", "1")
    second = run_workers("train", 1, str(tmp_path / "b"), *base, "--save", ckpt, "--load", ckpt)
    assert second["iterations"] == [2]
    saved = read_meta(os.path.join(ckpt, "iter_0000002"))["args"]
    assert saved["ssa_selection_score"] == "mean"
    assert not any(key.startswith("_") for key in saved)
    with open(tmp_path / "b" / "rank0.log") as f:
        log = f.read()
    assert "trained with the mean selection score, so the run keeps it" in log
    assert "mean (not sub4: the checkpoint's) selection score" in log  # the recipe line


def test_the_default_recipe_draws_per_sequence():
    from model_utils import tiny_args
    from ssa_megatron.training.ssa_recipe import BranchRecipe
    recipe = BranchRecipe(tiny_args("--micro-batch-size", "8"))
    assert recipe.per_sequence and "per sequence" in recipe.describe(tiny_args())
    assert recipe.full_prob == 0.5 and "probability 0.5" in recipe.describe(tiny_args())
    branches = [recipe.branch(0, 0, first) for first in range(0, 80, 8)]
    assert any(isinstance(b, torch.Tensor) for b in branches)  # micro-batches mix both branches
    paper = BranchRecipe(tiny_args("--ssa-branch-draw", "micro-batch", "--ssa-full-prob", "0.5"))
    assert not paper.per_sequence and paper.branch(0, 0, 0) in ("full", "sparse")


def test_resuming_with_another_recipe_is_noted():
    """A run continuing a checkpoint under other branch-mixing flags (a requeued job after the
    defaults changed) says which changed; the same flags, or a non-SSA run, say nothing."""
    from model_utils import tiny_args
    from ssa_megatron.training.ssa_recipe import recipe_change_note
    saved = {k: v for k, v in vars(tiny_args("--ssa-full-prob", "0.25")).items()}
    assert recipe_change_note(saved, tiny_args("--ssa-full-prob", "0.25")) is None
    note = recipe_change_note(saved, tiny_args())
    assert note.startswith("note: ") and "--ssa-full-prob 0.25 -> 0.5" in note
    assert "--ssa-branch-draw" not in note
    schedule = recipe_change_note(saved, tiny_args("--ssa-full-prob", "0.25",
                                                   "--ssa-full-prob-schedule", "0:1,10:0.5"))
    assert "--ssa-full-prob-schedule None -> 0:1,10:0.5" in schedule
    assert recipe_change_note(dict(saved, attention_mode="full"), tiny_args()) is None
    assert recipe_change_note({}, tiny_args()) is None  # an old checkpoint without its args


def test_resuming_with_another_schedule_or_data_is_noted():
    """A demo rerun without its TRAIN_ITERS, or a second experiment under the same --save,
    continues the checkpoint under other schedule flags: said in one line, naming them."""
    import json

    from model_utils import tiny_args
    from ssa_megatron.training.resume_notes import schedule_change_note
    saved = json.loads(json.dumps(vars(tiny_args("--train-iters", "20"))))  # as the checkpoint stores it
    assert schedule_change_note(saved, tiny_args("--train-iters", "20")) is None
    note = schedule_change_note(saved, tiny_args("--train-iters", "200", "--lr", "0.5"))
    assert note.startswith("note: this run continues a checkpoint trained with other settings (")
    assert "--train-iters 20 -> 200" in note and "--lr " in note and "\n" not in note
    assert schedule_change_note({}, tiny_args()) is None


def test_resuming_on_changed_data_is_noted(tmp_path):
    """A dataset rebuilt under the same prefix (its .idx changes) or a retrained tokenizer of the
    same vocabulary size: the resumed run says so; an unchanged one, or an old checkpoint
    without fingerprints, says nothing."""
    from ssa_megatron.data.datasets import index_fingerprints
    from ssa_megatron.training.resume_notes import data_change_note
    prefix = str(tmp_path / "corpus")
    for ext in (".bin", ".idx"):
        (tmp_path / ("corpus" + ext)).write_bytes(b"first")
    saved = {"tokenizer": {"sha256": "a" * 64}, "index_sha256": index_fingerprints([prefix])}
    same = {"tokenizer": {"sha256": "a" * 64}, "index_sha256": index_fingerprints([prefix])}
    assert data_change_note(saved, same) is None
    (tmp_path / "corpus.idx").write_bytes(b"rebuilt")
    now = {"tokenizer": {"sha256": "b" * 64}, "index_sha256": index_fingerprints(["1.0", prefix])}
    note = data_change_note(saved, now)
    assert note.startswith("note: this run's data differs from what the checkpoint records (")
    assert "tokenizer sha256 aaaaaaaaaaaa -> bbbbbbbbbbbb" in note and f"{prefix}.idx sha256" in note
    assert data_change_note(None, now) is None and data_change_note({"data_path": [prefix]}, now) is None
    # an HF model's import names tokenizer.model, its data tokenizer.json: not compared
    from ssa_megatron.data.tokenizer import tokenizers_differ
    assert not tokenizers_differ({"kind": "sentencepiece", "sha256": "a" * 64},
                                 {"kind": "huggingface", "sha256": "b" * 64})
    assert tokenizers_differ({"kind": "sentencepiece", "sha256": "a" * 64},
                             {"kind": "sentencepiece", "sha256": "b" * 64})


@pytest.mark.parametrize("weights_only", [False, True])
def test_loading_a_checkpoint_prints_the_recipe_note(monkeypatch, capsys, weights_only):
    """load_checkpoint prints recipe_change_note's line for a resumed run, not for a converted
    (weights-only) model that starts training there. DeepSpeed's load is stubbed to fail right
    after the notes."""
    from model_utils import stub_checkpoint_reading, tiny_args
    from ssa_megatron.model.config import ConfigError
    from ssa_megatron.training import checkpointing
    saved = vars(tiny_args("--ssa-full-prob", "0.25", "--train-iters", "3"))
    meta = {"args": saved, "data": {"tokenizer": {"sha256": "a" * 64}}, **({"weights_only": True} if weights_only else {})}
    engine = stub_checkpoint_reading(monkeypatch, meta, "iter_0000002")
    with pytest.raises(ConfigError, match="could not load"):
        checkpointing.load_checkpoint(engine, "unused", tiny_args(), {"tokenizer": {"sha256": "b" * 64}})
    out = capsys.readouterr().out
    assert ("--ssa-full-prob 0.25 -> 0.5" in out) is not weights_only
    assert ("--train-iters 3 -> " in out) is not weights_only
    assert "this run's data differs" in out  # imported weights record their tokenizer too


def test_sequence_draws_follow_the_sample_not_the_layout():
    rows = draw_sequence_branches(7, range(1000), 0.5)
    assert 400 < int(rows.sum()) < 600  # about half full
    assert torch.equal(draw_sequence_branches(7, range(10, 20), 0.5), rows[10:20])
    assert collapse_branches(torch.tensor([True, True])) == "full"
    assert collapse_branches(torch.tensor([False])) == "sparse"
    # every global sample of a step is drawn once, whatever the split into DP ranks and micro-batches
    for mbs, dp, gas in ((4, 1, 1), (2, 2, 1), (1, 2, 2), (1, 1, 4)):
        seen = [first_sample_of_micro(100, m, mbs, dp, r) + i
                for m in range(gas) for r in range(dp) for i in range(mbs)]
        assert sorted(seen) == list(range(100, 104))


@pytest.mark.parametrize("packed", [False, True])
def test_mixed_rows_take_their_own_branch(single_process_parallel_state, packed):
    from model_utils import build_tiny_model, tiny_args
    torch.manual_seed(0)
    model = build_tiny_model(tiny_args("--seq-length", "64", "--ssa-block-counts", "1"))
    tokens = torch.randint(0, 100, (2, 64))
    positions = torch.arange(64).repeat(2, 1)
    documents = None
    if packed:  # two documents in each row: the packed route flattens the batch
        positions[:, 40:] -= 40
        documents = packed_documents(torch.tensor([0, 40, 64, 104, 128], dtype=torch.int32), 64)
    outs = {}
    for mode in ("full", "sparse", torch.tensor([True, False])):
        outs[mode if isinstance(mode, str) else "mixed"] = model(
            tokens, positions, None, packed_seq_params=forward_params(documents, 64, ssa_branch=mode)).detach()
    assert not torch.allclose(outs["full"], outs["sparse"])
    torch.testing.assert_close(outs["mixed"][0], outs["full"][0])
    torch.testing.assert_close(outs["mixed"][1], outs["sparse"][1])


@pytest.mark.parametrize("packed", [False, True])
def test_selection_loss_samples_rows_for_every_sequence(single_process_parallel_state, packed,
                                                        monkeypatch):
    """--ssa-select-align-rows counts rows per sequence: documents packed across the flattened
    batch put both sequences on one token axis, which then gets rows for each; the rows start
    past the training budget."""
    from model_utils import build_tiny_model, tiny_args
    from ssa_megatron.ops import selection_loss
    model = build_tiny_model(tiny_args("--seq-length", "64", "--ssa-block-counts", "3",
                                       "--ssa-select-align-coef", "1", "--ssa-select-align-rows", "5"))
    asked, real = [], selection_loss.sample_rows
    monkeypatch.setattr(selection_loss, "sample_rows",
                        lambda *a, **kw: asked.append(a) or real(*a, **kw))
    tokens = torch.randint(0, 100, (2, 64))
    positions = torch.arange(64).repeat(2, 1)
    documents = None
    if packed:
        positions[:, 40:] -= 40
        documents = packed_documents(torch.tensor([0, 40, 64, 104, 128], dtype=torch.int32), 64)
    model(tokens, positions, None, packed_seq_params=forward_params(documents, 64, ssa_branch="sparse"))
    assert asked == [(128 if packed else 64, 10 if packed else 5, 16, 3)] * 2  # both layers
    rows = real(4096, 64, 16, 16, generator=torch.Generator().manual_seed(0))
    assert int(rows.min()) >= 256  # 16 blocks of 16: earlier rows select every block


def _brute_force_stats(q, k, indices, block_size, positions):
    """Loops over positions and heads: entropy and kept mass of full attention."""
    _, t, hq, d = q.shape
    g = hq // k.shape[2]
    ent, kept = torch.zeros(hq), torch.zeros(hq)
    for p in positions.tolist():
        for h in range(hq):
            logits = (k[0, : p + 1, h // g] @ q[0, p, h]) / math.sqrt(d)
            prob = torch.softmax(logits, 0)
            ent[h] += -(prob * prob.log()).sum()
            blocks = {int(b) for b in indices[0, p, h // g] if b >= 0}
            kept[h] += sum(float(prob[j]) for j in range(p + 1) if j // block_size in blocks)
    n = len(positions)
    return ent / n, kept / n


def test_probe_statistics_match_a_brute_force_loop():
    from ssa_megatron.model.diagnostics import probe_positions
    torch.manual_seed(1)
    q, k = torch.randn(1, 96, 4, 16) * 2, torch.randn(1, 96, 2, 16)
    idx = reference.select_blocks(q, k, 8, 3)
    stats = attention_stats(q, k, idx, 8, None, samples=12)
    ent, kept = _brute_force_stats(q, k, idx, 8, probe_positions(96, 12, 8, 3))
    torch.testing.assert_close(torch.tensor(stats["entropy_full"]), ent, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(stats["kept_mass"]), kept, rtol=1e-4, atol=1e-5)
    assert all(0 < m < 1 for m in stats["kept_mass"])
    # a budget that covers every block keeps all of the mass and the same entropy
    every = reference.select_blocks(q, k, 8, 12)
    full = attention_stats(q, k, every, 8, None, samples=12)
    assert full["kept_mass"] == pytest.approx([1.0] * 4, abs=1e-5)
    assert full["entropy_sparse"] == pytest.approx(full["entropy_full"], abs=1e-4)


def test_per_sequence_draws_equal_across_dp_and_pp_layouts(tmp_path, random_dataset):
    """Micro-batch 4 on one process and DP=2 with micro-batch 2 train the same samples with the
    same per-sequence branches: equal losses; PP=2 equals one process at the same 2 x 2
    accumulation. The first run also writes diagnostics and evaluates in three modes."""
    # the draws of the samples these runs train (the default probability, 0.5) mix both
    # branches inside micro-batches of 2
    rows = draw_sequence_branches(3, range(8), 0.5).reshape(4, 2)
    assert any(bool(r[0]) != bool(r[1]) for r in rows)
    base = FLAGS + ["--data-path", random_dataset, "--split", "90,10,0"]
    diag = str(tmp_path / "diag.jsonl")
    single = run_workers("train", 1, str(tmp_path / "single"), *base, "--micro-batch-size", "4",
                         "--eval-interval", "2", "--eval-iters", "1",
                         "--eval-modes", "full", "sparse", "sparse:2",
                         "--diagnostics-interval", "1", "--diagnostics-json", diag)
    dp2 = run_workers("train", 2, str(tmp_path / "dp2"), *base, "--micro-batch-size", "2")
    assert dp2["lm_loss"] == pytest.approx(single["lm_loss"], rel=1e-6)
    accumulated = run_workers("train", 1, str(tmp_path / "acc"), *base, "--micro-batch-size", "2")
    pp2 = run_workers("train", 2, str(tmp_path / "pp2"), *base, "--micro-batch-size", "2",
                      "--pipeline-model-parallel-size", "2")
    assert accumulated["lm_loss"] == pytest.approx(single["lm_loss"], rel=1e-4)
    assert pp2["lm_loss"] == pytest.approx(accumulated["lm_loss"], rel=1e-6)
    assert pp2["align_loss"] == pytest.approx(accumulated["align_loss"], rel=1e-4)

    modes = single["valid_loss_modes"][-1]
    assert set(modes) == {"iteration", "full", "sparse", "sparse:2"}
    assert modes["sparse"] != modes["full"]
    with open(diag) as f:
        records = [json.loads(line) for line in f]
    assert [r["iteration"] for r in records] == [1, 2]
    layer = records[0]["layers"][0]
    assert len(layer["entropy_full"]) == 4 and len(layer["k_norm"]) == 2
    assert 0 < layer["gate_mean"][0] < 1 and layer["output_gap"] > 0
    assert records[0]["update_norms"]["attention_qkv"] > 0


def test_the_recipe_line_names_the_selection_loss():
    from model_utils import tiny_args
    from ssa_megatron.training.ssa_recipe import BranchRecipe
    args = ["--ssa-select-align-coef", "1", "--ssa-select-align-rows", "8"]
    line = BranchRecipe(tiny_args(*args)).describe(tiny_args(*args))
    assert "selection alignment weight 1.0 (8 rows, training q and k)" in line
    proj = args + ["--ssa-select-proj"]
    assert "training a learned selection map" in BranchRecipe(tiny_args(*proj)).describe(tiny_args(*proj))
    moment2 = ["--ssa-selection-score", "moment2"]
    assert "moment2 selection score" in BranchRecipe(tiny_args(*moment2)).describe(tiny_args(*moment2))


def test_quality_summary_classifies_runs():
    from ssa_megatron.study import quality
    steps = 300

    def run(final, spike=1.0):
        losses = [5.0 - 0.001 * i for i in range(steps)]
        losses[-150:] = [final] * 150
        return {"lm_loss": losses, "grad_norm": [spike] + [0.5] * (steps - 1),
                "valid_loss_modes": [{"iteration": steps, "full": final + 0.1, "sparse:16": final + 0.12}]}
    runs = {"full-full": {1: run(4.0), 2: run(4.02)},
            "ssa-step": {1: run(4.2, spike=26.0), 2: run(4.01)},
            "ssa-seq": {1: run(4.03), 2: {"lm_loss": [5.0] * 10, "grad_norm": [1.0] * 10}}}
    summary = quality.summarize(runs)
    basins = {(r["name"], r["seed"]): r["basin"] for r in summary["runs"]}
    assert basins[("ssa-step", 1)] == "bad" and basins[("ssa-step", 2)] == "good"
    assert ("ssa-seq", 2) not in basins  # cut short: left out
    bad = next(r for r in summary["runs"] if r["basin"] == "bad")
    jump = steps - 150 + 1  # the 20-step moving average crosses half the gap 10 steps later
    assert jump < bad["onset_step"] <= jump + 20 and bad["max_grad_norm_first_100"] == 26.0
    assert summary["groups"]["ssa-step"]["bad"] == 1
    assert "ssa-step" in quality.format_summary(summary)
    early = quality.summarize(runs, at_step=10)  # every run reached step 10: all compared there
    assert ("ssa-seq", 2) in {(r["name"], r["seed"]) for r in early["runs"]}
    assert all(r["steps"] == 10 and "valid_full" not in r for r in early["runs"])


@pytest.mark.parametrize("flags, weights", [
    # the moment2 score has no weights: the checkpoint carries it
    (["--qk-layernorm", "--ssa-selection-score", "moment2"], ["q_layernorm", "k_layernorm"]),
    # sub-block scores: the plain-PyTorch selection in training; a cached step ranks from all keys
    (["--ssa-selection-score", "sub4"], []),
    # TP 2: the map is split by heads, and evaluation merges it back
    (["--ssa-select-proj", "--ssa-select-align-coef", "1", "--tensor-model-parallel-size", "2"],
     ["core_attention.select_proj"])])
def test_checkpoints_with_new_options_evaluate_and_export(
        tmp_path, random_dataset, single_process_parallel_state, flags, weights):
    """The trained checkpoint evaluates with its options; the HF export computes the evaluated
    model's logits in both modes."""
    from ssa_megatron.convert.api import megatron_to_hf
    from ssa_megatron.eval.model import load_model
    save = str(tmp_path / "ckpt")
    tp = 2 if "--tensor-model-parallel-size" in flags else 1
    res = run_workers("train", tp, str(tmp_path / "train"), *FLAGS, "--data-path", random_dataset,
                      "--micro-batch-size", "4", "--split", "100,0,0", "--train-iters", "2",
                      *flags, "--save", save)
    if "--ssa-select-align-coef" in flags:  # logged every step, the tracker reduced over TP
        assert len(res["select_loss"]) == len(res["align_loss"]) == 2
        # a KL: >= 0 up to rounding (near 0 here: a fresh tiny model attends almost uniformly)
        assert all(-1e-6 < v < 10 for v in res["select_loss"]), res["select_loss"]
    model, spec, _ = load_model(save, device="cpu")
    params = dict(model.named_parameters())
    for w in weights:
        assert any(w in n for n in params), w
    if "--ssa-select-proj" in flags:  # trained away from 0 by the selection loss alone
        proj = [p for n, p in params.items() if n.endswith("select_proj")]
        assert len(proj) == 2 and all(float(p.abs().max()) > 0 for p in proj)
        assert all(p.shape == (4, 16, 16) for p in proj)  # every query head, merged from 2 ranks
        assert all(float(p[:2].abs().max()) > 0 and float(p[2:].abs().max()) > 0 for p in proj)
    from ssa_megatron.model.attention import SSACoreAttention
    scores = {m.selection_score for m in model.modules() if isinstance(m, SSACoreAttention)}
    score = flags[flags.index("--ssa-selection-score") + 1] if "--ssa-selection-score" in flags else "mean"
    assert scores == {score}
    from test_hf_conversion import hf_logits, load_hf
    from test_hf_import import megatron_logits
    megatron_to_hf(save, str(tmp_path / "hf"))
    hf = load_hf(str(tmp_path / "hf")).set_inference_mode(block_counts=2)  # 2 of 4 blocks
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    for mode in ("full", "sparse"):
        torch.testing.assert_close(hf_logits(hf, tokens, mode),
                                   megatron_logits(model, tokens, mode, 2)[..., :256],
                                   atol=1e-5, rtol=0)
    kw = dict(max_new_tokens=30, do_sample=False, min_new_tokens=30)  # 21 + 30 tokens: 3 blocks
    assert torch.equal(hf.generate(tokens[:, :21], use_cache=True, **kw),
                       hf.generate(tokens[:, :21], use_cache=False, **kw))


def test_a_budget_covering_the_sequence_is_noted():
    """Block size x block count >= sequence length: the sparse branch is full attention (align
    loss ~1e-17), which a newcomer following a small example would not know."""
    from model_utils import tiny_args
    from ssa_megatron.training.ssa_recipe import full_coverage_note
    covered = tiny_args("--seq-length", "64", "--ssa-block-size", "16", "--ssa-block-counts", "4")
    note = full_coverage_note(covered)
    assert note.startswith("note: --ssa-block-size 16 x --ssa-block-counts 4 = 64 tokens covers")
    assert full_coverage_note(tiny_args("--seq-length", "128", "--ssa-block-size", "16",
                                        "--ssa-block-counts", "4")) is None
    assert full_coverage_note(tiny_args("--seq-length", "64", "--ssa-block-counts", "4",
                                        "--attention-mode", "full")) is None


def test_quality_summary_reads_a_resumed_run_whole(tmp_path):
    """A study run resumed after a deadline keeps its first part as train_part1_until_N.json
    (training/result_record.py); the summary reads both parts, not only the last."""
    from ssa_megatron.study import quality
    from ssa_megatron.training import result_record
    record = str(tmp_path / "train.json")
    result_record.write(record, {"iteration": 3, "iterations": [1, 2, 3], "lm_loss": [6.0, 5.0, 4.0],
                                 "grad_norm": [9.0, 1.0, 1.0]})
    result_record.set_aside(record)
    result_record.write(record, {"iteration": 5, "iterations": [4, 5], "lm_loss": [3.5, 3.0],
                                 "grad_norm": [0.5, 0.4]})
    run = quality.read_run(str(tmp_path))
    assert run["lm_loss"] == [6.0, 5.0, 4.0, 3.5, 3.0] and run["grad_norm"][0] == 9.0
    assert run["iteration"] == 5 and run["diagnostics"] == []
    assert quality.read_run(str(tmp_path / "none")) is None


def test_the_recipe_defaults_have_one_owner():
    """The trainer's flags, SSAConfig and arguments saved before a flag existed all take the
    recipe's defaults from model/recipe_defaults.py."""
    import argparse
    import dataclasses
    from model_utils import tiny_args
    from ssa_megatron.model.config import SSAConfig
    from ssa_megatron.model.recipe_defaults import RECIPE_DEFAULTS, recipe_setting
    args = tiny_args()
    fields = {f.name: f.default for f in dataclasses.fields(SSAConfig)}
    for name, value in RECIPE_DEFAULTS.items():
        assert getattr(args, name) == value, name
        assert name not in fields or fields[name] == value, name
        assert recipe_setting(argparse.Namespace(), name) == value
