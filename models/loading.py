"""The load steps every adapter shares: weights in, the network made ready to serve, one log line.

An adapter's ``load()`` builds its network from its own kind of config, then calls
:func:`load_weights`, :func:`ready_for_inference` and :func:`log_loaded` in that order.
"""

from __future__ import annotations

import logging
import os
from typing import Any

# isort: split

import torch
from detectron2.checkpoint import DetectionCheckpointer

from cvserve.models.checkpoint import META_KEY
from cvserve.models.fusion import fuse_conv_batch_norm, use_channels_last
from cvserve.models.precision import cpu_bf16, keep_outputs_fp32, store_autocast_weights

__all__ = ["load_weights", "log_loaded", "ready_for_inference"]

logger = logging.getLogger(__name__)


def load_weights(model: torch.nn.Module, name: str, weights: str | None) -> dict[str, Any]:
    """Load a detectron2 checkpoint (a file, or a URL detectron2 resolves) into ``model``.

    Args:
        model: the built network.
        name: the model's name, for messages.
        weights: the checkpoint; empty or None keeps the random initialisation (logged).

    Returns:
        The metadata cvserve stores with its checkpoints (class names, precision figures;
        :mod:`cvserve.models.checkpoint`), or ``{}``.

    Raises:
        FileNotFoundError: ``weights`` is a path and no file is there.
    """
    if not weights:
        logger.warning("%s: no weights given, the network keeps its random initialisation", name)
        return {}
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"model {name!r}: weights file {weights} does not exist")
    extra = DetectionCheckpointer(model).load(weights)
    meta = extra.get(META_KEY) if isinstance(extra, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def ready_for_inference(
    model: torch.nn.Module, precision: str, *, fuse_batch_norm: bool, channels_last: bool
) -> None:
    """Put ``model`` in eval mode and transform it for serving, in place; outputs stay the same.

    In order: scores, box deltas and logits kept fp32 under autocast
    (:func:`~cvserve.models.precision.keep_outputs_fp32`); eval-mode batch norms folded into
    their convolutions and channels-last weights (:mod:`cvserve.models.fusion`), each if
    asked; weights stored in ``precision``'s autocast dtype
    (:func:`~cvserve.models.precision.store_autocast_weights`), which must come last.
    """
    keep_outputs_fp32(model)
    model.eval()
    if fuse_batch_norm:
        fused = fuse_conv_batch_norm(model)
        logger.debug("folded %d batch norms into their convolutions", fused)
    if channels_last:
        use_channels_last(model)  # oneDNN's fastest layout
    store_autocast_weights(model, precision)  # no weight casts per forward


def log_loaded(name: str, what: str, device: str, precision: str, asked: str) -> None:
    """The one line each load logs: what runs where, the precision chosen and why."""
    hardware = "CUDA" if device.startswith("cuda") else f"CPU: {cpu_bf16().describe()}"
    logger.info(
        "%s: loaded %s on %s, precision %s (asked %s; %s)", name, what, device, precision, asked, hardware
    )
