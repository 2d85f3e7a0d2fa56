"""Run safety: no command silently destroys a checkpoint; damaged state is named and
survived. All scenarios run in ONE process (tests/safety_scenarios.py), each training run a real
process forked from it (kill -9, SIGINT, SIGTERM reach it for real); here we assert on what they
recorded. The four cases of the issue each failed on the code before it.
"""
import json
import os
import subprocess
import sys

import pytest

from dist_utils import HERE, ROOT


# the scenarios in two processes side by side (each runs one training process at a time, CI has
# two cores), split about evenly by their time: these, and all the others
SECOND_HALF = ["bad_data", "corrupt_each_file", "fault_loop"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, random_dataset):
    out = tmp_path_factory.mktemp("safety")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "safety_scenarios.py"), str(out / str(i)),
                               random_dataset, *names], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env)
             for i, names in enumerate((["--except", *SECOND_HALF], SECOND_HALF))]
    merged = {}
    for i, proc in enumerate(procs):
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
        with open(out / str(i) / "results.json") as f:
            merged.update(json.load(f))
    assert set(SECOND_HALF) <= merged.keys()
    return merged


def scenario(results, name):
    r = results[name]
    assert "crashed" not in r, r.get("crashed")
    return r


def one_error_line(log: str) -> str:
    assert "Traceback" not in log, log[-3000:]
    errors = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, log[-3000:]
    return errors[0]


def test_restart_without_load_resumes_and_never_overwrites(results):
    r = scenario(results, "restart_without_load")
    assert r["first"] == 0 and r["again"] == 0
    # issue case 1: before, the second run started again at iteration 1 and overwrote iter_0000002
    assert r["again_iterations"] == [3, 4]
    assert len(r["again_autoresume"]) == 1 and "iter_0000002" in r["again_autoresume"][0]
    assert r["iter2_untouched"]
    # --result-json: the resumed run's record holds its steps, the first run's is kept beside it
    assert r["records"] == {"case1_result_part1_until_2.json": [1, 2], "case1_result.json": [3, 4]}
    assert r["diagnosed"] == [1, 2, 3, 4]
    # a rerun of the finished command: one line says there is nothing to train
    assert r["done"] == 0 and r["done_iterations"] == [] and len(r["done_note"]) == 1
    assert r["done_built"] == []  # it says so before building the model
    # another --load into a --save that holds checkpoints: refused, one line with the choices
    assert r["other"] == 2
    line = one_error_line(r["other_log"])
    assert "already holds checkpoints (latest iter_0000004)" in line and "--start-over" in line
    # --start-over: the old checkpoints are moved aside (all of them, and latest), never deleted
    assert r["over"] == 0 and r["over_iterations"] == [1, 2] and len(r["over_note"]) == 1
    (aside,) = r["aside"].values()
    assert aside == ["diagnostics.jsonl", "iter_0000002", "iter_0000004", "latest"]
    assert r["same"] == 2 and "--load names the same directory" in one_error_line(r["same_log"])


def test_second_run_into_the_same_save_dir_is_refused(results):
    r = scenario(results, "two_runs")
    assert r["a_started"]
    # issue case 2: before, both runs finished with exit 0, overwriting each other
    assert r["b"] == 2 and r["a_alive_after_b"]
    line = one_error_line(r["b_log"])
    assert "is in use by another run (host" in line and "PID" in line
    assert r["a"] == 3 and len(r["a_saved"]) == 1 and r["latest"] in r["a_saved"][0]
    assert not r["lock_left"]
    # kill -9 leaves the lock; the next run on this host takes it over with a log line
    assert r["lock_after_kill"] and r["d"] == 0 and len(r["d_takeover"]) == 1


