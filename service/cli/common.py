"""What every command shares: the user-facing error and the repository lookup."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cvserve.models.repository import ModelSpec

__all__ = ["CLIError", "model_spec"]


class CLIError(Exception):
    """A user-facing command-line error: printed as ``cvserve: error: <message>``, exit code 2."""


def model_spec(repository: str, name: str) -> ModelSpec:
    """The spec of model ``name`` in a model repository YAML.

    Raises:
        CLIError: the file is invalid or has no model ``name``.
    """
    from cvserve.models.repository import RepositoryError, load_repository

    try:
        specs = {s.name: s for s in load_repository(repository)}
    except RepositoryError as e:
        raise CLIError(str(e)) from None
    if name not in specs:
        raise CLIError(f"{repository}: no model named {name!r} (available: {', '.join(sorted(specs))})")
    return specs[name]
