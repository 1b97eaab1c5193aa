#!/usr/bin/env python3
"""Build the client-only wheel ``cvserve-client`` into ``dist/``.

Stages the files the client ships, in the installed shape, into a temporary folder:
``service/__init__.py`` as ``cvserve/__init__.py``, ``service/client/`` as ``cvserve/client/``,
the ``cvserve.v1`` protos of ``service/_proto/`` and ``models/__init__.py`` +
``models/types.py`` as ``cvserve/models/``, with ``clients/python/pyproject.toml`` and its
README; then runs ``pip wheel --no-deps --no-build-isolation`` there (setuptools of the
running environment, nothing downloaded). Prints the wheel's path.

Usage: python scripts/build_client.py [--dist DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "clients" / "python"

# (source relative to the repository, destination relative to the staging folder)
FILES = [
    ("service/__init__.py", "cvserve/__init__.py"),
    ("service/_proto/__init__.py", "cvserve/_proto/__init__.py"),
    ("service/_proto/cvserve/__init__.py", "cvserve/_proto/cvserve/__init__.py"),
    ("models/__init__.py", "cvserve/models/__init__.py"),
    ("models/types.py", "cvserve/models/types.py"),
    ("clients/python/pyproject.toml", "pyproject.toml"),
    ("clients/python/README.md", "README.md"),
]
FOLDERS = [("service/client", "cvserve/client"), ("service/_proto/cvserve/v1", "cvserve/_proto/cvserve/v1")]


def stage(target: Path) -> None:
    """Copy the shipped files into ``target`` in the installed shape."""
    for source, dest in FILES:
        (target / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / source, target / dest)
    for source, dest in FOLDERS:
        shutil.copytree(ROOT / source, target / dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def build(dist: Path) -> Path:
    """Stage and build the wheel into ``dist``; return its path.

    Raises:
        RuntimeError: pip failed (its output is in the message) or wrote no wheel.
    """
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cvserve-client-") as tmp:
        staging = Path(tmp) / "src"
        stage(staging)
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out)]
        done = subprocess.run([*cmd, str(staging)], capture_output=True, text=True, cwd=tmp)
        wheels = sorted(out.glob("cvserve_client-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip wheel failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        target = dist / wheels[0].name
        shutil.copy2(wheels[0], target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="folder for the wheel (dist/)")
    args = parser.parse_args()
    try:
        print(build(args.dist))
    except RuntimeError as e:
        print(f"build_client: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
