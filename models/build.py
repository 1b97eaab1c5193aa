"""``build_model(spec)``: construct the model a repository entry describes.

The one place that loads detectron2 for serving: it applies the compatibility layer
(:mod:`cvserve.models.compat`) and imports the built-in adapters lazily, so importing
this module costs nothing and changes nothing.
"""

from __future__ import annotations

import importlib

from cvserve.models import compat
from cvserve.models.base import VisionModel
from cvserve.models.registry import ModelBuilder, lookup
from cvserve.models.repository import ModelSpec

__all__ = ["build_model"]

# Adapters that register a builder when imported (they pull in torch and detectron2).
_BUILTIN_ADAPTERS = ("cvserve.models.instance.adapter", "cvserve.models.semseg.adapter")


def _import_builtin_adapters() -> None:
    compat.apply()
    for name in _BUILTIN_ADAPTERS:
        importlib.import_module(name)


def _import_handler(spec: ModelSpec) -> ModelBuilder:
    module_name, _, attr = spec.handler.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as e:
        raise KeyError(f"model {spec.name!r}: cannot import handler {spec.handler!r}: {e}") from None


def build_model(spec: ModelSpec) -> VisionModel:
    """Construct (not load) the model a spec describes.

    Args:
        spec: a repository entry; ``spec.handler`` ("module:callable") overrides the
            registry's builder for the spec's task.

    Returns:
        The model, not yet loaded (call ``load()``).

    Raises:
        KeyError: no builder handles the spec's task, or its handler cannot be imported.
    """
    compat.apply()
    if spec.handler:
        return _import_handler(spec)(spec)
    _import_builtin_adapters()
    builder = lookup(spec.task)
    if builder is None:
        raise KeyError(f"model {spec.name!r}: no builder for task {spec.task.value!r}")
    return builder(spec)
