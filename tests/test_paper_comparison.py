"""tools/paper_comparison.py's scheduling: one run per GPU slot, longest first, deadline stop,
resume from a run's own checkpoint, skipping finished training and fresh evaluations."""
import json
import os
import subprocess
import sys
import time

import pytest

from ssa_megatron.study import paper_comparison as pc


def _args(tmp_path, *extra):
    return pc.parse_args(["--data-path", "unused", "--out", str(tmp_path),
                                         "--train-iters", "10", *extra])


def _sleeper(seconds, record):
    code = f"import time; open({record!r}, 'a').write(str(time.time()) + '\\n'); time.sleep({seconds})"
    return lambda: [sys.executable, "-c", code]


def test_queue_runs_steps_in_order_one_job_per_slot(tmp_path):
    outs = [tmp_path / f"run{i}" for i in range(3)]
    for out in outs:
        out.mkdir()
    jobs = [(str(out), [("a.log", _sleeper(0.5, str(out / "a"))), ("b.log", _sleeper(0, str(out / "b")))])
            for out in outs]
    t0 = time.time()
    assert pc.run_queue(jobs, gpus=0, jobs_per_gpu=2) == ([], [])
    for out in outs:  # every step ran, the second after the first
        assert float((out / "a").read_text()) < float((out / "b").read_text())
    # two slots: the third job started only after one of the first two finished both steps
    starts = sorted(float((out / "a").read_text()) for out in outs)
    assert starts[2] - starts[0] >= 0.4
    assert time.time() - t0 < 30


def test_deadline_stops_running_jobs_and_starts_no_new_one(tmp_path):
    outs = [tmp_path / f"run{i}" for i in range(2)]
    for out in outs:
        out.mkdir()
    jobs = [(str(out), [("a.log", _sleeper(60, str(out / "a")))]) for out in outs]
    t0 = time.time()
    failed, stopped = pc.run_queue(jobs, gpus=0, deadline=1)
    assert time.time() - t0 < 20
    assert (outs[0] / "a").exists() and not (outs[1] / "a").exists()
    assert failed == [str(outs[0])]  # killed by SIGTERM, not the trainer's "saved and stopped" 3
    assert stopped == [str(outs[1])]  # never started: to resume


