"""Model repository files: a YAML list of model specs.

Example ``models.yaml``::

    models:
      - name: shapes-maskrcnn
        task: instance
        config: instance/config.yaml      # model-zoo name, YAML file or LazyConfig .py
        weights: instance/model_final.pth # .pth, model-zoo .pkl, or detectron2:// URL
        device: auto                      # auto | cpu | cuda | cuda:N
        precision: auto                   # auto | fp32 | fp16 | bf16 (see cvserve.models.precision)
        max_batch_size: 4                 # or auto: measured at load time on the device
        max_wait_ms: 5
        instances: auto                   # forward passes at once; auto: 1 on a GPU, 1 per core on a CPU
        max_queue: 64

Relative paths resolve against the directory of the YAML file. Every error names the
file and the field that is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvserve.models.types import Task

__all__ = [
    "AUTO_BATCH_LIMIT",
    "ModelSpec",
    "RepositoryError",
    "default_repository_path",
    "load_repository",
    "parse_spec",
]

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # see cvserve.models.precision
# ``max_batch_size: auto`` tries batch sizes up to this many images.
AUTO_BATCH_LIMIT = 8
_KNOWN_FIELDS = {
    "name",
    "task",
    "config",
    "weights",
    "version",
    "device",
    "precision",
    "max_batch_size",
    "max_wait_ms",
    "max_queue",
    "options",
    "handler",
    "instances",
}


class RepositoryError(ValueError):
    """A model repository file is missing, unreadable or has an invalid field."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build and serve one model.

    Attributes:
        name: unique name clients use.
        task: what it predicts.
        config: detectron2 config: model-zoo name, YAML path or LazyConfig ``.py`` path.
        weights: checkpoint path (``.pth``/``.pkl``) or ``detectron2://`` URL; empty for none.
        version: version string reported to clients.
        device: ``auto`` picks ``cuda`` when available, else ``cpu``.
        precision: ``auto`` (fp16 on CUDA, bf16 on a CPU with native bf16 unless the
            checkpoint records a larger loss than :data:`cvserve.models.precision.MAX_BF16_LOSS`,
            else fp32), ``fp32``, ``fp16`` (CUDA autocast; fp32 on a CPU) or ``bf16``
            (autocast on CUDA and CPU); see :mod:`cvserve.models.precision`.
        max_batch_size: most images in one forward pass (with ``batching: auto``, the
            largest size the server tries at load time before it picks one).
        max_wait_ms: longest a request waits for a batch to fill.
        max_queue: most requests waiting; more are refused.
        options: model-specific settings (e.g. ``score_threshold``, ``min_size_test``).
        handler: optional ``"package.module:callable"`` building a custom
            :class:`~cvserve.models.base.VisionModel` from this spec (like a TorchServe custom
            handler); empty to use the built-in builder for ``task``.
        batching: ``fixed`` (use ``max_batch_size``) or ``auto`` (the file said
            ``max_batch_size: auto``: the server measures which size is fastest per image).
        instances: how many batches the server runs through the model at once (Triton's
            instance count; the weights are shared), or ``auto``: 1 on a GPU, one per
            CPU core (up to 4) on a CPU, where the passes share the cores' threads
            (see :mod:`cvserve.models.threads`).
    """

    name: str
    task: Task
    config: str
    weights: str = ""
    version: str = "1"
    device: str = "auto"
    precision: str = "auto"
    max_batch_size: int = 1
    max_wait_ms: float = 0.0
    max_queue: int = 64
    options: Mapping[str, Any] = field(default_factory=dict)
    handler: str = ""
    batching: str = "fixed"
    instances: int | str = 1


def _resolve(value: str, base: Path) -> str:
    """Resolve a repository-relative path; model-zoo names and URLs are kept as they are."""
    if not value or "://" in value:
        return value
    candidate = base / value
    if candidate.exists() or value.startswith((".", "/")) or Path(value).suffix in (".pth", ".pkl", ".pt"):
        return str(candidate.resolve()) if not Path(value).is_absolute() else value
    return value  # e.g. "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml" from the model zoo


def parse_spec(raw: Any, where: str, base: Path) -> ModelSpec:
    """Validate one entry of a repository file.

    Args:
        raw: the mapping read from YAML.
        where: how to name this entry in errors, e.g. ``models.yaml: models[1]``.
        base: directory relative paths resolve against.

    Raises:
        RepositoryError: naming the entry and field when anything is invalid.
    """
    if not isinstance(raw, dict):
        raise RepositoryError(f"{where}: must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KNOWN_FIELDS)
    if unknown:
        raise RepositoryError(f"{where}: unknown field(s) {', '.join(unknown)}")

    def req_str(key: str) -> str:
        value = raw.get(key)
        if not isinstance(value, str) or not value.strip():
            raise RepositoryError(f"{where}.{key}: required, must be a non-empty string")
        return value.strip()

    def pos_number(key: str, default: float, integer: bool, allow_zero: bool = False) -> Any:
        value = raw.get(key, default)
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or value < 0 or (value == 0 and not allow_zero):
            kind = "integer" if integer else "number"
            bound = ">= 0" if allow_zero else "> 0"
            auto = " or auto" if key == "max_batch_size" else ""
            raise RepositoryError(f"{where}.{key}: must be a {kind} {bound}{auto}, got {value!r}")
        return value

    name = req_str("name")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise RepositoryError(
            f"{where}.name: may contain only letters, digits, '-', '_' and '.', got {name!r}"
        )
    try:
        task = Task(str(raw.get("task")))
    except ValueError:
        raise RepositoryError(
            f"{where}.task: must be one of {', '.join(t.value for t in Task)}, got {raw.get('task')!r}"
        ) from None
    device = str(raw.get("device", "auto"))
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise RepositoryError(f"{where}.device: must be {DEVICES_HELP}, got {device!r}")
    precision = str(raw.get("precision", "auto"))
    if precision not in PRECISIONS:
        raise RepositoryError(f"{where}.precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    options = raw.get("options", {}) or {}
    if not isinstance(options, dict):
        raise RepositoryError(f"{where}.options: must be a mapping")
    handler = raw.get("handler", "") or ""
    if not isinstance(handler, str) or (handler and ":" not in handler):
        raise RepositoryError(f"{where}.handler: must look like 'package.module:callable', got {handler!r}")
    batching = "auto" if raw.get("max_batch_size") == "auto" else "fixed"
    if batching == "auto":
        raw = {**raw, "max_batch_size": AUTO_BATCH_LIMIT}
    instances = raw.get("instances", 1)
    if instances != "auto" and (
        isinstance(instances, bool) or not isinstance(instances, int) or instances < 1
    ):
        raise RepositoryError(f"{where}.instances: must be an integer > 0 or auto, got {instances!r}")
    weights = raw.get("weights", "") or ""
    if not isinstance(weights, str):
        raise RepositoryError(f"{where}.weights: must be a string path or URL")
    return ModelSpec(
        name=name,
        task=task,
        config=_resolve(req_str("config"), base),
        weights=_resolve(weights, base),
        version=str(raw.get("version", "1")),
        device=device,
        precision=precision,
        max_batch_size=pos_number("max_batch_size", 1, integer=True),
        max_wait_ms=float(pos_number("max_wait_ms", 0.0, integer=False, allow_zero=True)),
        max_queue=pos_number("max_queue", 64, integer=True),
        options=dict(options),
        handler=handler,
        batching=batching,
        instances=instances,
    )


def load_repository(path: str | os.PathLike[str]) -> list[ModelSpec]:
    """Read and validate a repository YAML file.

    Raises:
        RepositoryError: the file is missing or unreadable, or an entry is invalid; the
            message names the file and field. Duplicate model names are an error.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RepositoryError(f"{path}: cannot read model repository: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RepositoryError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), list) or not data["models"]:
        raise RepositoryError(f"{path}: must contain a non-empty list 'models'")
    specs: list[ModelSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(data["models"]):
        spec = parse_spec(raw, f"{path}: models[{i}]", path.parent)
        if spec.name in seen:
            raise RepositoryError(f"{path}: models[{i}].name: duplicate model name {spec.name!r}")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def default_repository_path() -> Path:
    """The demo repository's ``models.yaml``: ``$CVSERVE_DEMO_DIR`` or ``<checkout>/demo_repository``."""
    root = os.environ.get("CVSERVE_DEMO_DIR")
    base = Path(root) if root else Path(__file__).resolve().parents[1] / "demo_repository"
    return base / "models.yaml"
