"""Checkpoints: exact resume (TP 1/2 x ZeRO 1/2), a save killed between the rank writes and
`latest`, and a checkpoint of another model shape refused with one line."""
import os
import subprocess
import sys

import pytest

from dist_utils import ROOT, run_workers
from test_parallel import COMMON

ITERS = 4
STOP = 2


def _flags(data, tp, stage, *extra):
    return COMMON + ["--data-path", data, "--train-iters", str(ITERS), "--lr", "5e-3",
                     "--lr-warmup-iters", "1", "--deepspeed-config",
                     os.path.join(ROOT, "examples", "ds_zero1.json"), "--zero-stage", str(stage),
                     "--tensor-model-parallel-size", str(tp), *extra]


_REFERENCE = {}


def uninterrupted(tmp_path_factory, data, tp, stage):
    key = (tp, stage)
    if key not in _REFERENCE:
        out = tmp_path_factory.mktemp(f"ref_tp{tp}_z{stage}")
        _REFERENCE[key] = run_workers("train", 2, str(out), *_flags(data, tp, stage))["lm_loss"]
    return _REFERENCE[key]


FULL_MATRIX = os.environ.get("SSA_CKPT_FULL_MATRIX") == "1"


# 2 processes each: TP=1 runs DP=2 (ZeRO really shards), TP=2 runs DP=1. TP1/ZeRO-1 and
# TP2/ZeRO-2 always; the crossed pairs (about a minute each) with SSA_CKPT_FULL_MATRIX=1.
@pytest.mark.parametrize("tp,stage", [(1, 1), (2, 2),
                                      pytest.param(1, 2, marks=pytest.mark.skipif(not FULL_MATRIX, reason="SSA_CKPT_FULL_MATRIX=1")),
                                      pytest.param(2, 1, marks=pytest.mark.skipif(not FULL_MATRIX, reason="SSA_CKPT_FULL_MATRIX=1"))])
def test_resume_is_exact(tmp_path, tmp_path_factory, random_dataset, tp, stage):
    ref = uninterrupted(tmp_path_factory, random_dataset, tp, stage)
    ckpt = str(tmp_path / "ckpt")
    first = run_workers("train", 2, str(tmp_path / "a"),
                        *_flags(random_dataset, tp, stage, "--save", ckpt, "--exit-interval", str(STOP)))
    assert first["iterations"] == list(range(1, STOP + 1))
    assert open(os.path.join(ckpt, "latest")).read().strip() == f"iter_{STOP:07d}"
    second = run_workers("ckpt_workers:train_counting_selections", 2, str(tmp_path / "b"),
                         *_flags(random_dataset, tp, stage, "--save", ckpt, "--load", ckpt))
    assert second["iterations"] == list(range(STOP + 1, ITERS + 1))
    assert second["selections"] == 1  # its files verified once, for the tokenizer check and the load
    assert first["lm_loss"] == ref[:STOP]
    assert second["lm_loss"] == pytest.approx(ref[STOP:], rel=1e-6, abs=1e-7), (second["lm_loss"], ref)
    assert second["consumed_samples"] == ITERS * 4


def test_killed_save_keeps_previous_checkpoint_and_resumes(tmp_path, tmp_path_factory, random_dataset):
    ref = uninterrupted(tmp_path_factory, random_dataset, 1, 1)
    ckpt = tmp_path / "ckpt"
    flags = _flags(random_dataset, 1, 1, "--save", str(ckpt), "--save-interval", str(STOP))
    # rank 1 dies in the 2nd save (iteration 4) after writing its files, before `latest`
    with pytest.raises(AssertionError) as err:
        run_workers("ckpt_workers:train_fault", 2, str(tmp_path / "crash"), "1", "2", *flags, timeout=300)
    assert "exit 17" in str(err.value)
    assert (ckpt / "latest").read_text().strip() == f"iter_{STOP:07d}"
    # the half-finished save stays under its temporary name; `latest` and iter_0000002 are untouched
    assert (ckpt / f"iter_{ITERS:07d}.partial").is_dir() and not (ckpt / f"iter_{ITERS:07d}").exists()
    resumed = run_workers("train", 2, str(tmp_path / "resume"), *flags, "--load", str(ckpt))
    assert resumed["iterations"] == list(range(STOP + 1, ITERS + 1))
    assert resumed["lm_loss"] == pytest.approx(ref[STOP:], rel=1e-6, abs=1e-7)
    assert (ckpt / "latest").read_text().strip() == f"iter_{ITERS:07d}"

    # a checkpoint of another model shape is refused with one line naming the difference
    proc = subprocess.run(
        [sys.executable, "-m", "ssa_megatron.training.pretrain",
         *_flags(random_dataset, 1, 1, "--load", str(ckpt)), "--hidden-size", "96"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, WORLD_SIZE="1", RANK="0", MASTER_PORT=str(_port())))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint") and "--hidden-size 64 (flags say 96)" in last, last
    assert "Traceback" not in proc.stderr

    # its ZeRO-1 optimizer shards are of 2 processes: resuming with 1 is refused in one line
    # (training on past it: a run with nothing left to train loads nothing)
    proc = subprocess.run([sys.executable, "-m", "ssa_megatron.training.pretrain",
                           *_flags(random_dataset, 1, 1, "--load", str(ckpt)), "--train-iters", str(ITERS + 2)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, WORLD_SIZE="1", RANK="0",
                                   MASTER_PORT=str(_port())))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "ZeRO optimizer shards of 2 processes" in last
    assert "relayout" in last
    assert (ckpt / "latest").read_text().strip() == f"iter_{ITERS:07d}"  # nothing lost


def _port():
    from dist_utils import free_port
    return free_port()


def test_keep_last_prunes_the_oldest_complete_checkpoints_only(tmp_path):
    """--keep-last N keeps the newest N complete checkpoints; partial saves and other
    directories are not checkpoints and stay."""
    from ssa_megatron.training.checkpointing import _prune
    for name in ("iter_0000001", "iter_0000002", "iter_0000003", "iter_0000004",
                 "iter_0000003.partial", "iter_notes"):
        (tmp_path / name).mkdir()
    _prune(str(tmp_path), 2, current="iter_0000004")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "iter_0000003.partial", "iter_0000004",
                                            "iter_notes"]


def test_keep_last_never_counts_checkpoints_of_a_left_timeline(tmp_path):
    """A run resumed from iter 4 (``--load-iteration 4``) while iter 6 of the first run exists:
    its first save (iter 5) with --keep-last 2 keeps iter 4, the one it resumed from; iter 6 is
    neither counted nor deleted."""
    from ssa_megatron.training.checkpointing import _prune
    for name in ("iter_0000004", "iter_0000005", "iter_0000006"):
        (tmp_path / name).mkdir()
    _prune(str(tmp_path), 2, current="iter_0000005")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000005", "iter_0000006"]
    (tmp_path / "iter_0000003").mkdir()
    _prune(str(tmp_path), 2, current="iter_0000005")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000004", "iter_0000005", "iter_0000006"]
