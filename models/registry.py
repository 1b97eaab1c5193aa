"""Build models from specs: ``MODEL_REGISTRY`` maps a task to a builder."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

from models.base import VisionModel
from models.repository import ModelSpec
from models.types import Task

__all__ = ["MODEL_REGISTRY", "build_model", "build_models", "register_builder"]

ModelBuilder = Callable[[ModelSpec], VisionModel]
MODEL_REGISTRY: dict[Task, ModelBuilder] = {}


def register_builder(task: Task) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering the builder for ``task``; registering a task twice raises."""

    def deco(fn: ModelBuilder) -> ModelBuilder:
        if task in MODEL_REGISTRY:
            raise KeyError(f"a model builder for task {task.value!r} is already registered")
        MODEL_REGISTRY[task] = fn
        return fn

    return deco


def _ensure_builtin_builders() -> None:
    # Imported lazily: they pull in torch and detectron2.
    import models.detectron
    import models.semseg  # noqa: F401


def _import_handler(spec: ModelSpec) -> ModelBuilder:
    module_name, _, attr = spec.handler.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as e:
        raise KeyError(f"model {spec.name!r}: cannot import handler {spec.handler!r}: {e}") from None


def build_model(spec: ModelSpec) -> VisionModel:
    """Construct (not load) the model a spec describes.

    Raises:
        KeyError: no builder handles the spec's task, or its handler cannot be imported.
    """
    if spec.handler:
        return _import_handler(spec)(spec)
    _ensure_builtin_builders()
    try:
        builder = MODEL_REGISTRY[spec.task]
    except KeyError:
        raise KeyError(f"model {spec.name!r}: no builder for task {spec.task.value!r}") from None
    return builder(spec)


def build_models(specs: Iterable[ModelSpec]) -> dict[str, VisionModel]:
    """Construct every model of a repository; a duplicate name raises ``ValueError``."""
    built: dict[str, VisionModel] = {}
    for spec in specs:
        if spec.name in built:
            raise ValueError(f"duplicate model name {spec.name!r}")
        built[spec.name] = build_model(spec)
    return built
