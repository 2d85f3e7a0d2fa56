"""The documented commands work as printed: every command in README.md and docs/FIRST_RUN.md names
a program that exists and flags its parser accepts, and docs/FIRST_RUN.md's walk-through runs end
to end (smaller sizes) - raw text, tokenizer, preprocessing, CPU training, Hugging Face export,
generation in both modes, evaluation with a plot. On its trained checkpoint, tools/evaluate.py's
perplexity equals the Hugging Face export's to 1e-5 nats per token."""
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from dist_utils import ROOT

DOCS = ["README.md", os.path.join("docs", "FIRST_RUN.md")]
# program -> (module, parser builder) for the flag check
PARSERS = {
    "ssa_megatron.training.pretrain": ("ssa_megatron.training.arguments", "build_parser"),
    "ssa-pretrain": ("ssa_megatron.training.arguments", "build_parser"),
    "tools/train_tokenizer.py": ("ssa_megatron.data.tokenizer_training", "build_parser"),
    "tools/preprocess_data.py": ("ssa_megatron.data.preprocess", "build_parser"),
    "tools/convert_checkpoint.py": ("ssa_megatron.convert.cli", "build_parser"),
    "tools/evaluate.py": ("ssa_megatron.eval.cli", "build_parser"),
    "tools/generate.py": ("ssa_megatron.eval.generate", "build_parser"),
}
# commands that need no check (set-up, other programs)
NOT_CHECKED = ("git", "cd", "source", "tensorboard")
# the walk-through at test size: flag -> value (the rest runs as printed)
SMALL = {"--train-iters": "24", "--save-interval": "24", "--eval-interval": "24",
         "--log-interval": "6", "--eval-iters": "1", "--micro-batch-size": "1",
         "--global-batch-size": "1", "--max-windows": "2", "--max-new-tokens": "12",
         "--vocab-size": "1000"}
SMALL_EXTRA = {"tools/evaluate.py": ["--sparsity-windows", "1"]}


def bash_commands(path):
    """The commands of the ```bash blocks of a markdown file: continuations joined, comments and
    blank lines dropped."""
    text = open(os.path.join(ROOT, path)).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
            cmd = cmd.split(" #")[0].strip() if not cmd.lstrip().startswith("#") else ""
            if cmd:
                out.append(cmd)
    return out


def split_program(argv):
    """(program, its arguments) of one command line."""
    if argv[0] == "torchrun" or argv[0].endswith("python"):
        if "-m" in argv:
            i = argv.index("-m")
            return argv[i + 1], argv[i + 2:]
        script = next(a for a in argv[1:] if a.endswith(".py"))
        return script, argv[argv.index(script) + 1:]
    if argv[0] == "bash":
        return argv[1], argv[2:]
    return argv[0], argv[1:]


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_parses(doc):
    commands = bash_commands(doc)
    assert commands
    for cmd in commands:
        argv = shlex.split(cmd.split("&&")[0])
        if argv[0] in NOT_CHECKED:
            continue
        program, args = split_program(argv)
        if program in PARSERS:
            module, builder = PARSERS[program]
            parser = getattr(importlib.import_module(module), builder)()
            try:
                parser.parse_args(args)
            except SystemExit:
                pytest.fail(f"{doc}: {cmd!r} is refused by its parser")
        elif program.startswith("ssa_megatron."):
            assert importlib.util.find_spec(program), f"{doc}: no module {program}"
        else:
            assert os.path.isfile(os.path.join(ROOT, program)), f"{doc}: {cmd!r}: no {program}"
        for arg in args:  # configs the commands name exist in the repository
            if arg.startswith(("examples/", "slurm/configs/")):
                assert os.path.isfile(os.path.join(ROOT, arg)), f"{doc}: {cmd!r}: no {arg}"


def small(argv):
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a in SMALL:
            out[i + 1] = SMALL[a]
    return out + SMALL_EXTRA.get(split_program(argv)[0], [])


def test_first_run_page_end_to_end(tmp_path, single_process_parallel_state):
    """docs/FIRST_RUN.md as a user runs it, in a folder that holds links to tools/ and examples/."""
    for name in ("tools", "examples"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               OMP_NUM_THREADS="2")
    outputs = {}
    for cmd in bash_commands(DOCS[1]):
        argv = shlex.split(cmd)
        if argv[0] in NOT_CHECKED + ("bash",):
            continue
        start = time.time()
        proc = subprocess.run(small(argv), cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        print(f"{time.time() - start:6.1f} s  {cmd[:70]}")
        assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        outputs[split_program(argv)[0]] = proc
        # our own lines, not library notices (they are filtered once in ssa_megatron/console.py)
        for notice in ("Warning", "Transformer Engine", "Apex is not installed",
                       "Setting accelerator", "built successfully", "full scope is deprecated"):
            assert notice not in proc.stdout + proc.stderr, (cmd, notice)
    run = tmp_path / "first_run"
    train = outputs["ssa_megatron.training.pretrain"].stdout
    assert "iteration      24/24" in train and "validation at iteration 24" in train
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000024"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
    generated = outputs["tools/generate.py"].stdout
    assert "--- full attention" in generated and "--- sparse attention, 4 blocks" in generated
    result = json.load(open(run / "eval.json"))
    assert {(r["mode"], r["block_counts"]) for r in result["perplexity"]} == \
        {("full", None)} | {("sparse", k) for k in (1, 2, 4, 8, 16)}
    assert (run / "eval.png").stat().st_size > 10_000
    check_evaluate_equals_hf_export(str(run / "checkpoints"), str(run / "hf"), str(run / "data" / "sotu"))


def check_evaluate_equals_hf_export(ckpt, hf_dir, data):
    """Same windows, both modes: evaluate's per-token NLL == the HF model's to 1e-5 (a vocabulary
    of 1000 is padded to 1024 in megatron's output layer; the export holds the 1000 real rows)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from ssa_megatron.eval import data as evdata
    from ssa_megatron.eval.model import load_model
    from ssa_megatron.eval.perplexity import apply_setting, evaluate_perplexity, window_losses
    model, spec, _ = load_model(ckpt, device="cpu")
    vocab = spec["vocab_size"]
    assert vocab == 1000
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    stream = evdata.indexed_stream(data, "98,2,0", "valid")
    windows = evdata.make_windows(len(stream), 256, None, 4)
    tokens, labels, _ = evdata.batch_windows(stream, windows, 256)
    for setting in (("full", None), ("sparse", 4), ("sparse", 1)):
        apply_setting(model, setting)
        ours = window_losses(model, tokens, labels, vocab_size=vocab)
        hf.set_inference_mode(*setting)
        with torch.no_grad():
            logits = hf(tokens, use_cache=False).logits.float()
        theirs = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none")
        gap = (ours.reshape(-1) - theirs).abs()
        assert gap.mean() < 1e-5 and gap.max() < 1e-4, (setting, float(gap.mean()), float(gap.max()))
        sums = evaluate_perplexity(model, stream, windows, 256, [setting], 2, vocab_size=vocab)
        assert sums[setting][0] / sums[setting][1] == pytest.approx(float(theirs.mean()), abs=1e-5)
    # the padded rows are in the softmax that training logs: that is the gap that was closed
    apply_setting(model, ("full", None))
    padded = window_losses(model, tokens, labels)
    assert (padded - window_losses(model, tokens, labels, vocab_size=vocab)).mean() > 1e-5
