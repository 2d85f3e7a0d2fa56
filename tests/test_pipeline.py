"""Pipeline parallelism (DeepSpeed PipelineModule) against the single-process model."""
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import ROOT, run_workers

FLAGS = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
         "--num-attention-heads", "8", "--num-query-groups", "2", "--seq-length", "64",
         "--ssa-block-counts", "2", "--micro-batch-size", "1", "--global-batch-size", "4",
         "--lr", "2e-3", "--log-interval", "1", "--split", "100,0,0", "--num-workers", "0",
         "--zero-stage", "0", "--adam-eps", "1e-4"]


def _compare(ref, other, grads=True):
    assert other["lm_loss"] == pytest.approx(ref["lm_loss"], rel=1e-5)
    assert other["align_loss"] == pytest.approx(ref["align_loss"], rel=1e-4)
    assert ref["weights"].keys() == other["weights"].keys()
    for name, w in ref["weights"].items():
        torch.testing.assert_close(other["weights"][name], w, rtol=1e-4, atol=1e-6, msg=name)
    if grads:
        for name, g in ref["first_grads"].items():
            torch.testing.assert_close(other["first_grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


# the options of imported models: the untied head is a layer of its own on the last stage
IMPORTED_OPTIONS = ["--untie-embeddings-and-output-weights", "--add-qkv-bias", "--use-rope-scaling",
                    "--rope-scaling-factor", "4", "--rope-scaling-original-max-position-embeddings", "32"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, random_dataset):
    out = tmp_path_factory.mktemp("pp_ref")
    flags = FLAGS + IMPORTED_OPTIONS + ["--data-path", random_dataset, "--train-iters", "3"]
    return flags, run_workers("pipeline_workers:train_and_gather", 1, str(out), *flags)


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory, reference_run):
    """The reference run's flags on 2 pipeline stages, saving its checkpoint."""
    flags, _ = reference_run
    out = tmp_path_factory.mktemp("pp2")
    save = str(out / "ckpt")
    return save, run_workers("pipeline_workers:train_and_gather", 2, str(out / "run"), *flags,
                             "--pipeline-model-parallel-size", "2", "--save", save)


def test_pp2_and_tp2pp2_equal_single_process(tmp_path, reference_run, pp2_run):
    flags, ref = reference_run
    assert len(ref["lm_loss"]) == 3 and "decoder.layers.3.self_attention.linear_gate.weight" in ref["weights"]
    assert {"output_layer.weight", "decoder.layers.3.self_attention.linear_qkv.bias"} <= set(ref["weights"])
    save, pp2 = pp2_run
    _compare(ref, pp2)
    from ssa_megatron.convert.megatron_ckpt import read_checkpoint  # the pipeline's files, merged
    saved, _, spec = read_checkpoint(save)
    assert spec["untie_embeddings_and_output_weights"] and spec["use_rope_scaling"]
    assert saved.keys() == pp2["weights"].keys()
    for name, w in pp2["weights"].items():
        torch.testing.assert_close(saved[name].float(), w, rtol=0, atol=0, msg=name)
    tp2pp2 = run_workers("pipeline_workers:train_and_gather", 4, str(tmp_path / "tp2pp2"), *flags,
                         "--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2")
    _compare(ref, tp2pp2)
    with open(tmp_path / "tp2pp2" / "rank0.log") as f:
        assert "accumulation" in f.read()


def test_alignment_loss_alone_trains_every_stage(tmp_path, random_dataset):
    flags = FLAGS + ["--data-path", random_dataset, "--train-iters", "1", "--lm-loss-weight", "0"]
    ref = run_workers("pipeline_workers:train_and_gather", 1, str(tmp_path / "ref"), *flags)
    pp2 = run_workers("pipeline_workers:train_and_gather", 2, str(tmp_path / "pp2"), *flags,
                      "--pipeline-model-parallel-size", "2")
    for name, g in ref["first_grads"].items():
        torch.testing.assert_close(pp2["first_grads"][name], g, rtol=1e-4, atol=1e-9, msg=name)
    for layer in range(4):  # stage 0 holds layers 0-1, stage 1 layers 2-3
        for part in ("linear_qkv", "linear_gate"):
            g = pp2["first_grads"][f"decoder.layers.{layer}.self_attention.{part}.weight"]
            assert g.abs().sum() > 0, (layer, part)


def test_zero2_with_pipeline_is_refused(random_dataset):
    proc = subprocess.run([sys.executable, "-m", "ssa_megatron.training.pretrain", *FLAGS,
                           "--data-path", random_dataset, "--train-iters", "1",
                           "--pipeline-model-parallel-size", "2", "--zero-stage", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "ZeRO stage 2 cannot run with --pipeline-model-parallel-size 2" in last
    assert "use ZeRO-1" in last


def test_pp2_checkpoint_resumes_exactly(tmp_path, random_dataset):
    """A 4-step PP2 run saving every 2 steps is the uninterrupted run; resuming its step-2
    checkpoint gives steps 3-4 again (--exit-interval: test_checkpoints.py, at PP 1)."""
    base = FLAGS + ["--data-path", random_dataset, "--train-iters", "4", "--pipeline-model-parallel-size", "2",
                    "--zero-stage", "1"]
    save = str(tmp_path / "ckpt")
    full = run_workers("train", 2, str(tmp_path / "full"), *base, "--save", save, "--save-interval", "2")
    assert full["iteration"] == 4 and os.path.isdir(os.path.join(save, "iter_0000002"))
    resumed = run_workers("train", 2, str(tmp_path / "resumed"), *base, "--load", save, "--load-iteration", "2")
    assert resumed["iterations"] == [3, 4]
    assert resumed["lm_loss"] == pytest.approx(full["lm_loss"][2:], rel=1e-6)
    assert resumed["align_loss"] == pytest.approx(full["align_loss"][2:], rel=1e-5)


def test_activation_checkpointing_changes_nothing(tmp_path, reference_run, pp2_run):
    """Recomputing every layer (PP2) and megatron's --recompute-activations (no pipeline) give the
    runs without recomputation: the same losses and weights."""
    flags, ref = reference_run
    recompute = run_workers("pipeline_workers:train_and_gather", 2, str(tmp_path / "pp2"), *flags,
                            "--pipeline-model-parallel-size", "2", "--recompute-interval", "1")
    for plain, rerun in ((pp2_run[1], recompute),
                         (ref, run_workers("pipeline_workers:train_and_gather", 1, str(tmp_path / "pp1"),
                                           *flags, "--recompute-activations"))):
        _compare(plain, rerun)
        assert rerun["lm_loss"] == pytest.approx(plain["lm_loss"], rel=1e-6)
        assert rerun["align_loss"] == pytest.approx(plain["align_loss"], rel=1e-6)
