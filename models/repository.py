"""Model repository files: a YAML list of model specs.

Example ``models.yaml``::

    models:
      - name: shapes-maskrcnn
        task: instance
        config: instance/config.yaml      # model-zoo name, YAML file or LazyConfig .py
        weights: instance/model_final.pth # .pth, model-zoo .pkl, or detectron2:// URL
        device: auto                      # auto | cpu | cuda | cuda:N
        # devices: [cuda:0, cuda:1]       # instead of device: a copy of the model on each GPU
        precision: auto                   # auto | fp32 | fp16 | bf16 (see cvserve.models.precision)
        max_batch_size: 4                 # or auto: measured at load time on the device
        max_wait_ms: 5
        instances: auto                   # forward passes at once; auto: 1 on a GPU, 1 per core on a CPU
        max_queue: 64

Model versions follow Triton's repository: ``weights`` may name a directory of numbered
version folders (``detector/1/model_final.pth``, ``detector/2/model_final.pth``), and
``version_policy`` picks which of them are served, as Triton's ``version_policy`` does::

      - name: detector
        task: instance
        config: detector/config.yaml
        weights: detector/                  # numbered version folders, one checkpoint each
        version_policy: {latest: 2}         # or {specific: [1, 3]}, or all; default {latest: 1}

A single checkpoint is one version: ``version`` (default 1). Versions are positive integers.

Relative paths resolve against the directory of the YAML file. Every error names the
file and the field that is wrong.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cvserve.models.device import DEVICE_HELP, is_device
from cvserve.models.errors import RepositoryError
from cvserve.models.types import Task
from cvserve.models.versions import served_versions

__all__ = [
    "AUTO_BATCH_LIMIT",
    "ModelSpec",
    "RepositoryError",
    "load_repository",
    "parse_spec",
]

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
    "devices",
    "precision",
    "max_batch_size",
    "max_wait_ms",
    "max_queue",
    "options",
    "handler",
    "instances",
    "version_policy",
}


@dataclass(frozen=True)
class ModelSpec:
    """How to build and serve one model.

    Attributes:
        name: unique name clients use.
        task: what it predicts.
        config: detectron2 config: model-zoo name, YAML path or LazyConfig ``.py`` path.
        weights: checkpoint path (``.pth``/``.pkl``) or ``detectron2://`` URL; empty for none.
        version: the version reported to clients (a positive integer, as text); for a
            versioned entry, the newest version its policy serves.
        device: ``auto`` picks ``cuda`` when available, else ``cpu``; with ``devices``, the first.
        devices: GPUs (``cuda:N``) that each hold a copy of the model, ``instances`` batches
            at once on each (Triton's ``instance_group`` with ``gpus``); empty: ``device`` alone.
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
        versions: for an entry whose ``weights`` is a directory of version folders, the
            versions its ``version_policy`` serves, oldest first, each with its checkpoint;
            empty for a single-checkpoint entry (one version, ``version``).
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
    devices: tuple[str, ...] = ()
    versions: Mapping[str, str] = field(default_factory=dict)

    def version_specs(self) -> list[ModelSpec]:
        """One spec per served version (oldest first), each with its own checkpoint."""
        if not self.versions:
            return [self]
        return [
            dataclasses.replace(self, version=v, weights=w, versions={}) for v, w in self.versions.items()
        ]


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
    batching = "auto" if raw.get("max_batch_size") == "auto" else "fixed"
    if batching == "auto":
        raw = {**raw, "max_batch_size": AUTO_BATCH_LIMIT}
    devices = _parse_devices(raw, where)
    weights = raw.get("weights", "") or ""
    if not isinstance(weights, str):
        raise RepositoryError(f"{where}.weights: must be a string path or URL")
    weights = _resolve(weights, base)
    version, versions = served_versions(raw, where, weights)
    return ModelSpec(
        name=_name(raw, where),
        task=_task(raw, where),
        config=_resolve(_required_string(raw, where, "config"), base),
        weights=versions[version] if versions else weights,
        version=version,
        device=_device(raw, where, devices),
        precision=_choice(raw, where, "precision", PRECISIONS),
        max_batch_size=_number(raw, where, "max_batch_size", 1, integer=True),
        max_wait_ms=float(_number(raw, where, "max_wait_ms", 0.0, integer=False, allow_zero=True)),
        max_queue=_number(raw, where, "max_queue", 64, integer=True),
        options=_options(raw, where),
        handler=_handler(raw, where),
        batching=batching,
        instances=_instances(raw, where),
        devices=devices,
        versions=versions,
    )


def _required_string(raw: Mapping[str, Any], where: str, key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RepositoryError(f"{where}.{key}: required, must be a non-empty string")
    return value.strip()


def _number(
    raw: Mapping[str, Any], where: str, key: str, default: float, integer: bool, allow_zero: bool = False
) -> Any:
    value = raw.get(key, default)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value < 0 or (value == 0 and not allow_zero):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        auto = " or auto" if key == "max_batch_size" else ""
        raise RepositoryError(f"{where}.{key}: must be a {kind} {bound}{auto}, got {value!r}")
    return value


def _choice(raw: Mapping[str, Any], where: str, key: str, choices: tuple[str, ...]) -> str:
    value = str(raw.get(key, choices[0]))
    if value not in choices:
        raise RepositoryError(f"{where}.{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _name(raw: Mapping[str, Any], where: str) -> str:
    name = _required_string(raw, where, "name")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise RepositoryError(
            f"{where}.name: may contain only letters, digits, '-', '_' and '.', got {name!r}"
        )
    return name


def _task(raw: Mapping[str, Any], where: str) -> Task:
    try:
        return Task(str(raw.get("task")))
    except ValueError:
        raise RepositoryError(
            f"{where}.task: must be one of {', '.join(t.value for t in Task)}, got {raw.get('task')!r}"
        ) from None


def _device(raw: Mapping[str, Any], where: str, devices: tuple[str, ...]) -> str:
    device = devices[0] if devices else str(raw.get("device", "auto"))
    if not is_device(device):
        raise RepositoryError(f"{where}.device: must be {DEVICE_HELP}, got {device!r}")
    return device


def _options(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    options = raw.get("options", {}) or {}
    if not isinstance(options, dict):
        raise RepositoryError(f"{where}.options: must be a mapping")
    return dict(options)


def _handler(raw: Mapping[str, Any], where: str) -> str:
    handler = raw.get("handler", "") or ""
    if not isinstance(handler, str) or (handler and ":" not in handler):
        raise RepositoryError(f"{where}.handler: must look like 'package.module:callable', got {handler!r}")
    return handler


def _instances(raw: Mapping[str, Any], where: str) -> int | str:
    instances = raw.get("instances", 1)
    if instances != "auto" and (
        isinstance(instances, bool) or not isinstance(instances, int) or instances < 1
    ):
        raise RepositoryError(f"{where}.instances: must be an integer > 0 or auto, got {instances!r}")
    return instances  # type: ignore[no-any-return]


def _parse_devices(raw: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """The ``devices`` list of an entry: distinct ``cuda:N`` strings; empty when absent."""
    if "devices" not in raw:
        return ()
    if "device" in raw:
        raise RepositoryError(f"{where}: give device or devices, not both")
    value = raw["devices"]
    if not isinstance(value, list) or not value:
        raise RepositoryError(
            f"{where}.devices: must be a non-empty list such as [cuda:0, cuda:1], got {value!r}"
        )
    devices = tuple(str(d) for d in value)
    for d in devices:
        if not (is_device(d) and d.startswith("cuda:")):
            raise RepositoryError(f"{where}.devices: each entry must be cuda:N, got {d!r}")
    if len(set(devices)) != len(devices):
        raise RepositoryError(f"{where}.devices: {', '.join(devices)} names a GPU twice")
    return devices


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