def test_a_run_stopped_by_a_signal_is_not_evaluated(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    jobs = [(str(out), [("a.log", lambda: [sys.executable, "-c", "raise SystemExit(3)"]),
                        ("b.log", _sleeper(0, str(out / "b")))])]
    assert pc.run_queue(jobs, gpus=0) == ([], [str(out)])
    assert not (out / "b").exists()


def test_gpu_slots_map_onto_the_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert pc.visible_devices(2) == ["3", "5"] and pc.visible_devices(1) == ["3"]
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES"):
        pc.visible_devices(3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(SystemExit):
        pc.visible_devices(1)  # an empty list hides every GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert pc.visible_devices(2) == ["0", "1"]


def test_resume_skip_and_joined_record(tmp_path):
    args = _args(tmp_path)
    out = tmp_path / "ssa_seed1"
    (out / "checkpoint").mkdir(parents=True)
    make = pc.train_step(args, "ssa", 1, str(out))
    assert "--load" not in make()  # nothing saved yet: a fresh start
    (out / "checkpoint" / "latest").write_text("iter_0000004")
    part = {"iteration": 4, "iterations": [1, 2, 3, 4], "lm_loss": [5.0, 4.0, 3.0, 2.0],
            "step_time": [1.0] * 4, "tokens_per_iteration": 100}
    (out / "train.json").write_text(json.dumps(part))
    cmd = make()
    assert cmd[cmd.index("--load") + 1] == str(out / "checkpoint")
    assert (out / "train_part1_until_4.json").exists() and not (out / "train.json").exists()
    (out / "train.json").write_text(json.dumps(dict(part, iteration=10, iterations=list(range(5, 11)),
                                                    lm_loss=[1.0] * 6, step_time=[3.0] * 6)))
    assert make() is None  # finished: not trained again
    record = pc.train_record(*pc.step_losses(str(out)))
    assert record["iterations"] == 10 and record["parts"] == 2 and record["tokens"] == 1000
    assert abs(record["final_lm_loss"] - (5 + 4 + 3 + 2 + 6) / 10) < 1e-9  # mean of the last 10
    assert record["median_step_s"] == 3.0  # over the steps of both parts
    evaluate = pc.eval_step(args, str(out))
    assert evaluate() is not None
    (out / "eval.json").write_text("{}")
    os.utime(out / "eval.json", (time.time() + 5, time.time() + 5))
    assert evaluate() is None  # newer than the checkpoint: not evaluated again


def test_equal_step_losses_use_the_common_steps_and_split_by_drawn_branch(tmp_path):
    from ssa_megatron.model.runtime import draw_mode
    args = _args(tmp_path, "--micro-batch-size", "4", "--global-batch-size", "4")
    runs = {}
    for system, n, base in (("full-full", 30, 1.0), ("ssa", 50, 2.0)):
        out = tmp_path / f"{system}_seed1"
        out.mkdir()
        losses = [base + (0.5 if draw_mode(1, i, 0) == "full" else 0.0) for i in range(n)]
        (out / "train.json").write_text(json.dumps({"iteration": n, "iterations": list(range(1, n + 1)),
                                                    "lm_loss": losses}))
        runs[(system, 1)] = str(out)
    table = pc.matched_train_losses(args, {key: pc.step_losses(out)[0] for key, out in runs.items()},
                                    window=20)
    assert table["steps"] == [11, 30]  # the last 20 of the 30 steps both runs recorded
    ssa = table["ssa_seed1"]
    assert abs(ssa["full_steps"] - 2.5) < 1e-9 and abs(ssa["sparse_steps"] - 2.0) < 1e-9
    drawn_full = sum(draw_mode(1, i, 0) == "full" for i in range(10, 30))
    assert abs(ssa["all"] - (2.0 + 0.5 * drawn_full / 20)) < 1e-9
    assert abs(table["full-full_seed1"]["all"] - (1.0 + 0.5 * drawn_full / 20)) < 1e-9


def test_a_part_that_reran_steps_replaces_them(tmp_path):
    """Resumed from an older checkpoint, a part re-runs steps: the later losses win, by iteration."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_part1_until_4.json").write_text(json.dumps(
        {"iteration": 4, "iterations": [1, 2, 3, 4], "lm_loss": [9.0, 8.0, 7.0, 6.0]}))
    (out / "train.json").write_text(json.dumps(
        {"iteration": 6, "iterations": [3, 4, 5, 6], "lm_loss": [5.0, 4.0, 3.0, 2.0],
         "step_time": [1.0] * 4, "tokens_per_iteration": 10}))
    losses, _ = pc.step_losses(str(out))
    assert losses == {1: 9.0, 2: 8.0, 3: 5.0, 4: 4.0, 5: 3.0, 6: 2.0}
    record = pc.train_record(*pc.step_losses(str(out)))
    assert record["iterations"] == 6 and record["tokens"] == 60 and "steps_without_record" not in record


def test_variants_are_systems_with_extra_flags(tmp_path):
    args = _args(tmp_path, "--variant", "ssa-a0=--attention-mode ssa --ssa-align-coef 0",
                 "dense=--attention-mode full --exit-interval 5")
    assert args.systems == ["full-full", "sparse-sparse", "nsa", "ssa", "ssa-recipe", "ssa-recipe-sub4",
                            "ssa-a0", "dense"]
    cmd = pc.train_command(args, "ssa-a0", 1, str(tmp_path / "x"))
    assert cmd[-4:] == ["--attention-mode", "ssa", "--ssa-align-coef", "0"]
    assert cmd.count("--attention-mode") == 1  # the variant names it; no default is added
    assert pc.attention_mode(args, "dense") == "full" and pc.attention_mode(args, "ssa") == "ssa"
    plain = pc.train_command(args, "ssa", 1, str(tmp_path / "y"))
    assert plain[plain.index("--attention-mode") + 1] == "ssa" and "--ssa-align-coef" not in plain
    # "ssa" is SSA as published (a branch per micro-batch); "ssa-recipe" draws it per sequence
    assert plain[plain.index("--ssa-branch-draw") + 1] == "micro-batch"
    recipe = pc.train_command(args, "ssa-recipe", 1, str(tmp_path / "z"))
    assert recipe[recipe.index("--ssa-branch-draw") + 1] == "sequence"
    # the full-branch probability is pinned per system: the trainer's default (the recipe's)
    # must not change what "SSA as published" or the first recipe train
    fp25 = pc.train_command(args, "ssa-recipe-fp25", 1, str(tmp_path / "w"))
    prob = {name: cmd[cmd.index("--ssa-full-prob") + 1] for name, cmd in
            (("ssa", plain), ("ssa-recipe", recipe), ("ssa-recipe-fp25", fp25))}
    assert prob == {"ssa": "0.5", "ssa-recipe": "0.5", "ssa-recipe-fp25": "0.25"}
    # the late candidates: the recipe to mid-run, then a falling probability; run when named
    select = pc.train_command(args, "ssa-recipe-select", 1, str(tmp_path / "s"))
    assert select[select.index("--ssa-select-align-coef") + 1] == "1.0"
    assert "--ssa-select-proj" not in select
    assert "--ssa-select-proj" in pc.train_command(args, "ssa-recipe-select-proj", 1, str(tmp_path / "p"))
    moment2 = pc.train_command(args, "ssa-recipe-moment2", 1, str(tmp_path / "m"))
    assert moment2[moment2.index("--ssa-selection-score") + 1] == "moment2"
    assert moment2[moment2.index("--ssa-branch-draw") + 1] == "sequence"
    sub4 = pc.train_command(args, "ssa-recipe-sub4", 1, str(tmp_path / "u"))
    assert sub4[sub4.index("--ssa-selection-score") + 1] == "sub4"
    assert sub4[sub4.index("--ssa-branch-draw") + 1] == "sequence"
    for name, end in (("ssa-recipe-late-sparse", "0.1"), ("ssa-recipe-sparse-end", "0.0")):
        cmd = pc.train_command(args, name, 1, str(tmp_path / name))
        assert cmd[cmd.index("--ssa-full-prob-schedule") + 1] == f"0:0.5,0.5:0.5,1.0:{end}"
        assert cmd[cmd.index("--ssa-branch-draw") + 1] == "sequence"
    # the warm-up is the study's, the same for every system (0.02 unless asked)
    assert plain[plain.index("--lr-warmup-fraction") + 1] == "0.02"
    longer = _args(tmp_path, "--lr-warmup-fraction", "0.06")
    assert {pc.train_command(longer, name, 1, "/tmp/o")[
        pc.train_command(longer, name, 1, "/tmp/o").index("--lr-warmup-fraction") + 1]
        for name in ("full-full", "ssa-recipe", "nsa")} == {"0.06"}
    for bad in (["--variant", "ssa=--attention-mode ssa"], ["--variant", "x=--ssa-align-coef 0"],
                ["--variant", "noequals"], ["--systems", "nope"]):
        with pytest.raises(SystemExit):
            _args(tmp_path, *bad)


def test_runs_start_longest_first_or_in_the_given_order(tmp_path):
    runs = {(system, seed): str(tmp_path / f"{system}_{seed}")
            for system in ("ssa-recipe", "full-full", "ssa") for seed in (1, 2)}
    longest = [key for key, _ in pc.run_order(_args(tmp_path, "--systems", "ssa-recipe", "full-full", "ssa"), runs)]
    assert [system for system, _ in longest] == ["ssa-recipe"] * 2 + ["ssa"] * 2 + ["full-full"] * 2
    given = pc.run_order(_args(tmp_path, "--in-order", "--systems", "ssa-recipe", "full-full", "ssa"), runs)
    assert [key for key, _ in given] == [(system, seed) for seed in (1, 2)
                                         for system in ("ssa-recipe", "full-full", "ssa")]


def test_stop_at_ends_runs_early_on_the_full_schedule(tmp_path):
    args = _args(tmp_path, "--stop-at", "4")
    out = tmp_path / "full-full_seed1"
    (out / "checkpoint").mkdir(parents=True)
    cmd = pc.train_step(args, "full-full", 1, str(out))()
    assert cmd[cmd.index("--exit-interval") + 1] == "4" and cmd[cmd.index("--train-iters") + 1] == "10"
    (out / "train.json").write_text(json.dumps({"iteration": 4, "lm_loss": [1.0] * 4}))
    (out / "checkpoint" / "latest").write_text("iter_0000004")
    assert pc.train_step(args, "full-full", 1, str(out))() is None  # reached --stop-at: done


def test_nsa_is_a_system_and_its_natural_mode_fills_the_full_column():
    from ssa_megatron.study import paper_comparison as pc
    args = pc.parse_args(["--data-path", "x", "--systems", "nsa"])
    assert pc.attention_mode(args, "nsa") == "nsa"
    assert pc.train_command(args, "nsa", 1, "/tmp/o")[
        pc.train_command(args, "nsa", 1, "/tmp/o").index("--attention-mode") + 1] == "nsa"
    natural = {"perplexity": [{"mode": "natural", "block_counts": None, "ppl": 81.0}]}
    ssa = {"perplexity": [{"mode": "full", "block_counts": None, "ppl": 75.0},
                          {"mode": "sparse", "block_counts": 16, "ppl": 76.0}]}
    from ssa_megatron.study.paper_report import _ppl
    assert _ppl(natural, "full") == 81.0 and _ppl(natural, "sparse", 16) is None
    assert _ppl(ssa, "full") == 75.0 and _ppl(ssa, "sparse", 16) == 76.0


def _eval_result(full, sparse, mass=None, natural=False):
    """An evaluate.py record: ppl per mode ({k: ppl} for sparse) and dropped mass at k = 16."""
    if natural:
        return {"perplexity": [{"mode": "natural", "block_counts": None, "ppl": full}]}
    rows = [{"mode": "full", "block_counts": None, "ppl": full}]
    rows += [{"mode": "sparse", "block_counts": k, "ppl": p} for k, p in sparse.items()]
    return {"perplexity": rows, "sparsity": {"mean": {"16": {"dropped_mass": mass}}}}


def test_claims_tick_each_system_against_the_others(tmp_path):
    args = _args(tmp_path, "--systems", "full-full", "nsa", "ssa", "ssa-recipe", "--block-counts", "16")
    evals = {
        "full-full": [_eval_result(11.6, {8: 14.8, 16: 12.8}, 0.144), _eval_result(11.4, {8: 14.6, 16: 12.6}, 0.140)],
        "nsa": [_eval_result(12.5, {}, natural=True)],
        "ssa": [_eval_result(13.5, {8: 16.5, 16: 14.8}, 0.206)],
        "ssa-recipe": [_eval_result(11.27, {8: 12.95, 16: 11.91}, 0.112)],
    }
    table = pc.claims(args, evals)
    recipe, ff, nsa = table["ssa-recipe"], table["full-full"], table["nsa"]
    assert recipe == {"best_sparse": True, "close_to_full": True, "lowest_dropped_mass": True,
                      "sparse_k8_k16_best": True, "sparse_k16_near_full": False}  # 11.91 > 11.5 * 1.01
    assert ff["close_to_full"] is True and ff["best_sparse"] is False
    assert nsa["lowest_dropped_mass"] is None and nsa["best_sparse"] is False  # 12.5 > 11.91
    assert table["ssa"]["close_to_full"] is False  # 13.5 against 11.5
    evals["ssa-recipe"][0]["perplexity"][2]["ppl"] = 11.55  # k = 16 now within 1 %
    assert pc.claims(args, evals)["ssa-recipe"]["sparse_k16_near_full"] is True
    text = pc.markdown_claims(args, pc.claims(args, evals), [1])
    assert text.count("\n| ") == 6 and "| ssa-recipe | ✓ | ✓ | ✓ | ✓ | ✓ |" in text
    # a competitor without a number: not decidable yet, rather than a tick
    missing = dict(evals, **{"ssa-recipe": []})
    assert pc.claims(args, missing)["ssa"]["best_sparse"] is None
    assert "ssa-recipe" not in pc.claims(args, missing)
    no_mass = dict(evals, **{"ssa-recipe": [_eval_result(11.27, {8: 12.95, 16: 11.91})]})
    assert pc.claims(args, no_mass)["full-full"]["lowest_dropped_mass"] is None
    with pytest.raises(SystemExit):
        _args(tmp_path, "--eval-dense-layers", "0")


def test_summary_of_runs_made_elsewhere_writes_no_commands(tmp_path):
    """--skip-train --skip-eval over copied run folders: summary and claims, and commands.txt
    (the record of what ran) stays as it was."""
    run = tmp_path / "full-full_seed1"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps(_eval_result(11.6, {8: 14.8, 16: 12.8}, 0.144)))
    (run / "train.json").write_text(json.dumps({"iteration": 10, "lm_loss": [3.0] * 10, "tokens_per_iteration": 100}))
    assert pc.main(["--data-path", "x", "--out", str(tmp_path), "--systems", "full-full", "--seeds", "1",
                    "--train-iters", "10", "--skip-train", "--skip-eval", "--gpus", "0"]) == 0
    assert not (tmp_path / "commands.txt").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["claims"]["full-full"]["close_to_full"] is True
    assert "| full-full | 0.001M |" in (tmp_path / "summary.md").read_text()


def test_hybrid_sparse_mode_is_evaluated_and_summarised(tmp_path):
    args = _args(tmp_path, "--systems", "ssa-recipe", "--seeds", "1", "--eval-dense-layers", "1")
    cmd = pc.eval_command(args, str(tmp_path / "ssa-recipe_seed1"))
    assert cmd[cmd.index("--dense-layers") + 1] == "1"
    assert "--dense-layers" not in pc.eval_command(_args(tmp_path), str(tmp_path / "x"))
    result = _eval_result(11.27, {8: 12.95, 16: 11.91}, 0.112)
    result["perplexity"].append({"mode": "sparse+dense1", "block_counts": 16, "ppl": 11.5})
    table = pc.markdown_summary(args, {"ssa-recipe_seed1": {"tokens": 1e6, "final_lm_loss": 2.5}},
                                {"ssa-recipe": [result]})
    assert "first 1 layer(s) full" in table and table.rstrip().endswith("| 11.500 |")


def test_other_selections_are_evaluated_and_summarised(tmp_path):
    args = _args(tmp_path, "--systems", "ssa-recipe", "--seeds", "1", "--eval-selections", "oracle",
                 "recent4")
    cmd = pc.eval_command(args, str(tmp_path / "ssa-recipe_seed1"))
    assert cmd[cmd.index("--selections") + 1:][:2] == ["oracle", "recent4"]
    assert "--selections" not in pc.eval_command(_args(tmp_path), str(tmp_path / "x"))
    result = _eval_result(11.27, {8: 12.95, 16: 11.91}, 0.112)
    result["perplexity"] += [{"mode": "sparse@oracle", "block_counts": 16, "ppl": 11.4},
                             {"mode": "sparse@recent4", "block_counts": 16, "ppl": 11.8}]
    table = pc.markdown_summary(args, {"ssa-recipe_seed1": {"tokens": 1e6, "final_lm_loss": 2.5}},
                                {"ssa-recipe": [result]})
    assert "k=16, oracle selection | ppl sparse k=16, recent4 selection |" in table
    assert table.rstrip().endswith("| 11.400 | 11.800 |")
    with pytest.raises(SystemExit, match="--eval-selections: unknown block selection 'best'"):
        _args(tmp_path, "--eval-selections", "best")
    with pytest.raises(SystemExit, match="--eval-selections: sub3: N must divide the block size 16"):
        _args(tmp_path, "--eval-selections", "sub4", "sub3")  # refused before any system trains


def test_the_trainer_keeps_an_earlier_result_record(tmp_path):
    """--result-json of a continued run: the earlier record is kept as <stem>_partN_until_<iter>.json
    (the trainer does it at start, so a direct user's resumed run loses no per-step history)."""
    from ssa_megatron.training import result_record
    path = str(tmp_path / "r.json")
    assert result_record.set_aside(path) is None
    result_record.write(path, {"iteration": 4, "lm_loss": [1.0, 2.0], "skip": object()})
    assert json.load(open(path)) == {"iteration": 4, "lm_loss": [1.0, 2.0]}
    assert result_record.set_aside(path) == str(tmp_path / "r_part1_until_4.json")
    result_record.write(path, {"iteration": 8})
    result_record.set_aside(path)
    assert [os.path.basename(p) for p in result_record.earlier_parts(path)] == [
        "r_part1_until_4.json", "r_part2_until_8.json"]
    assert not os.path.exists(path) and sorted(os.listdir(tmp_path)) == [
        "r_part1_until_4.json", "r_part2_until_8.json"]
    os.remove(tmp_path / "r_part1_until_4.json")  # a part deleted by hand: numbers never repeat
    result_record.write(path, {"iteration": 12})
    assert result_record.set_aside(path) == str(tmp_path / "r_part3_until_12.json")


def test_a_rerun_with_other_training_flags_is_refused(tmp_path, capsys, monkeypatch):
    """A run folder started under one setting is neither continued nor skipped under another
    (the summary would mix them): the rerun stops before starting anything, in one line."""
    args = _args(tmp_path)
    out = tmp_path / "ssa_seed1"
    out.mkdir()
    pc.train_step(args, "ssa", 1, str(out))()  # records the flags it starts the run with
    assert pc.changed_runs(args, {("ssa", 1): str(out)}) == []
    other = _args(tmp_path, "--lr", "5e-4")
    (changed,) = pc.changed_runs(other, {("ssa", 1): str(out)})
    assert changed.startswith(f"{out}: 0.001 -> 0.0005")
    # a truncated study continued to the end, or logged more often, is the same run
    assert pc.changed_runs(_args(tmp_path, "--stop-at", "4", "--log-interval", "1"), {("ssa", 1): str(out)}) == []
    # --out spelled relative to another directory, a variant flag value with a space: the same
    monkeypatch.chdir(tmp_path.parent)
    relative = pc.parse_args(["--data-path", "unused", "--out", tmp_path.name, "--train-iters", "10"])
    assert pc.changed_runs(relative, {("ssa", 1): str(out)}) == []
    spaced = _args(tmp_path, "--variant", "v=--attention-mode ssa --ssa-full-prob-schedule 0:1,10:0.5")
    (tmp_path / "v_seed1").mkdir()
    pc.train_step(spaced, "v", 1, str(tmp_path / "v_seed1"))()
    assert pc.changed_runs(spaced, {("v", 1): str(tmp_path / "v_seed1")}) == []
    code = pc.main(["--data-path", "unused", "--out", str(tmp_path), "--train-iters", "10", "--lr", "5e-4",
                    "--systems", "ssa", "--seeds", "1", "--gpus", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: 1 run folder(s)") and "\n" not in err
    assert not (tmp_path / "commands.txt").exists()  # nothing was started


def test_a_run_recorded_before_the_sub4_default_is_still_the_same_run(tmp_path):
    """Commands recorded before the trainer's default score became sub4 name no score: they
    trained with the mean score, so the mean-score systems still continue and summarise them;
    a recorded sub4 run is still refused under a mean-score system."""
    import shlex
    args = _args(tmp_path)
    out = tmp_path / "ssa_seed1"
    out.mkdir()
    pc.train_step(args, "ssa", 1, str(out))()
    path = out / pc.TRAIN_COMMAND
    words = shlex.split(path.read_text())
    at = words.index("--ssa-selection-score")
    assert words[at + 1] == "mean"
    path.write_text(shlex.join(words[:at] + words[at + 2:]))  # as recorded before session 21
    assert pc.changed_runs(args, {("ssa", 1): str(out)}) == []
    path.write_text(shlex.join(words[:at + 1] + ["sub4"] + words[at + 2:]))
    (changed,) = pc.changed_runs(args, {("ssa", 1): str(out)})
    assert "sub4 -> mean" in changed


def test_gpu_validation_robust_mode_trains_the_comparisons_recipe():
    """gpu_validation.sh robust spells the recipe's flags out as --variant values: they must stay
    those of paper_comparison's ssa-recipe system (plus the diagnostics)."""
    import re
    import shlex
    script = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "tools", "gpu_validation.sh")).read()
    flags = shlex.split(re.search(r"^\s*recipe='([^']*)'", script, re.M).group(1))
    diagnostics = flags.index("--diagnostics-interval")
    assert flags[:diagnostics] == ["--attention-mode", pc.SYSTEMS["ssa-recipe"], *pc.SYSTEM_FLAGS["ssa-recipe"]]


def test_gpu_validation_compare_small_runs_the_issue_s_small_setting(tmp_path):
    """gpu_validation.sh compare-small hands paper_comparison the quality issue's small setting
    (8 x 384, 12 q / 4 kv heads, seq 4096, 600 steps of 4 x 4096, 20 warm-up steps, cosine to 0)
    on the sample corpus with --preset small; a stand-in python3 records the command instead of
    training."""
    import shlex
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bin_dir, small = tmp_path / "bin", tmp_path / "small"
    bin_dir.mkdir()
    small.mkdir()
    (small / "english_text_document.idx").write_bytes(b"")
    record = tmp_path / "argv.txt"
    (bin_dir / "python3").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {shlex.quote(str(record))}\n')
    (bin_dir / "python3").chmod(0o755)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'stand-in GPU, 80 GiB'\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SMALL=str(small),
               SMALL_OUT=str(tmp_path / "out" / "cmp"), EVAL_SELECTIONS="oracle sub2")
    (tmp_path / "out" / "cmp").mkdir(parents=True)
    proc = subprocess.run(["bash", os.path.join(root, "tools", "gpu_validation.sh"), "compare-small",
                           str(tmp_path / "res")], env=env, capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in record.read_text().splitlines() if l.startswith("tools/paper_comparison.py"))
    args = pc.parse_args(shlex.split(line)[1:])
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.heads, args.kv_heads) == (8, 384, 1024, 12, 4)
    assert (args.seq_length, args.micro_batch_size, args.global_batch_size, args.train_iters) == (4096, 4, 4, 600)
    assert args.lr_warmup_iters == 20 and args.lr == 1e-3 and args.min_lr == 0.0  # cosine to 0
    command = pc.train_command(args, "ssa-recipe", 1, str(tmp_path / "run"))
    assert command[command.index("--lr-warmup-iters") + 1] == "20" and "--lr-warmup-fraction" not in command
    assert float(command[command.index("--min-lr") + 1]) == 0.0
    own = pc.parse_args(shlex.split(line)[1:] + ["--lr-warmup-fraction", "0.05", "--lr", "3e-3"])
    assert own.lr_warmup_iters is None and own.lr_warmup_fraction == 0.05 and own.lr == 3e-3  # flags win
    assert args.data_path == f"{small}/english_text_document" and args.eval_selections == ["oracle", "sub2"]
    assert args.systems == ["full-full", "ssa-recipe"] and args.seeds == [1, 2]
    assert (tmp_path / "res" / "compare_small.tgz").is_file()


def test_same_seed_pairs_and_selection_gaps(tmp_path):
    """summary.md's pairs: per system, over the seeds both it and Full-Full evaluated, the ln
    ratio of valid ppl to Full-Full's of the same seed (full to full, sparse k to sparse k,
    sparse k=16 to full), as exp(mean) - 1 with its sd; and per block selection the mean loss
    above the model's own full mode."""
    import math
    from ssa_megatron.eval.perplexity import selection_mode
    args = _args(tmp_path, "--systems", "full-full", "ssa-recipe", "--seeds", "1", "2", "3",
                 "--sweep", "8", "16", "--eval-selections", "oracle")

    def result(full, k8, k16, oracle16):
        r = _eval_result(full, {8: k8, 16: k16})
        r["perplexity"].append({"mode": selection_mode("oracle"), "block_counts": 16, "ppl": oracle16})
        return r
    evals = {("full-full", 1): result(100.0, 110.0, 105.0, 101.0), ("full-full", 2): result(120.0, 130.0, 125.0, 121.0),
             ("full-full", 3): result(90.0, 99.0, 95.0, 91.0),
             ("ssa-recipe", 1): result(99.0, 100.0, 99.5, 99.2), ("ssa-recipe", 2): result(121.0, 122.0, 121.5, 121.2),
             ("ssa-recipe", 3): None}  # not evaluated: seed 3 is left out of the pairs
    row = pc.paired_ratios(args, evals)["ssa-recipe"]
    assert row["seeds"] == [1, 2]
    want = [math.log(99.0 / 100.0), math.log(121.0 / 120.0)]
    assert row["full"] == pytest.approx(want)
    assert row["sparse k=16 / full-full full"] == pytest.approx([math.log(99.5 / 100.0), math.log(121.5 / 120.0)])
    table = pc.markdown_paired(args, pc.paired_ratios(args, evals))
    mean = 100 * (math.exp(sum(want) / 2) - 1)
    assert f"| ssa-recipe | 1 2 | {mean:+.2f} % (sd {100 * abs(want[0] - want[1]) / 2:.2f}) |" in table
    gaps = pc.selection_gaps(args, evals)
    assert gaps["ssa-recipe"]["own"][16] == pytest.approx((math.log(99.5 / 99.0) + math.log(121.5 / 121.0)) / 2)
    assert gaps["full-full"]["oracle"][16] == pytest.approx(
        (math.log(101 / 100) + math.log(121 / 120) + math.log(91 / 90)) / 3)
    assert "| full-full | oracle |" in pc.markdown_selection_gaps(args, gaps)
    assert pc.paired_ratios(_args(tmp_path, "--systems", "ssa-recipe"), evals) == {}  # no Full-Full
    against = pc.paired_ratios(args, evals, "ssa-recipe")  # --paired-against ssa-recipe
    assert list(against) == ["full-full"] and against["full-full"]["full"] == pytest.approx([-x for x in want])
    assert "Same-seed pairs against ssa-recipe" in pc.markdown_paired(args, against, "ssa-recipe")
    assert args.paired_against == ["full-full"]  # the default, with Full-Full among the systems
    with pytest.raises(SystemExit, match=r"--paired-against \['ssa-recipe-sub4'\]: name systems"):
        _args(tmp_path, "--systems", "full-full", "ssa-recipe", "--paired-against", "ssa-recipe-sub4")
