"""tools/replicate_spread.py: window means, first departure and gradient-norm maxima of runs
read from their train.json (resumed parts joined)."""
import json
import os

import pytest

from ssa_megatron.study import replicates


def _run(path, losses, grads, split=None):
    os.makedirs(path)
    steps = list(range(1, len(losses) + 1))
    parts = [(steps, losses, grads)] if split is None else [
        (steps[:split], losses[:split], grads[:split]), (steps[split:], losses[split:], grads[split:])]
    for i, (s, l, g) in enumerate(parts):
        name = "train.json" if i == len(parts) - 1 else f"train_part{i + 1}_until_{s[-1]}.json"
        with open(os.path.join(path, name), "w") as f:
            json.dump({"iterations": s, "lm_loss": l, "grad_norm": g, "iteration": s[-1],
                       "tokens_per_iteration": 8}, f)
    return str(path)


def test_spread_of_replicates(tmp_path, capsys):
    base = [5.0 - 0.01 * i for i in range(20)]
    a = _run(tmp_path / "a", base, [1.0] * 20)
    off = base[:]
    off[12] += 0.004  # below the threshold: not a departure
    off[14:] = [x + 0.1 for x in off[14:]]
    b = _run(tmp_path / "b", off, [1.0] * 9 + [7.5] + [1.0] * 10, split=6)  # resumed after step 6
    report = replicates.spread({"a": a, "b": b}, [(1, 10), (15, 20), (15, 25)], threshold=0.005,
                               grad_window=(8, 12))
    rows = {r["run"]: r for r in report["runs"]}
    assert rows["b"]["first_departure"] == 15 and "first_departure" not in rows["a"]
    assert rows["b"]["max_grad_norm"] == 7.5 and rows["a"]["max_grad_norm"] == 1.0
    assert rows["a"]["windows"]["1-10"] == pytest.approx(sum(base[:10]) / 10)
    assert rows["b"]["windows"]["1-10"] == pytest.approx(sum(off[:10]) / 10)  # both parts read
    assert report["spread"]["15-20"] == pytest.approx(0.1)
    assert rows["a"]["windows"]["15-25"] is None and report["spread"]["15-25"] is None  # past the end
    assert replicates.main([f"a={a}", f"b={b}", "--windows", "15-20", "--reference", "b"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | loss 15-20 | first step > 0.005 from b")
    assert table[2] == "| a | 4.835 | 15 | - |" and table[-1].startswith("| spread (max - min) | 0.100 |")
    with pytest.raises(SystemExit):
        replicates.main([f"a={a}", "--reference", "nope"])
    assert "is not one of the runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        replicates.main([f"a={a}", "--windows", "9-3"])
