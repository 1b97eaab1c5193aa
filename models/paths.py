"""Where cvserve keeps its data: the demo model repository the commands use by default.

The first of these that applies:

1. ``$CVSERVE_DEMO_DIR``: the demo repository folder itself.
2. ``$CVSERVE_HOME/demo_repository``: a data folder of the installation's choosing (the
   Docker image sets ``CVSERVE_HOME=/var/lib/cvserve``).
3. ``<checkout>/demo_repository`` when cvserve runs from its source checkout (an editable
   install, as ``make serve`` sets up).
4. ``${XDG_DATA_HOME:-~/.local/share}/cvserve/demo_repository`` otherwise (a wheel).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["cvserve_home", "default_repository_path"]

_HERE = Path(__file__).resolve()


def _checkout(package_file: Path) -> Path | None:
    """The source checkout this module runs from, if any (``<checkout>/models/paths.py``)."""
    root = package_file.parents[1]
    if (root / "pyproject.toml").is_file() and (root / "service" / "__init__.py").is_file():
        return root
    return None


def cvserve_home(env: Mapping[str, str] = os.environ, package_file: Path = _HERE) -> Path:
    """The folder cvserve keeps its data in (rules 2-4 of the module docstring)."""
    if env.get("CVSERVE_HOME"):
        return Path(env["CVSERVE_HOME"]).expanduser()
    checkout = _checkout(package_file)
    if checkout is not None:
        return checkout
    data = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "share")
    return Path(data).expanduser() / "cvserve"


def default_repository_path(env: Mapping[str, str] = os.environ, package_file: Path = _HERE) -> Path:
    """The demo repository's ``models.yaml`` (see the module docstring for where it is)."""
    if env.get("CVSERVE_DEMO_DIR"):
        return Path(env["CVSERVE_DEMO_DIR"]).expanduser() / "models.yaml"
    return cvserve_home(env, package_file) / "demo_repository" / "models.yaml"
