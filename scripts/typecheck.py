#!/usr/bin/env python3
"""Type-check the ``cvserve`` package with mypy.

The package's folders sit at the repository's top level (``service/`` is ``cvserve``,
``models/`` is ``cvserve.models``) and the editable install maps them with an import
hook, which mypy does not follow. This script lays out a tree of symbolic links under
``build/typecheck/cvserve`` that has the installed shape, then runs ``mypy -p cvserve``
on it (settings from pyproject.toml). Extra arguments go to mypy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "typecheck"


def link_tree() -> Path:
    """(Re)create ``build/typecheck/cvserve`` with links to service/'s entries and models/."""
    package = TREE / "cvserve"
    if TREE.exists():
        shutil.rmtree(TREE)
    package.mkdir(parents=True)
    for entry in sorted((ROOT / "service").iterdir()):
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "models").symlink_to(ROOT / "models")
    return TREE


def main() -> int:
    tree = link_tree()
    env = {**os.environ, "MYPYPATH": str(tree)}
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "cvserve"]
    return subprocess.call([*cmd, *sys.argv[1:]], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
