"""Initialise the segmenter's encoder from a detection checkpoint (transfer learning).

Reads our ``.pth`` checkpoints, detectron2 state dicts, detectron2 model-zoo ``.pkl``
files (``backbone.bottom_up.res2...`` names, numpy arrays) and original Caffe2
Detectron ``.pkl`` files (``res2_0_branch2a_w`` names, converted with detectron2's
``convert_c2_detectron_names``). Names are matched after removing the ``backbone.``
and ``bottom_up.`` prefixes, so an FPN detector's ResNet loads into a plain-ResNet
encoder and vice versa; checkpoints that ask for ``matching_heuristics`` additionally
get detectron2's suffix matching for whatever is left. Every key that did not load is
reported, both ways.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# isort: split

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts, convert_c2_detectron_names
from torch import nn

__all__ = ["TransferReport", "load_encoder_from_detection", "read_checkpoint"]

logger = logging.getLogger(__name__)

_PREFIXES = ("backbone.", "bottom_up.")
# BatchNorm's step counter is not a weight; FrozenBatchNorm checkpoints (the model zoo) lack it.
_COUNTERS = ("num_batches_tracked",)


@dataclass(frozen=True)
class TransferReport:
    """What :func:`load_encoder_from_detection` loaded and what it could not.

    Attributes:
        checkpoint: the file read.
        loaded: encoder keys initialised, mapped to the checkpoint key they came from.
        unused_checkpoint_keys: checkpoint keys that initialised nothing (e.g. ``roi_heads.*``).
        uninitialized_encoder_keys: encoder keys the checkpoint had nothing for.
        shape_mismatches: ``encoder key -> (checkpoint shape, encoder shape)``, not loaded.
    """

    checkpoint: str
    loaded: dict[str, str]
    unused_checkpoint_keys: tuple[str, ...]
    uninitialized_encoder_keys: tuple[str, ...]
    shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """True when every encoder key was initialised."""
        return not self.uninitialized_encoder_keys and not self.shape_mismatches

    def summary(self) -> str:
        total = len(self.loaded) + len(self.uninitialized_encoder_keys) + len(self.shape_mismatches)
        return (
            f"{self.checkpoint}: loaded {len(self.loaded)}/{total} encoder tensors; "
            f"{len(self.uninitialized_encoder_keys)} encoder keys not initialised, "
            f"{len(self.shape_mismatches)} shape mismatches, "
            f"{len(self.unused_checkpoint_keys)} checkpoint keys unused"
        )


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint into detectron2's checkpoint layout: ``{"model": state_dict, ...}``.

    Caffe2 ``.pkl`` files come back as ``{"model": ..., "__author__": "Caffe2",
    "matching_heuristics": True}``, as detectron2's ``DetectionCheckpointer`` reads them.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        if path.suffix == ".pkl":
            with path.open("rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a checkpoint (a {type(data).__name__}, expected a mapping)")
    if "model" in data and isinstance(data["model"], dict):
        return data
    if path.suffix == ".pkl":
        blobs = data.get("blobs", data)
        weights = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
    return {"model": data}


def _as_tensors(weights: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in weights.items():
        if isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(v)
        elif isinstance(v, torch.Tensor):
            out[k] = v
    return out  # non-array entries (e.g. Caffe2 "lr" scalars) are not weights


def _canonical(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _match(
    encoder_sd: dict[str, torch.Tensor], ckpt: dict[str, torch.Tensor], heuristics: bool
) -> dict[str, str]:
    """Map encoder keys to checkpoint keys: exact after prefix removal, then suffix heuristics."""
    by_canonical = {_canonical(k): k for k in ckpt}
    matched = {k: by_canonical[_canonical(k)] for k in encoder_sd if _canonical(k) in by_canonical}
    if heuristics:
        rest_model = {k: v for k, v in encoder_sd.items() if k not in matched}
        used = set(matched.values())
        rest_ckpt = {k: v for k, v in ckpt.items() if k not in used}
        if rest_model and rest_ckpt:
            # detectron2 returns model keys for matches; identify their source by tensor identity.
            ident = {id(v): k for k, v in rest_ckpt.items()}
            aligned = align_and_update_state_dicts(rest_model, rest_ckpt, c2_conversion=False)
            for k, v in aligned.items():
                if k in rest_model and id(v) in ident:
                    matched[k] = ident[id(v)]
    return matched


def load_encoder_from_detection(model: nn.Module, checkpoint_path: str | os.PathLike[str]) -> TransferReport:
    """Initialise ``model.backbone`` from the backbone of a detection checkpoint.

    Args:
        model: a segmenter (anything with a ``backbone`` module).
        checkpoint_path: a detectron2 ``.pth``/``.pkl`` detection checkpoint.

    Returns:
        What loaded and every key that did not, both ways; a summary is logged.

    Raises:
        FileNotFoundError, ValueError: the checkpoint cannot be read, or nothing in it
            matches the encoder (the wrong file, most likely).
    """
    data = read_checkpoint(checkpoint_path)
    ckpt = _as_tensors(data["model"])
    if data.get("__author__") == "Caffe2":
        ckpt, _ = convert_c2_detectron_names(ckpt)
    encoder: nn.Module = model.backbone  # type: ignore[assignment]
    encoder_sd = encoder.state_dict()
    matched = _match(encoder_sd, ckpt, bool(data.get("matching_heuristics")))

    loadable: dict[str, torch.Tensor] = {}
    mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for model_key, ckpt_key in matched.items():
        value, target = ckpt[ckpt_key], encoder_sd[model_key]
        if tuple(value.shape) != tuple(target.shape):
            mismatches[model_key] = (tuple(value.shape), tuple(target.shape))
            continue
        # fp16 checkpoints load into an fp32 model: cast to the model's dtype.
        loadable[model_key] = value.to(target.dtype)
    if not loadable:
        raise ValueError(
            f"{checkpoint_path}: no tensor matches the segmenter's encoder; not a compatible detection checkpoint"
        )
    encoder.load_state_dict(loadable, strict=False)

    used = {matched[k] for k in loadable}
    report = TransferReport(
        checkpoint=str(checkpoint_path),
        loaded={k: matched[k] for k in sorted(loadable)},
        unused_checkpoint_keys=tuple(sorted(k for k in ckpt if k not in used)),
        uninitialized_encoder_keys=tuple(
            sorted(k for k in encoder_sd if k not in matched and not k.endswith(_COUNTERS))
        ),
        shape_mismatches=mismatches,
    )
    _log_report(report)
    return report


def _abbreviate(keys: tuple[str, ...], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _log_report(report: TransferReport) -> None:
    logger.info("encoder transfer: %s", report.summary())
    if report.uninitialized_encoder_keys:
        logger.warning("encoder keys not initialised: %s", _abbreviate(report.uninitialized_encoder_keys))
    for key, (src, dst) in report.shape_mismatches.items():
        logger.warning("shape mismatch for %s: checkpoint %s, encoder %s (not loaded)", key, src, dst)
    if report.unused_checkpoint_keys:
        logger.info("checkpoint keys not used by the encoder: %s", _abbreviate(report.unused_checkpoint_keys))
