"""Out of memory in a forward pass: recognise it, free what the failed batch held, split.

A batch that runs out of memory (host ``MemoryError`` or ``torch.cuda.OutOfMemoryError``)
is retried as two halves, recursively, down to single images; an image that does not fit
alone fails by itself with :class:`~service.errors.ModelOutOfMemoryError`
(``RESOURCE_EXHAUSTED``: a client may retry it later) while the rest of its batch succeeds.

The retry runs *after* the ``except`` block has ended: while it is open, the exception's
traceback keeps every frame of the failed forward pass alive, and with them the batch's
activations, so the halves would run out of memory too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from cvserve.errors import ModelOutOfMemoryError
from cvserve.models.device import is_out_of_memory, release_device_memory

__all__ = ["run_splitting_on_oom"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _attempt(handler: Callable[[list[T]], Sequence[Any]], payloads: list[T]) -> list[Any] | str:
    """The handler's results, or a description of the out-of-memory error it raised.

    Only a string leaves the ``except`` block: the exception, its traceback and the
    frames holding the batch's tensors are released when this function returns.
    """
    try:
        return list(handler(payloads))
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'out of memory'}"


def run_splitting_on_oom(
    handler: Callable[[list[T]], Sequence[Any]], payloads: list[T], name: str
) -> list[Any]:
    """``handler(payloads)``, halving the batch on out-of-memory until the parts fit.

    Returns one result per payload; an image that runs out of memory alone gets a
    :class:`~service.errors.ModelOutOfMemoryError` instance as its result. Any other
    exception from the handler propagates. The result count is not checked here.
    """
    outcome = _attempt(handler, payloads)
    if not isinstance(outcome, str):
        return outcome
    release_device_memory()
    if len(payloads) == 1:
        logger.warning("%s: out of memory on a single image (%s)", name, outcome)
        return [
            ModelOutOfMemoryError(
                f"model {name!r}: out of memory on this image; retry later or send it smaller"
            )
        ]
    half = len(payloads) // 2
    logger.warning(
        "%s: out of memory on a batch of %d (%s), retrying as %d + %d",
        name, len(payloads), outcome, half, len(payloads) - half,
    )  # fmt: skip
    return run_splitting_on_oom(handler, payloads[:half], name) + run_splitting_on_oom(
        handler, payloads[half:], name
    )
