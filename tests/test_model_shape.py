"""The model's shape (ssa_megatron/model/shape.py) is the one place an architecture setting lives:
one field there gives the trainer's flag, the checkpoint's record, the HF config.json field, the
import and the model flags printed after it."""
import json
import os
import shutil
import subprocess
import sys

from dist_utils import ROOT
from test_parallel import COMMON

ANCHOR = "    # new fields above this line (tests/test_model_shape.py adds one here)\n"
NEW_FIELD = ('    shape_test_width: int = arch(7, "a setting only tests/test_model_shape.py adds",\n'
             '                                 group=OPTIONS, print_flag="changed")\n')

SCRIPT = r"""
import json, sys
import ssa_megatron
assert ssa_megatron.__file__.startswith(sys.argv[1]), ssa_megatron.__file__  # the edited copy
from ssa_megatron.convert import api
from ssa_megatron.training.arguments import parse_args
from ssa_megatron.training.distributed import destroy_distributed
from ssa_megatron.training.pretrain import run
save, hf, back = sys.argv[2:5]
run(parse_args(sys.argv[5:] + ["--save", save]))  # builds the model, trains a step, saves
api.megatron_to_hf(save, hf)
api.hf_to_megatron_checkpoint(hf, back)
print("FLAGS " + json.dumps(api.training_flags(back)))
destroy_distributed()
"""


def _meta_args(save):
    with open(os.path.join(save, "latest")) as f:
        tag = f.read().strip()
    with open(os.path.join(save, tag, "ssa_meta.json")) as f:
        return json.load(f)["args"]


def test_an_architecture_field_added_in_one_place_survives_training_and_hf(tmp_path, random_dataset):
    """Copy the package, add ONE field to ModelShape in the copy, and follow a non-default value
    through training, the checkpoint, the HF export and the import back."""
    pkg = tmp_path / "pkg"
    shutil.copytree(os.path.join(ROOT, "ssa_megatron"), pkg / "ssa_megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shape_py = pkg / "ssa_megatron" / "model" / "shape.py"
    text = shape_py.read_text()
    assert text.count(ANCHOR) == 1
    shape_py.write_text(text.replace(ANCHOR, NEW_FIELD + ANCHOR))  # the one place

    save, hf, back = (str(tmp_path / n) for n in ("ckpt", "hf", "back"))
    flags = COMMON + ["--data-path", random_dataset, "--train-iters", "1", "--shape-test-width", "5"]
    env = dict(os.environ, PYTHONPATH=str(pkg), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(pkg), save, hf, back, *flags],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    assert _meta_args(save)["shape_test_width"] == 5  # the trainer's checkpoint
    with open(os.path.join(hf, "config.json")) as f:
        assert json.load(f)["shape_test_width"] == 5  # the HF export
    assert _meta_args(back)["shape_test_width"] == 5  # imported back
    printed = json.loads(next(line[6:] for line in proc.stdout.splitlines() if line.startswith("FLAGS ")))
    assert printed[printed.index("--shape-test-width") + 1] == "5"  # the flags to continue with
    # the HF model code keeps a field it does not know as a config attribute
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(hf, trust_remote_code=True).shape_test_width == 5
