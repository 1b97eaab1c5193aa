"""RoIAlign's input: each feature map converted once per forward, into the layout the pooling reads.

torchvision's CPU ``roi_align`` reads NCHW fp32; the served backbone leaves channels-last
maps, bf16 under autocast. :class:`~cvserve.models.instance.roi_align.Fp32ROIAlign` gets its
input from :func:`pooling_input`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

# isort: split

import torch

__all__ = ["HALF", "pooling_input", "shared_pooling_inputs"]

_shared = threading.local()
HALF = (torch.float16, torch.bfloat16)  # the autocast dtypes, converted to fp32 for pooling


@contextlib.contextmanager
def shared_pooling_inputs() -> Iterator[None]:
    """Within the block, each feature map is converted for pooling once, not once per head.

    torchvision's CPU ``roi_align`` reads NCHW fp32 and converts anything else (a
    channels-last map, bf16 under autocast) at every call. Mask R-CNN's box and mask heads (a
    cascade's every stage) pool the same maps, so
    :class:`~cvserve.models.instance.roi_align.Fp32ROIAlign` keeps each map's
    fp32 NCHW copy for the rest of the block on this thread. The copies are freed when the
    block ends. The adapters wrap each forward in it; the values are the same.
    """
    previous = getattr(_shared, "maps", None)
    _shared.maps = {}
    try:
        yield
    finally:
        _shared.maps = previous


def pooling_input(input: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """``input`` in ``layout``, fp32 if it was fp16 or bf16; inside a :func:`shared_pooling_inputs`
    block, the copy made for an earlier call on the same map.

    A map is recognised by identity (the block holds it, so its ``id`` stays unique). The heads
    only read the backbone's maps, and tensors made under ``torch.inference_mode`` carry no
    version counter to check, so a map changed in place inside the block would not be seen.
    """
    half = input.dtype in HALF
    if not half and (input.is_contiguous(memory_format=layout) or input.device.type != "cpu"):
        return input
    maps: dict[tuple[int, torch.memory_format], tuple[torch.Tensor, torch.Tensor]] | None
    maps = getattr(_shared, "maps", None)
    hit = maps.get((id(input), layout)) if maps is not None else None
    if hit is not None and hit[0] is input:
        return hit[1]
    out = _convert(input, torch.float32 if half else input.dtype, layout)
    if maps is not None:
        maps[(id(input), layout)] = (input, out)
    return out


# Above this many elements, NHWC -> NCHW is copied in blocks of pixel rows (see _convert).
_BLOCKED_MIN = 1 << 22
_BLOCK = 1 << 19  # elements per block: a few hundred KiB, within a core's L2 cache


def _convert(input: torch.Tensor, dtype: torch.dtype, layout: torch.memory_format) -> torch.Tensor:
    """``input.to(dtype, memory_format=layout)``, equal to it element for element.

    One copy does both conversions (a cast, then torchvision's ``.contiguous()``, would be
    two). A large channels-last map going to NCHW is copied in blocks of pixel rows: torch's
    one-pass transposing copy strides across the whole map and took about twice as long on
    an R50-FPN stride-4 map (256 x 200 x 304; benchmarks/README.md, "RoIAlign's input copied
    in blocks").
    """
    if (
        layout != torch.contiguous_format
        or input.dim() != 4
        or input.numel() < _BLOCKED_MIN
        or not input.is_contiguous(memory_format=torch.channels_last)
    ):
        return input.to(dtype, memory_format=layout)
    n, channels, height, width = input.shape
    out = torch.empty((n, channels, height, width), dtype=dtype, device=input.device)
    pixels = input.permute(0, 2, 3, 1).reshape(n, height * width, channels)  # a view: NHWC
    planes = out.view(n, channels, height * width)
    rows = max(1, _BLOCK // channels)
    for image in range(n):
        for start in range(0, height * width, rows):
            planes[image, :, start : start + rows].copy_(pixels[image, start : start + rows].t())
    return out
