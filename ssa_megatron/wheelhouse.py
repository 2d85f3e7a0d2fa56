"""Build a wheelhouse for installing ssa_megatron on a GPU node without internet.

GPU images usually bring torch, triton and the CUDA libraries; what they lack is megatron-core,
DeepSpeed (an sdist on PyPI: built here into a pure-Python wheel, its ops compile on first use)
and a few small dependencies. This downloads binary wheels for the *target* Python/platform
(default CPython 3.12, manylinux x86_64), builds DeepSpeed and ssa_megatron wheels, and writes
an install script next to them.

    python tools/build_wheelhouse.py --out wheelhouse             # on a machine with internet
    # copy wheelhouse/ to the cluster, then on a GPU node:
    bash wheelhouse/install.sh                                   # pip --no-index from the folder

torch is never downloaded (several GB, and the node's build must match its CUDA driver).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent  # the checkout

# Binary wheels for the target interpreter. These depend on torch: take them without dependencies.
NO_DEPS = ["megatron-core==0.16.1"]
# Small packages whose dependency trees hold no torch: resolved, so versions fit each other
# (pydantic pins its pydantic-core).
# GPU images bring transformers, tokenizers, safetensors, sentencepiece and tensorboard; pass
# them with --extra for a bare node.
# zstandard: joining zstd corpus shards (tools/corpus_shards.py join) on the node; GPU images lack it
# (xz shards, --format xz, need nothing).
WITH_DEPS = ["hjson", "pydantic>=2", "msgpack", "ninja", "py-cpuinfo", "psutil", "einops",
             "packaging", "tqdm", "nvidia-ml-py", "zstandard"]
# What install.sh asks for; pip takes the rest from the node's environment or the folder.
INSTALL = ["ssa_megatron", "megatron-core", "deepspeed", "hjson", "pydantic", "zstandard"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"]


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:6])} ... failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc


def build_project_wheel(out: Path) -> None:
    """ssa_megatron's wheel into ``out``, built from a clean copy of the sources: an in-tree build
    reuses build/, and a stale build/ would leak removed or hide missing modules."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy(ROOT / "setup.py", src)
        shutil.copytree(ROOT / "ssa_megatron", src / "ssa_megatron",
                        ignore=shutil.ignore_patterns("__pycache__"))
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
             "-w", str(out), str(src)])


def install_script(extras, zstd: bool = True) -> str:
    """install.sh: our packages from the folder (zstandard only with ``zstd``), then ``extras``
    without their dependencies."""
    install = [name for name in INSTALL if zstd or name != "zstandard"]
    lines = ["#!/usr/bin/env bash",
             "# Offline install of ssa_megatron into the current Python environment.",
             "set -euo pipefail",
             'HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"',
             'PY="${PYTHON:-python3}"',
             f'"$PY" -m pip install --no-index --find-links "$HERE" {" ".join(install)}']
    if extras:
        lines.append(f'"$PY" -m pip install --no-index --no-deps --find-links "$HERE" {" ".join(extras)}')
    lines.append("\"$PY\" -c 'import megatron.core, deepspeed, ssa_megatron; "
                 "print(\"ssa_megatron ready:\", ssa_megatron.__file__)'")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="wheelhouse")
    p.add_argument("--python-version", default="3.12")
    p.add_argument("--deepspeed", default="deepspeed==0.19.8")
    p.add_argument("--extra", nargs="*", default=[], help="more requirements to download")
    p.add_argument("--extra-no-deps", nargs="*", default=[],
                   help="requirements that depend on torch, taken without dependencies and "
                        "installed by install.sh (e.g. fla-core==0.6.0 for bench_attention.py)")
    p.add_argument("--without-zstandard", action="store_true",
                   help="leave zstandard out (5.5 MB, a third of the folder): only zstd corpus "
                        "shards need it on the node, xz shards join with Python's own lzma; for "
                        "a GPU node whose transfers are size-limited")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    plat = [f"--platform={x}" for x in PLATFORMS]
    impl = ["--implementation", "cp", "--python-version", args.python_version, "--only-binary=:all:"]
    jobs = ([(r, True) for r in NO_DEPS + list(args.extra_no_deps)]
            + [(r, False) for r in WITH_DEPS + list(args.extra)
               if not (args.without_zstandard and r == "zstandard")])
    if args.without_zstandard:  # a folder built before with it: install.sh must not find it
        for old in out.glob("zstandard-*.whl"):
            old.unlink()
    for req, no_deps in tqdm(jobs, desc="download", unit="pkg"):
        run(pip + ["download", "-q", "-d", str(out), *impl, *plat, req] + (["--no-deps"] if no_deps else []))
    # DeepSpeed ships as an sdist; building it needs torch, which this interpreter has.
    run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), args.deepspeed],
        env=dict(os.environ, DS_BUILD_OPS="0"))
    build_project_wheel(out)
    script = out / "install.sh"
    script.write_text(install_script([Requirement(r).name for r in args.extra_no_deps],
                                     zstd=not args.without_zstandard))
    script.chmod(0o755)
    wheels = sorted(x.name for x in out.glob("*.whl"))
    print(f"wrote {len(wheels)} wheels and install.sh to {out}")
    for name in wheels:
        print("  " + name)
    return 0

