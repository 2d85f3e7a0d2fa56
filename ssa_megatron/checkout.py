"""Where the repository checkout is, for the commands that use its examples/ and tools/ (the
benchmarks, the paper comparison, fault injection) and start training runs from it."""
from __future__ import annotations

import os


def is_checkout(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "tools", "evaluate.py")) and \
        os.path.isdir(os.path.join(path, "examples"))


def checkout_root() -> str:
    """The package's parent when the package runs from a checkout (editable install or
    PYTHONPATH); else, with the package installed as a wheel (GPU nodes), the current directory
    when it is a checkout; else the package's parent (the callers then name the missing file)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if is_checkout(package_parent):
        return package_parent
    cwd = os.getcwd()
    return cwd if is_checkout(cwd) else package_parent
