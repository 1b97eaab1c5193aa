"""Model versions as Triton's repository has them: numbered folders and a version policy.

An entry whose ``weights`` is a directory of numbered version folders
(``detector/1/model_final.pth``, ``detector/2/...``) serves the versions its
``version_policy`` picks: ``{latest: N}`` (default ``{latest: 1}``), ``{specific: [1, 3]}``
or ``all``. A single checkpoint is one version, ``version`` (default 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cvserve.models.errors import RepositoryError

__all__ = ["CHECKPOINT_SUFFIXES", "DEFAULT_CHECKPOINT", "apply_policy", "positive_int", "served_versions"]

CHECKPOINT_SUFFIXES = (".pth", ".pkl", ".pt")
# The checkpoint a version folder holds when it has several files (detectron2's trainer name).
DEFAULT_CHECKPOINT = "model_final.pth"


def positive_int(value: Any) -> int | None:
    """``value`` as a positive integer (``3`` or ``"3"``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and value > 0 else None


def served_versions(raw: dict[str, Any], where: str, weights: str) -> tuple[str, dict[str, str]]:
    """The served version and, for a directory of version folders, each served version's checkpoint."""
    policy = raw.get("version_policy")
    if not (weights and Path(weights).is_dir()):
        if policy is not None:
            raise RepositoryError(
                f"{where}.version_policy: needs weights to be a directory of numbered version folders"
            )
        version = positive_int(raw.get("version", 1))
        if version is None:
            raise RepositoryError(f"{where}.version: must be a positive integer, got {raw.get('version')!r}")
        return str(version), {}
    if "version" in raw:
        raise RepositoryError(
            f"{where}.version: not allowed when weights is a directory of version folders "
            "(the folders' numbers are the versions; choose them with version_policy)"
        )
    found = sorted(int(p.name) for p in Path(weights).iterdir() if p.is_dir() and positive_int(p.name))
    if not found:
        raise RepositoryError(
            f"{where}.weights: directory {weights} has no numbered version folders (1/, 2/ ...)"
        )
    served = apply_policy(policy, found, f"{where}.version_policy")
    versions = {str(v): version_checkpoint(Path(weights) / str(v), f"{where}.weights") for v in served}
    return str(served[-1]), versions


def apply_policy(policy: Any, found: list[int], where: str) -> list[int]:
    """The versions of ``found`` (ascending) that Triton's ``version_policy`` ``policy`` serves."""
    usage = "must be {latest: N}, {specific: [versions]} or all"
    if policy is None:
        return found[-1:]
    if policy == "all" or policy == {"all": {}} or policy == {"all": None}:
        return found
    if not isinstance(policy, dict) or len(policy) != 1:
        raise RepositoryError(f"{where}: {usage}, got {policy!r}")
    ((kind, value),) = policy.items()
    if kind == "latest":
        count = positive_int(value)
        if count is None:
            raise RepositoryError(f"{where}.latest: must be a positive integer, got {value!r}")
        return found[-count:]
    if kind == "specific":
        listed = [positive_int(v) for v in value] if isinstance(value, list) and value else [None]
        wanted = {v for v in listed if v is not None}
        if len(wanted) != len(set(listed)):
            raise RepositoryError(f"{where}.specific: must be a non-empty list of positive integers")
        missing = sorted(wanted - set(found))
        if missing:
            raise RepositoryError(f"{where}.specific: no version folder for {missing}; found {found}")
        return sorted(wanted)
    raise RepositoryError(f"{where}: {usage}, got {policy!r}")


def version_checkpoint(folder: Path, where: str) -> str:
    """The checkpoint a version folder holds: ``model_final.pth``, or its only checkpoint file."""
    if (folder / DEFAULT_CHECKPOINT).is_file():
        return str(folder / DEFAULT_CHECKPOINT)
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if len(found) != 1:
        what = "no checkpoint" if not found else f"{len(found)} checkpoints"
        raise RepositoryError(
            f"{where}: version folder {folder} holds {what}; it needs {DEFAULT_CHECKPOINT} or exactly one "
            f"file ending {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    return str(found[0])
