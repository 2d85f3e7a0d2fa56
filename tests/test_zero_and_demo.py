"""DeepSpeed ZeRO stages train, and the README demo command runs end to end with the losses it
has always had."""
import glob
import json
import os
import subprocess

import pytest

from dist_utils import ROOT, run_workers
from test_parallel import COMMON


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_loss_falls(tmp_path, random_dataset, stage):
    flags = COMMON + ["--data-path", random_dataset, "--train-iters", "16", "--lr", "1e-2",
                      "--lr-warmup-iters", "2", "--deepspeed-config",
                      os.path.join(ROOT, "examples", "ds_zero1.json"), "--zero-stage", str(stage)]
    result = run_workers("train", 2, str(tmp_path / f"zero{stage}"), *flags)  # DP=2: real sharding
    losses = result["lm_loss"]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < losses[0] - 0.15, losses
    with open(tmp_path / f"zero{stage}" / "rank0.log") as f:
        log = f.read()
    assert f"ZeRO stage {stage}" in log
    # the flag's lr reaches the optimizer DeepSpeed builds from the JSON (not its 1e-3
    # default): the lr logged after step 1 (the end of the 2-step warmup) is 1e-2
    first = log[log.index("iteration       1/16 |"):].splitlines()[0]
    assert "lr 1.000e-02" in first, first


def test_readme_demo_command_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    name = f"demo-relative-{os.getpid()}"  # a relative OUT is taken from the current directory
    env = dict(os.environ, OUT=name, TRAIN_ITERS="6", LOG_INTERVAL="1", EVAL_INTERVAL="3",
               SAVE_INTERVAL="3", VOCAB_SIZE="4000")
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_demo_cpu.sh")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(ROOT, name))
    os.rename(tmp_path / name, out)
    assert "iteration       6/6" in proc.stdout
    for notice in ("Transformer Engine", "Apex is not installed", "Setting accelerator"):
        assert notice not in proc.stdout + proc.stderr, notice  # hidden by ssa_megatron/console.py
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == "iter_0000006"
    assert glob.glob(str(out / "checkpoints" / latest / "*model_states.pt"))
    assert glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/lm_loss", "train/align_loss", "train/lr", "train/grad_norm",
                "throughput/tokens_per_s", "throughput/tflops_per_gpu", "valid/lm_loss"):
        assert tag in tags, tags
    assert_losses_unchanged(events)


GOLDEN = os.path.join(ROOT, "tests", "golden", "demo_losses.json")
RECORDED_TAGS = ("train/lm_loss", "train/align_loss", "train/grad_norm", "valid/lm_loss")


def assert_losses_unchanged(events):
    """The demo's per-step losses (fp32 CPU, seed 1234, reference attention) equal the ones recorded
    in tests/golden/demo_losses.json before the architecture refactor: a refactor must not change
    what the model computes. On the recording machine they were bit-identical run after run; the
    2e-6 relative slack absorbs another CPU's summation order (a real change of the model,
    the data order or the draws moves them by 1e-3 or more). Two derived numbers get more: the
    alignment loss (2e-3) is the mean squared difference of two branch outputs that agree to
    about 1 %, so the outputs' own rounding reaches it about 100x magnified, and the gradient
    norm (2e-4) sums rounding over every parameter. On one 2-core machine (session 15) they moved
    by up to 1.9e-4 and 2e-5 relative from run to run while the LM losses stayed within 1.3e-7:
    the LM losses are the guard. Rewrite the file with SSA_RECORD_DEMO_LOSSES=1 only for a change
    that is meant to alter training."""
    measured = {tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in RECORDED_TAGS}
    if os.environ.get("SSA_RECORD_DEMO_LOSSES") == "1":
        with open(GOLDEN, "w") as f:
            json.dump(measured, f, indent=1)
            f.write("\n")
    with open(GOLDEN) as f:
        golden = json.load(f)
    for tag in RECORDED_TAGS:
        steps = [step for step, _ in measured[tag]]
        assert steps == [step for step, _ in golden[tag]], (tag, steps)
        for (step, value), (_, expected) in zip(measured[tag], golden[tag]):
            slack = {"train/align_loss": 2e-3, "train/grad_norm": 2e-4}.get(tag, 2e-6)
            assert abs(value - expected) <= slack * abs(expected), (tag, step, value, expected)


def test_the_demo_script_refuses_arguments_in_one_line():
    """Its settings are environment variables: a flag given to it is refused, not ignored."""
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "pretrain_demo_cpu.sh"), "--train-iters", "5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "TRAIN_ITERS=" in proc.stderr, proc.stderr
