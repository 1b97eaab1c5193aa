"""Writing checkpoints; reading them is detectron2's ``DetectionCheckpointer``'s job.

A checkpoint written here is a plain ``torch.save`` dict that ``DetectionCheckpointer``
loads like any ``.pth``::

    {"model": state_dict, "__cvserve__": {"class_names": [...], "dtype": "float32", ...}}

``__cvserve__`` holds only plain values, so ``torch.load(weights_only=True)`` accepts it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["META_KEY", "read_checkpoint_meta", "save_checkpoint"]

META_KEY = "__cvserve__"


def _half_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters in fp16; buffers (BN running statistics, counters) keep their dtype.

    Running variances of a few 1e-5 and the large values some buffers hold are where
    fp16 loses most, while they are a tiny share of the bytes.
    """
    param_names = {name for name, _ in model.named_parameters()}
    out = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        out[name] = t.half() if name in param_names and t.is_floating_point() else t.clone()
    return out


def save_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    fp16: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights atomically (temporary file, then ``os.replace``).

    Args:
        model: the model; a ``DistributedDataParallel`` wrapper is unwrapped.
        path: target ``.pth`` file; parent directories are created.
        fp16: store floating-point parameters in half precision (half the size);
            buffers such as BatchNorm running statistics stay in their own dtype.
        extra: plain values stored under ``__cvserve__``, e.g. ``class_names``,
            ``iteration``, ``config`` (the detectron2 config as YAML text).

    Returns:
        The path written.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if fp16:
        state = _half_state_dict(model)
    else:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"class_names": [], **dict(extra or {})}
    meta["class_names"] = [str(c) for c in meta["class_names"]]
    meta["dtype"] = "float16" if fp16 else "float32"
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        torch.save({"model": state, META_KEY: meta}, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def read_checkpoint_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``__cvserve__`` entry of a checkpoint, or ``{}`` for checkpoints written elsewhere.

    Raises:
        OSError: the file cannot be read.
    """
    if Path(path).suffix == ".pkl":  # model-zoo pickles carry no cvserve metadata
        return {}
    data = torch.load(path, map_location="cpu", weights_only=True)
    meta = data.get(META_KEY, {}) if isinstance(data, dict) else {}
    return dict(meta)
