"""What a new user reads: help without library warnings and with defaults, no prefix matching of
flags, error messages that point the right way, DeepSpeed's silent first-run build announced."""
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys

import pytest

from dist_utils import ROOT

# every command-line parser of the package: (module, its parser builder)
PARSERS = [("ssa_megatron.training.arguments", "build_parser"),
           ("ssa_megatron.eval.cli", "build_parser"),
           ("ssa_megatron.convert.cli", "build_parser"),
           ("ssa_megatron.data.preprocess", "build_parser"),
           ("ssa_megatron.data.tokenizer_training", "build_parser"),
           ("ssa_megatron.eval.backend_parity", "build_parser"),
           ("ssa_megatron.study.quality_study", "build_parser")]


def test_pretrain_help_starts_with_usage_and_shows_defaults():
    proc = subprocess.run([sys.executable, "-m", "ssa_megatron.training.pretrain", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr  # no library warning before the help
    assert proc.stdout.startswith("usage:")
    out = proc.stdout
    for group in ("network size:", "SSA attention:", "learning rate:", "mixed precision:",
                  "distributed and DeepSpeed:", "data and dataloader:", "checkpointing:"):
        assert group in out, group
    assert "peak learning rate (default: 0.001)" in " ".join(out.split())
    assert "(default: None)" not in out


@pytest.mark.parametrize("module,builder", PARSERS)
def test_no_prefix_matching(module, builder):
    parser = getattr(importlib.import_module(module), builder)()
    long_flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    subparsers = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    for sub in subparsers:
        for p in sub.choices.values():
            assert not p.allow_abbrev
    assert not parser.allow_abbrev
    flag = max(long_flags, key=len)
    with pytest.raises(SystemExit):
        parser.parse_known_args([flag[:-1], "1"]) if subparsers else parser.parse_args([flag[:-1], "1"])


def test_all_tool_parsers_refuse_abbreviations():
    """tools/*.py and the package modules behind them (benchmarks, studies, wheelhouse) that
    build their own parser pass allow_abbrev=False (text check: importing the GPU benchmarks
    needs Triton)."""
    folders = [os.path.join(ROOT, "tools"), os.path.join(ROOT, "ssa_megatron", "bench"),
               os.path.join(ROOT, "ssa_megatron", "study")]
    paths = [os.path.join(d, n) for d in folders for n in sorted(os.listdir(d)) if n.endswith(".py")]
    for name in paths + [os.path.join(ROOT, "ssa_megatron", "wheelhouse.py")]:
        text = open(name).read()
        for call in ("argparse.ArgumentParser(", "add_parser("):
            for start in [i for i in range(len(text)) if text.startswith(call, i)]:
                assert "allow_abbrev=False" in _call_text(text, start + len(call)), (name, call)


def _call_text(text, i):
    """The arguments of the call whose "(" ends just before ``i``."""
    depth = 1
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return text[i:]


def test_seq_length_message_offers_both_neighbours():
    from ssa_megatron.model.config import ConfigError, check_parallel_layout
    with pytest.raises(ConfigError, match="use 240 or 256$"):
        check_parallel_layout(8, 2, 1, 250, 16)
    with pytest.raises(ConfigError, match="use 16$"):
        check_parallel_layout(8, 2, 1, 10, 16)


def test_tokenizer_vocab_size_messages_say_which_way(tmp_path):
    from ssa_megatron.data.corpus import CorpusError
    from ssa_megatron.data.tokenizer_training import train_sentencepiece
    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    with pytest.raises(CorpusError, match=r"--vocab-size 270 is too small .* use --vocab-size \d+ or more"):
        train_sentencepiece([str(tmp_path / "a.txt")], str(tmp_path / "t1"), vocab_size=270)
    with pytest.raises(CorpusError, match=r"--vocab-size 5000 is more than .* use --vocab-size \d+ or less"):
        train_sentencepiece([str(tmp_path / "a.txt")], str(tmp_path / "t2"), vocab_size=5000)
    (tmp_path / "b.jsonl").write_text('{"body": "hello"}\n{"body": "world"}\n')
    with pytest.raises(CorpusError, match="check --json-keys"):
        train_sentencepiece([str(tmp_path / "b.jsonl")], str(tmp_path / "t3"), vocab_size=300)
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.jsonl"]  # no partial outputs


def test_evaluate_names_its_own_flag_for_a_missing_text(tmp_path, capsys):
    from ssa_megatron.eval.cli import main
    assert main(["--checkpoint", str(tmp_path), "--text", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("check the path given to --text") and "\n" not in err, err


def test_deepspeed_first_build_is_announced(tmp_path, monkeypatch, capsys):
    from ssa_megatron.console import announce_deepspeed_build
    from ssa_megatron.training.build_lock import deepspeed_cpu_op_build_dir
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("SSA_SHOW_LIBRARY_NOTICES", raising=False)
    with announce_deepspeed_build(deepspeed_cpu_op_build_dir()):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a line of ours")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("building DeepSpeed's CPU communication op (first run")
    assert out[1] == "a line of ours" and out[2].startswith("built DeepSpeed's CPU communication op in")
    assert len(out) == 3


def test_every_shell_script_answers_help_and_leaves_nothing(tmp_path):
    import glob
    scripts = [p for pattern in ("tools/*.sh", "examples/*.sh", "slurm/*.sh", "slurm/*.sbatch")
               for p in sorted(glob.glob(os.path.join(ROOT, pattern)))
               if not p.endswith("common.sh")]  # common.sh is sourced, not run
    assert len(scripts) >= 9
    for script in scripts:
        proc = subprocess.run(["bash", script, "--help"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=30)
        name = os.path.relpath(script, ROOT)
        assert proc.returncode == 0 and proc.stdout.strip() and not proc.stderr, (name, proc.stderr)
        assert os.listdir(tmp_path) == [], (name, os.listdir(tmp_path))
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_validation.sh"), "nonsense"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" not in proc.stdout and "bash tools/gpu_validation.sh" in proc.stderr
    assert os.listdir(tmp_path) == [] and not os.path.exists(os.path.join(ROOT, "results"))


def test_a_misspelt_flag_is_one_line_with_the_closest_flag():
    """argparse prints the whole usage (dozens of lines for the trainer) above the message; ours
    prints the message, the closest flag and where the help is, in one line."""
    proc = subprocess.run([sys.executable, "-c", "from ssa_megatron.training.arguments import build_parser; "
                           "build_parser().parse_args(['--num-layers', '2', '--hidden-size', '64', "
                           "'--num-attention-heads', '2', '--seq-length', '64', '--train-iters', '1', "
                           "'--hiden-size', '3'])"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "unrecognized arguments: --hiden-size 3" in lines[0]
    assert "did you mean --hidden-size?" in lines[0] and lines[0].endswith("--help")
    # a sub-command's flag (reported by the top-level parser) gets its hint too
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "to-hf",
                           "--input", "x", "--output", "y", "--dtyp", "bf16"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 2 and "did you mean --dtype?" in proc.stderr, proc.stderr


def test_a_misspelt_required_flag_is_named_as_unknown_not_as_missing():
    """--seq-len for the required --seq-length: argparse would report --seq-length as missing,
    which the user believes they gave."""
    from ssa_megatron.training.arguments import build_parser
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as err:
        parser.parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2",
                           "--seq-len", "64", "--train-iters", "1", "--", "x"])
    line = err.getvalue().strip()
    assert exit_info.value.code == 2 and "\n" not in line
    assert "unrecognized arguments: --seq-len" in line and "did you mean --seq-length?" in line, line
    assert "required" not in line


def test_torchrun_failure_summary_ends_with_the_users_error(tmp_path):
    """torchrun prints its own traceback and a failure summary after the ranks' output; the
    summary's last entry must be the ranks' one-line error, not a pointer to torch's docs."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "ssa_megatron.training.pretrain",
                           "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2",
                           "--seq-length", "64", "--train-iters", "1", "--hiden-size", "3"],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    summary = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "traceback :" in line]
    assert summary, proc.stderr[-3000:]
    assert "unrecognized arguments: --hiden-size 3" in summary[-1], summary[-1]
    assert "did you mean --hidden-size?" in summary[-1]


def test_a_configuration_error_is_recorded_for_torchrun(tmp_path, monkeypatch, capsys):
    """An error the trainer finds after parsing (ConfigError) reaches torchrun's summary too."""
    from ssa_megatron.model.config import ConfigError
    from ssa_megatron.training import pretrain

    def refuse(args):
        raise ConfigError("--example-flag 3 does not fit; use 2")
    monkeypatch.setattr(pretrain, "run", refuse)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    assert pretrain.main(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "2",
                          "--seq-length", "64", "--train-iters", "1", "--data-path", "unused"]) == 2
    assert capsys.readouterr().err.strip() == "error: --example-flag 3 does not fit; use 2"
    recorded = json.load(open(tmp_path / "error.json"))["message"]
    assert recorded["message"] == recorded["extraInfo"]["py_callstack"] == \
        "error: --example-flag 3 does not fit; use 2"
