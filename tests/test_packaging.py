"""The wheel that offline GPU nodes install (tools/build_wheelhouse.py) holds the whole package,
and its install.sh installs the extras."""
import os
import zipfile

from ssa_megatron import wheelhouse as build_wheelhouse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_contains_every_module_and_the_entry_point(tmp_path):
    out = tmp_path / "wheel"
    build_wheelhouse.build_project_wheel(out)  # the wheelhouse's own build, from a clean copy
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


def test_install_script_installs_extras_without_their_dependencies():
    plain = build_wheelhouse.install_script([])
    assert "--no-deps" not in plain and "ssa_megatron megatron-core deepspeed" in plain
    lines = build_wheelhouse.install_script(["fla-core"]).splitlines()
    extra = [line for line in lines if "fla-core" in line]
    assert len(extra) == 1 and "--no-index --no-deps" in extra[0]
    assert lines.index(extra[0]) > next(i for i, line in enumerate(lines) if "ssa_megatron megatron-core" in line)


def test_wheelhouse_brings_what_the_corpus_join_needs_on_a_gpu_node():
    """GPU images (torch, triton, transformers...) lack zstandard, which joining corpus shards
    imports: the wheelhouse downloads it and install.sh installs it."""
    assert "zstandard" in build_wheelhouse.WITH_DEPS
    installs = [line for line in build_wheelhouse.install_script([]).splitlines() if "pip install" in line]
    assert len(installs) == 1 and installs[0].endswith(" zstandard")
    # --without-zstandard (xz shards only): nothing asks for it
    lean = build_wheelhouse.install_script([], zstd=False)
    assert "zstandard" not in lean and "ssa_megatron megatron-core deepspeed hjson pydantic" in lean


def test_checkout_root_is_found_when_the_package_is_installed_as_a_wheel(tmp_path, monkeypatch):
    """The benchmarks and the paper comparison read examples/ and tools/ of the checkout: from a
    package run in place that is the package's parent; from a wheel install (GPU nodes), the
    current directory when it is a checkout."""
    import ssa_megatron.checkout as co
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(tmp_path)
    assert co.checkout_root() == checkout
    installed = tmp_path / "site-packages" / "ssa_megatron"
    installed.mkdir(parents=True)
    monkeypatch.setattr(co, "__file__", str(installed / "checkout.py"))
    assert co.checkout_root() == str(tmp_path / "site-packages")  # neither is a checkout
    monkeypatch.chdir(checkout)
    assert co.checkout_root() == checkout


def test_setup_env_refuses_a_python_older_than_3_10(tmp_path):
    """A login node's python3 is often 3.8 or 3.9: setup says which Python it found and what to
    pass, in one line, before making a virtual environment that pip would then fail in; a venv
    made earlier with such a Python is named, not reused."""
    import subprocess
    import sys

    def fake_python(version):  # runs -c code in this Python, with sys.version_info = version
        path = tmp_path / f"python{version[0]}.{version[1]}"
        path.write_text(
            f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "Python {".".join(map(str, version))}"; exit 0; }}\n'
            f'[ "$1" = -c ] && exec {sys.executable} -c "import sys; sys.version_info = {version}; '
            'exec(sys.argv[1])" "$2"\nexit 1\n')
        path.chmod(0o755)
        return path
    fake = fake_python((3, 9, 2))
    venv = tmp_path / "venv"
    env = dict(os.environ, PYTHON=str(fake), SSA_VENV=str(venv))
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "setup_env.sh")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and not venv.exists()
    assert r.stderr.strip().splitlines()[-1] == (
        f"setup: error: {fake} is Python 3.9.2, and ssa_megatron needs Python 3.10 or newer: "
        "rerun with PYTHON=python3.11 (any python3.10+)")
    (venv / "bin").mkdir(parents=True)  # a venv an earlier run made with that Python
    os.symlink(fake, venv / "bin" / "python")
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "setup_env.sh")],
                       env=dict(env, PYTHON="python3"), capture_output=True, text=True)
    assert r.returncode == 1 and f"rm -rf {venv}" in r.stderr and "Python 3.9.2" in r.stderr
    # a new enough one passes the check (and fails later here: the stand-in cannot make a venv)
    r = subprocess.run(["bash", os.path.join(ROOT, "tools", "setup_env.sh")],
                       env=dict(env, PYTHON=str(fake_python((3, 12, 0))), SSA_VENV=str(tmp_path / "v2")),
                       capture_output=True, text=True)
    assert "needs Python 3.10 or newer" not in r.stderr
    assert "creating the virtual environment" in r.stderr


def test_the_converter_and_checkpoint_readers_import_no_megatron_core():
    """tools/convert_checkpoint.py (import, export, continue-flags) and the checkpoint format
    start without megatron-core (3 s of its ~4.5 s start-up); a fresh interpreter checks."""
    import subprocess
    import sys
    code = ("import sys; import ssa_megatron.convert.cli, ssa_megatron.convert.api, "
            "ssa_megatron.convert.continued, ssa_megatron.training.checkpoint_format, "
            "ssa_megatron.model; from ssa_megatron.model import ConfigError; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'deepspeed')); "
            "assert not heavy, heavy[:5]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
