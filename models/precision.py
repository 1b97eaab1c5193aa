"""Compute precision: what the hardware runs natively, what a model serves at, one autocast path.

``precision: auto`` (the default of a model repository entry) resolves per device:

* CUDA: ``fp16`` (every CUDA GPU the project supports has fp16 tensor cores or fp16 math);
* a CPU with native bf16 arithmetic (AMX-BF16 or AVX512-BF16, detected, never assumed):
  ``bf16``, unless the model's own record says bf16 costs it more than
  :data:`MAX_BF16_LOSS` points of accuracy (see :func:`resolve_precision`);
* any other CPU: ``fp32`` (bf16 there is emulated and slower than fp32).

Whatever the device, reduced precision runs through :func:`autocast`: one
``torch.autocast(device_type, dtype)`` context, so the CPU tests run the code a GPU runs.
Box coordinates and RoI pooling stay fp32 under it (:mod:`cvserve.models.instance.roi_align`), and so do
the small output layers that produce scores, box deltas and mask logits
(:func:`keep_outputs_fp32`): in bf16 a score has 8 significant bits (0.3027 and 0.3012
are one value), enough to reorder detections, for a share of the compute below 1 %.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cvserve.models.repository import PRECISIONS

__all__ = [
    "BF16_LOSS_KEY",
    "MAX_BF16_LOSS",
    "PRECISIONS",
    "CpuBf16",
    "autocast",
    "autocast_dtype",
    "cpu_bf16",
    "keep_outputs_fp32",
    "resolve_precision",
    "store_autocast_weights",
]

logger = logging.getLogger(__name__)

# ``auto`` serves bf16 only where it costs at most this many points of AP / mIoU.
MAX_BF16_LOSS = 0.3
# Checkpoint metadata key: the measured accuracy loss of bf16 against fp32, in points
# (the largest over the checkpoint's metrics); written by the demo build.
BF16_LOSS_KEY = "bf16_loss"
# /proc/cpuinfo flags of native bf16 arithmetic: AMX tiles, or AVX512 dot products.
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Output layers of detectron2's heads kept fp32 under autocast: box classifier and
# regressor (Fast R-CNN, RetinaNet), RPN objectness and deltas, mask / semantic predictor.
OUTPUT_LAYERS = ("cls_score", "bbox_pred", "objectness_logits", "anchor_deltas", "predictor")


@dataclass(frozen=True)
class CpuBf16:
    """Whether this CPU computes bf16 natively, and how that was found.

    Attributes:
        native: bf16 matrix arithmetic runs in hardware (AMX-BF16 or AVX512-BF16).
        flags: the bf16 CPU flags found (``amx_bf16``, ``avx512_bf16``).
        source: where the answer came from (``/proc/cpuinfo`` or torch's oneDNN check).
    """

    native: bool
    flags: tuple[str, ...]
    source: str

    def describe(self) -> str:
        """One line for logs and ``cvserve info``."""
        if not self.native:
            return f"no native bf16 ({self.source})"
        return f"native bf16: {', '.join(self.flags) or 'yes'} ({self.source})"


def _cpuinfo_flags(path: Path) -> set[str] | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM spelling
            return set(value.split())
    return None


def detect_cpu_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuBf16:
    """Detect native bf16 on this CPU: its flags where the OS lists them, else torch's oneDNN check.

    torch's ``mkldnn._is_mkldnn_bf16_supported`` answers for the CPU the process runs on
    on any OS, but also says yes for plain AVX512 (where bf16 is converted in software and
    slower than fp32), so the flags win where they exist.
    """
    flags = _cpuinfo_flags(cpuinfo)
    if flags is not None:
        found = tuple(f for f in _BF16_FLAGS if f in flags)
        return CpuBf16(bool(found), found, str(cpuinfo))
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    native = bool(check()) if check is not None else False
    return CpuBf16(native, (), "torch oneDNN check")


@functools.cache
def cpu_bf16() -> CpuBf16:
    """:func:`detect_cpu_bf16` for this machine, computed once."""
    return detect_cpu_bf16()


def resolve_precision(precision: str, device: str, meta: Mapping[str, Any] | None = None) -> str:
    """The precision a model runs at on ``device``: ``fp32``, ``fp16`` or ``bf16``.

    Args:
        precision: the repository's setting, one of :data:`PRECISIONS`.
        device: a resolved torch device string (``cpu``, ``cuda:0``).
        meta: the checkpoint's metadata, if any. Under ``auto`` a recorded
            :data:`BF16_LOSS_KEY` above :data:`MAX_BF16_LOSS` keeps the model at fp32 on
            a CPU. Weights without a record (model-zoo weights) get bf16: the rule
            for them is the measured loss of the architectures this project serves (see
            benchmarks/README.md), and ``precision: fp32`` overrides it.

    Explicit ``fp16`` on a CPU runs fp32 (CPU fp16 convolutions are slower than fp32);
    explicit ``bf16`` on a CPU runs bf16 even without native support. Training resolves its
    precision here too, without ``meta`` (the engine adds loss scaling for fp16).

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = device.startswith("cuda")
    if precision == "auto":
        if cuda:
            return "fp16"
        if not cpu_bf16().native:
            return "fp32"
        loss = (meta or {}).get(BF16_LOSS_KEY)
        if isinstance(loss, (int, float)) and loss > MAX_BF16_LOSS:
            return "fp32"
        return "bf16"
    if precision == "fp16" and not cuda:
        return "fp32"
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32."""
    return _DTYPES.get(precision)


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The one mixed-precision context of the project, for CUDA and CPU alike.

    Args:
        device: a torch device string.
        precision: a resolved precision (see :func:`resolve_precision`).
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _fp32_forward(forward: Callable[..., Any], device_type: str, *args: Any) -> Any:
    with torch.autocast(device_type, enabled=False):
        return forward(
            *(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        )


def keep_outputs_fp32(model: nn.Module, names: tuple[str, ...] = OUTPUT_LAYERS) -> int:
    """Run the layers of ``model`` named ``names`` (last name component) in fp32 under autocast.

    Each such module's ``forward`` is wrapped in place (parameters, names and state dict
    unchanged): autocast off, floating-point inputs cast to fp32. Without autocast the
    wrapper changes nothing.

    Returns:
        The number of modules wrapped.
    """
    count = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in names and "forward" not in vars(module):
            device_type = next((p.device.type for p in module.parameters()), "cpu")
            module.forward = functools.partial(_fp32_forward, module.forward, device_type)  # type: ignore[method-assign]
            count += 1
    return count


# Layers whose weights and biases autocast casts to its dtype at every call, on CPU and CUDA.
_AUTOCAST_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


@torch.no_grad()
def store_autocast_weights(model: nn.Module, precision: str) -> int:
    """Store in ``precision``'s autocast dtype the weights autocast casts at every call.

    Under autocast a convolution or linear layer casts its fp32 weight and bias to the
    autocast dtype each time it runs: on the demo detector a few hundred copies per image.
    Stored in that dtype already, they are used as they are. The values are the same ones
    (autocast casts with ``Tensor.to``, round to nearest even), so outputs under autocast
    are bit for bit those of the fp32-stored model. The layers :func:`keep_outputs_fp32`
    keeps fp32 (by name, wrapped or not yet) are left alone. The model must then only run
    under :func:`autocast` of that precision.

    Returns:
        The number of layers changed (0 for fp32).
    """
    dtype = autocast_dtype(precision)
    if dtype is None:
        return 0
    count = 0
    for name, module in model.named_modules():
        kept = "forward" in vars(module) or name.rsplit(".", 1)[-1] in OUTPUT_LAYERS
        if isinstance(module, _AUTOCAST_LAYERS) and not kept:
            for param in module.parameters(recurse=False):
                param.data = param.data.to(dtype)
            count += 1
    return count
