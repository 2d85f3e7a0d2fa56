"""The wheel that offline GPU nodes install (tools/build_wheelhouse.py builds it the same way,
from a clean copy of the sources) holds the whole package."""
import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contains_every_module_and_the_entry_point(tmp_path):
    src = tmp_path / "src"  # a clean copy: a stale build/ folder in the checkout would hide gaps
    src.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.py"), src)
    shutil.copytree(os.path.join(ROOT, "ssa_megatron"), src / "ssa_megatron",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True, cwd=tmp_path)
    wheel = [f for f in os.listdir(out) if f.startswith("ssa_megatron-") and f.endswith(".whl")]
    assert len(wheel) == 1
    with zipfile.ZipFile(out / wheel[0]) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    sources = {os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
               for d, _, files in os.walk(os.path.join(ROOT, "ssa_megatron"))
               for f in files if f.endswith(".py")}
    assert sources - names == set()  # e.g. a folder without __init__.py would be left out
    assert "ssa-pretrain = ssa_megatron.training.pretrain:main" in entry_points