def test_damaged_checkpoint_is_named_and_the_previous_one_loaded(results):
    r = scenario(results, "damaged_checkpoint")
    assert r["made"] == 0
    # issue case 3: before, a 44-57 line traceback naming no file
    assert r["explicit"] == 2
    line = one_error_line(r["explicit_log"])
    assert "iter_0000004 is damaged: mp_rank_00_model_states.pt is" in line and "bytes" in line
    assert r["resume"] == 0 and "Traceback" not in r["resume_log"]
    warnings = [ln for ln in r["resume_log"].splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "mp_rank_00_model_states.pt" in warnings[0], warnings
    assert "loading" in warnings[0] and "iter_0000002 instead" in warnings[0]
    assert r["resume_iterations"] == [3, 4, 5, 6]
    assert len(r["replaced"]) == 1  # the damaged iter_0000004 was renamed, not deleted
    assert r["none"] == 2 and r["none_untouched"]
    assert "no intact checkpoint in" in one_error_line(r["none_log"])


def test_ctrl_c_saves_like_sigterm_and_twice_exits_at_once(results):
    r = scenario(results, "ctrl_c")
    assert r["once_started"] and r["twice_started"]
    once, twice, early = r["once"], r["twice"], r["early"]
    # issue case 4: before, a 27-line traceback and nothing saved
    assert once["code"] == 3 and "Traceback" not in once["log"], once["log"][-2000:]
    assert f"stop signal: saved" in once["log"] and once["latest"] and once["latest"] in once["log"]
    assert not once["lock_left"]
    assert twice["code"] == 130 and "Traceback" not in twice["log"] and twice["latest"] is None
    assert "second Ctrl-C: exiting now" in twice["log"] and not twice["lock_left"]
    early_lines = early["log"].strip().splitlines()
    assert early["code"] == 130 and early_lines[-1] == (
        "interrupted (Ctrl-C) before training started; no checkpoint was written")
    assert all(line.startswith("building the model") for line in early_lines[:-1]), early_lines


def test_nonfinite_loss_skips_the_step_and_stops_after_n_in_a_row(results):
    r = scenario(results, "nonfinite")
    for zero in ("zero0", "zero1"):  # our guard for the plain fp32 optimizer; DeepSpeed's for ZeRO
        z = r[zero]
        assert z["code"] == 0, z["log"][-2000:]
        skipped = [ln for ln in z["log"].splitlines() if ln.startswith("warning: iteration 3:")]
        assert len(skipped) == 1 and "optimizer step skipped (1 in a row, 1 in this run" in skipped[0]
        assert z["skipped_unchanged"] is None  # iter 3 == iter 2 bit for bit: weights and Adam state
        assert z["next_changed"] is not None  # training went on
    halt = r["halt"]
    assert halt["code"] == 2 and halt["latest"] == "iter_0000006"
    line = one_error_line(halt["log"])
    assert "3 optimizer steps in a row" in line and "iteration 6" in line and "iter_0000006" in line


def test_full_disk_during_save_keeps_latest(results):
    r = scenario(results, "disk_full")
    assert r["code"] == 2
    line = one_error_line(r["log"])
    assert "No space left on device" in line and "latest still names iter_0000002, which is intact" in line
    assert r["latest"] == "iter_0000002" and r["iter2_problem"] is None
    assert not any(e.endswith(".partial") or e == "run.lock" for e in r["entries"]), r["entries"]
    assert r["again"] == 0 and r["again_iterations"] == [3, 4, 5, 6]


def test_truncated_or_mismatched_data_is_refused_in_one_line(results):
    r = scenario(results, "bad_data")
    cut, mixed = r["cut"], r["mixed"]
    assert cut["code"] == 2 and mixed["code"] == 2
    assert cut["log"].strip() == one_error_line(cut["log"])
    assert "cut.bin is 1000 bytes but" in cut["log"] and "describes 96414 bytes" in cut["log"]
    assert "mixed.bin is 96414 bytes but" in mixed["log"] and "mixed.idx describes" in mixed["log"]


def test_each_checkpoint_file_truncated_deleted_or_flipped_is_named(results):
    r = scenario(results, "corrupt_each_file")
    assert r["made"] == 0
    assert set(r["kinds"]) == {"manifest.json", "mp_rank_00_model_states.pt", "rng/rank_00000.pt",
                               "ssa_meta.json", "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    assert len(r["cases"]) == 3 * (len(r["kinds"]) + 1)
    for case in r["cases"]:
        if case["file"] == "../latest":  # a damaged pointer: the newest intact checkpoint loads
            assert case["tag"] == "iter_0000004" and case["convert_iteration"] == 4, case
            continue
        # the loader and the converter (and so tools/evaluate.py) fall back, naming the file
        assert case["tag"] == "iter_0000002", case
        assert case["convert_iteration"] == 2, case
        name = os.path.basename(case["file"])
        assert len(case["notes"]) == 1 and name in case["notes"][0] and "iter_0000004 is damaged" in case["notes"][0]
        assert case["convert_warnings"] == case["notes"]


def test_kill_9_at_random_moments_then_rerun_gives_bitwise_equal_weights(results):
    """The CI share of the fault-injection loop (5 trials); tools/fault_injection.py runs 30+ and
    docs/RELIABILITY.md records that run."""
    r = scenario(results, "fault_loop")
    assert r["trials"] == 5 and r["final_state_bitwise_equal"] == 5
    assert r["killed"] + r["finished_before_kill"] == 5 and r["killed_inside_save"] >= 1
    assert r["damaged_after_kill"] == 0 and r["bytes_lost"] == 0


def test_stop_signal_gives_ctrl_c_back_when_training_ends():
    import signal

    from ssa_megatron.training.signals import StopSignal
    before = signal.getsignal(signal.SIGINT)
    stop = StopSignal()
    assert signal.getsignal(signal.SIGINT) == stop._interrupt
    stop.restore()
    assert signal.getsignal(signal.SIGINT) == before


def test_fault_injection_refuses_a_workdir_with_other_files(tmp_path, capsys):
    """tools/fault_injection.py deletes and rewrites its run folders (reference/, trialNNN/) in
    --workdir: a directory holding anything it did not create is refused, untouched."""
    from ssa_megatron.training import fault_injection as fi
    work = tmp_path / "work"
    (work / "reference").mkdir(parents=True)
    (work / "reference" / "notes.txt").write_text("mine")
    assert fi.main(["--trials", "1", "--workdir", str(work), "--data-path", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --workdir") and err.endswith("give a new or empty directory")
    assert (work / "reference" / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(work)) == ["reference"]
    fi.claim_workdir(str(tmp_path / "fresh"))  # new: claimed, and claimed again on a rerun
    (tmp_path / "fresh" / "trial000").mkdir()
    fi.claim_workdir(str(tmp_path / "fresh"))


def test_diagnostics_of_steps_after_the_last_checkpoint_are_dropped_on_resume(tmp_path):
    """A run killed after its last checkpoint wrote diagnostics records that the resumed run
    writes again: resume_at drops them, so each iteration has one record."""
    from types import SimpleNamespace

    from ssa_megatron.training.diagnostics import Diagnostics
    path = tmp_path / "diagnostics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(1, 6)) + '{"itera')
    args = SimpleNamespace(diagnostics_interval=1, diagnostics_dense_until=0, diagnostics_json=str(path),
                           save=None)
    diagnostics = Diagnostics(args, SimpleNamespace(module=None), {})
    diagnostics.resume_at(3)
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1, 2, 3]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("diagnostics.jsonl.past-3-")]
    assert aside.read_text() == json.dumps({"iteration": 4}) + "\n" + json.dumps({"iteration": 5}) + "\n" + '{"itera'
    diagnostics.resume_at(3)
    assert len(path.read_text().splitlines()) == 3 and len(list(tmp_path.iterdir())) == 2


def test_tensorboard_of_a_resumed_run_shows_each_step_once(tmp_path):
    """A run killed after step 4 with its last checkpoint at step 2 resumes at 3: TensorBoard
    hides the killed run's steps 3-4 (purge_step), so the curve has steps 1..6 once; a finished
    run rerun opens no new event file."""
    import glob
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ssa_megatron.training.tb import TrainLogger
    args = SimpleNamespace(tensorboard_dir=str(tmp_path), train_iters=6, attention_mode="full",
                           ssa_align_coef=0.0)

    def run(first, last, loss):
        logger = TrainLogger(args, True, first_step=first)
        for it in range(first, last + 1):
            logger.log_train(it, loss, float("nan"), None, 1e-3, 1.0, 1.0, 1.0, it * 4, 1.0)
        logger.close()

    run(1, 4, 5.0)  # killed after step 4; checkpoint at 2
    run(3, 6, 4.0)  # the resumed run
    files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    TrainLogger(args, True, first_step=7).close()  # nothing to train
    assert glob.glob(str(tmp_path / "events.out.tfevents.*")) == files
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    steps = [(e.step, e.value) for e in events.Scalars("train/lm_loss")]
    assert steps == [(1, 5.0), (2, 5.0), (3, 4.0), (4, 4.0), (5, 4.0), (6, 4.0)]
