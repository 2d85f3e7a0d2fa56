"""The result plotting tools: tools/plot_train_curves.py and tools/plot_results.py."""
import json

import pytest

from ssa_megatron.study import plot_results as pr
from ssa_megatron.study import plot_train_curves as ptc

PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_train_curves_joins_parts_and_rejects_bad_specs(tmp_path):
    import numpy as np
    steps, avg = ptc.moving_average([1, 2, 3, 4], [1.0, 3.0, 5.0, 7.0], 2)
    assert list(steps) == [2, 3, 4] and np.allclose(avg, [2.0, 4.0, 6.0])
    for name, offset in (("a", 0.0), ("b", 0.5)):
        run = tmp_path / name
        run.mkdir()
        (run / "train_part1_until_3.json").write_text(json.dumps(
            {"iteration": 3, "iterations": [1, 2, 3], "lm_loss": [5 + offset, 4 + offset, 3 + offset]}))
        (run / "train.json").write_text(json.dumps(
            {"iteration": 6, "iterations": [4, 5, 6], "lm_loss": [2 + offset] * 3}))
    runs = ptc.load_runs([f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}"])
    assert runs[1][1] == [1, 2, 3, 4, 5, 6] and runs[1][2][0] == 5.5
    assert ptc.up_to(runs, 4)[1][1:] == ([1, 2, 3, 4], [5.5, 4.5, 3.5, 2.5]) and ptc.up_to(runs, None) == runs
    with pytest.raises(SystemExit):
        ptc.load_runs([str(tmp_path / "a")])  # no LABEL=
    with pytest.raises(SystemExit):
        ptc.load_runs([f"C={tmp_path / 'missing'}"])
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    assert ptc.main(["--out", str(out), "--smooth", "2", "--max-step", "5", "--ymax", "7",
                     f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}"]) == 0
    assert out.read_bytes()[:8] == PNG
    # --paired: each second run against the one before it, on the steps both logged
    c = tmp_path / "c"
    c.mkdir()
    (c / "train.json").write_text(json.dumps({"iteration": 2, "iterations": [1, 2], "lm_loss": [4.0, 4.0]}))
    runs = ptc.load_runs([f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}", f"B2={tmp_path / 'b'}", f"C={c}"])
    assert [(i, label, steps) for i, label, steps, _ in ptc.differences(runs, paired=True)] == \
        [(1, "B - A", [1, 2, 3, 4, 5, 6]), (3, "C - B2", [1, 2])]
    assert ptc.differences(runs, paired=True)[1][3] == [-1.5, -0.5]
    assert [label for _, label, _, _ in ptc.differences(runs, paired=False)] == ["B - A", "B2 - A", "C - A"]
    # a pair without common steps is left out, and the next keeps its own run's index (colour)
    late = [("L", [7, 8], [1.0, 1.0])]
    assert [i for i, *_ in ptc.differences(runs[:2] + runs[:1] + late + runs[2:], paired=True)] == [1, 5]
    with pytest.raises(SystemExit, match="even number"):
        ptc.differences(runs[:3], paired=True)
    assert ptc.main(["--out", str(out), "--paired", f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}"]) == 0


def test_plot_results_throughput_and_losses(tmp_path):
    bench = {"card": "NVIDIA H200", "results": {
        "full": {"step_ms": 100.0, "mfu": 0.41, "peak_memory_gb": 20.0},
        "ssa": {"step_ms": 119.0, "mfu": 0.35, "peak_memory_gb": 21.0},
        "broken": {"error": "OOM"}}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    assert [r[0] for r in pr.throughput_rows(bench)] == ["full", "ssa"]  # errors are skipped
    with pytest.raises(SystemExit):
        pr.throughput_rows({"results": {"x": {"error": "OOM"}}})
    (tmp_path / "run.json").write_text(json.dumps({"lm_loss": [3.0, 2.0], "iterations": [1, 2]}))
    pytest.importorskip("matplotlib")
    assert pr.main(["throughput", "--out", str(tmp_path / "t.png"), str(tmp_path / "bench.json")]) == 0
    assert pr.main(["losses", "--out", str(tmp_path / "l.png"), f"DP=2={tmp_path / 'run.json'}"]) == 0
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG and (tmp_path / "l.png").read_bytes()[:8] == PNG
    with pytest.raises(SystemExit):
        pr.main(["losses", "--out", str(tmp_path / "x.png"), str(tmp_path / "run.json")])  # no label
