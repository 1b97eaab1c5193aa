"""``MODEL_REGISTRY``: a task's builder, registered by the adapter that implements it.

A leaf module: it imports none of its plugins. Adapters register themselves with
:func:`register_builder` when imported; :mod:`cvserve.models.build` imports the built-in
ones lazily.
"""

from __future__ import annotations

from collections.abc import Callable

from cvserve.models.base import VisionModel
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Task

__all__ = ["MODEL_REGISTRY", "ModelBuilder", "lookup", "register_builder"]

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


def lookup(task: Task) -> ModelBuilder | None:
    """The builder registered for ``task``, or None."""
    return MODEL_REGISTRY.get(task)
