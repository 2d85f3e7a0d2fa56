"""tools/ssa_quality_study.py run (ssa_megatron.study.quality_study): one study folder holds one
setting, and a restarted run's earlier log is kept (no training here: the queue is stubbed)."""
import os


def _tool():
    from ssa_megatron.study import quality_study
    return quality_study


def test_runs_started_with_other_flags_are_refused_and_cut_runs_keep_their_log(tmp_path, monkeypatch, capsys):
    tool = _tool()
    started = []
    monkeypatch.setattr(tool, "run_queue", lambda jobs, *a, **k: (started.extend(jobs), ([], []))[1])
    flags = ["run", "--data-path", "unused", "--out", str(tmp_path), "--groups", "ssa-seq:1", "--gpus", "0"]
    run_dir = tmp_path / "ssa-seq_seed1"
    run_dir.mkdir()
    (run_dir / "train.log").write_text("the crash of the first attempt")
    assert tool.main(flags) == 0 and len(started) == 1
    kept = [n for n in os.listdir(run_dir) if n.startswith("train.log.previous-")]
    assert len(kept) == 1 and (run_dir / kept[0]).read_text() == "the crash of the first attempt"
    started.clear()
    assert tool.main(flags + ["--setting", '{"train_iters": 300}']) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 1 run folder(s)") and "\n" not in err and started == []
