"""RoIAlign's CPU forward read straight from channels-last maps, fp32 or bf16.

torchvision's CPU ``roi_align`` reads NCHW fp32 and loops over one channel's plane at a
time, on one thread. The served backbone leaves channels-last maps (bf16 under autocast),
so every map was first converted and transposed (``pooling_inputs``), then pooled one
scalar at a time. The kernel in ``_roi_align.c`` (a C extension built at install, no torch
headers) computes each output with torchvision's arithmetic, in the same order and in fp32,
but loops over the channels of each sample's four neighbouring pixels, which lie next to
each other in NHWC and vectorise (AVX-512 or AVX2 where the CPU has them, chosen at run
time). bf16 values are widened to fp32 exactly before any arithmetic, so the result equals
``torchvision.ops.roi_align(input.float(), rois.float(), ...)`` bit for bit
(tests/unit/models/instance/test_nhwc_roi_align.py checks it property by property).
:func:`pool_levels` pools every level of a feature pyramid in one call, writing the maps'
dtype or fp32, with the boxes spread over the calling thread's OpenMP team
(:func:`cvserve.models.threads.shares_team`); ``cvserve.models.instance.pooler`` uses it.

Inputs the kernel does not take go to torchvision unchanged: other devices and dtypes,
boxes beyond 2**24 feature pixels or with sample grids too large to allocate, and anything
needing a gradient (the kernel has no backward). A box with a NaN or infinite coordinate,
for which torchvision's kernel has no defined result (its sample count overflows an int),
pools to zeros.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import types
from collections.abc import Iterator, Sequence

# isort: split

import torch
from torchvision.ops import roi_align

from cvserve.models.threads import kernel_threads, shares_team

_kernel: types.ModuleType | None
try:  # built by pip install (pyproject.toml, optional: a C compiler is needed)
    from cvserve.models.instance import _roi_align as _kernel
except ImportError as exc:  # pragma: no cover - exercised only where the build failed
    _kernel = None
    _IMPORT_ERROR: str | None = str(exc)
else:
    _IMPORT_ERROR = None

__all__ = [
    "accepts",
    "describe",
    "log_kernel",
    "one_thread",
    "pool_levels",
    "roi_align_nhwc",
    "torchvision_only",
]

logger = logging.getLogger(__name__)
_logged = False

_off = threading.local()
_DONE, _OUT_OF_LIMITS, _BAD_IMAGE, _BAD_LEVEL = 0, 1, 2, 3  # the kernel's return codes
_MAX_MAPS = 16  # the most levels one kernel call takes (MAX_MAPS in _roi_align.c)


@contextlib.contextmanager
def _flag(name: str) -> Iterator[None]:
    """Set the calling thread's flag ``name`` within the block."""
    previous = getattr(_off, name, False)
    setattr(_off, name, True)
    try:
        yield
    finally:
        setattr(_off, name, previous)


def torchvision_only() -> contextlib.AbstractContextManager[None]:
    """Within the block, on this thread, :func:`accepts` is false: torchvision pools everything.

    For benchmarks and tests that compare the two kernels.
    """
    return _flag("on")


def one_thread() -> contextlib.AbstractContextManager[None]:
    """Within the block, on this thread, the kernel pools on the calling thread alone.

    For benchmarks and tests comparing it with the boxes spread over the pass's team.
    """
    return _flag("one_thread")


def describe() -> str:
    """The CPU RoIAlign in use, for logs and ``cvserve info``."""
    if _kernel is None:
        return f"torchvision (cvserve's NHWC kernel is not built: {_IMPORT_ERROR})"
    shared = "boxes shared over each pass's OpenMP threads" if shares_team(_kernel) else "one thread per call"
    return f"cvserve NHWC kernel ({_kernel.isa()}; {shared})"


def log_kernel() -> None:
    """Log :func:`describe` once per process (the adapters call it when loading a CPU model):
    a warning when the kernel was not built: pooling then took 2.4-10x as long in
    benchmarks/README.md's runs ("RoIAlign in a channels-last C kernel")."""
    global _logged
    if not _logged:
        _logged = True
        logger.log(
            logging.INFO if _kernel is not None else logging.WARNING, "RoIAlign on the CPU: %s", describe()
        )


def accepts(input: torch.Tensor) -> bool:
    """Whether :func:`roi_align_nhwc` runs its own kernel for this feature map."""
    return (
        _kernel is not None
        and not getattr(_off, "on", False)
        and input.device.type == "cpu"
        and input.dtype in (torch.float32, torch.bfloat16)
        and input.dim() == 4
        and not (input.requires_grad and torch.is_grad_enabled())
    )


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def pool_levels(
    maps: Sequence[torch.Tensor],
    rois: torch.Tensor,
    levels: torch.Tensor | None,
    output_size: int | tuple[int, int] | list[int],
    scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Each box pooled from its own level's map, all in one kernel call; None when the
    kernel does not take these inputs (the caller pools them another way).

    Box ``r`` of the result equals ``roi_align(maps[levels[r]].float(), rois[r:r + 1], ...,
    scales[levels[r]], ...).to(dtype)`` bit for bit. The boxes are spread over the calling
    thread's intra-op threads (``torch.get_num_threads()``) where torch runs on libgomp.

    Args:
        maps: (N, C, H_l, W_l) feature maps, one per level (1 to 16), all accepted
            (:func:`accepts`) with the same dtype, N and C; best channels-last (others are
            copied to it). More levels are not the kernel's input.
        rois: (R, 5) boxes: image index, then x0, y0, x1, y1 in input-image pixels.
        levels: (R,) index into ``maps`` of each box; None for all on ``maps[0]``.
        output_size, sampling_ratio, aligned: as :func:`roi_align_nhwc`.
        scales: each map's feature-map pixels per image pixel.
        dtype: of the result: fp32, or the maps' dtype.

    Raises:
        ValueError: ``rois`` is not (R, 5), an image index is outside ``[0, N)``, or a
            level outside the maps.
    """
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape (R, 5), got {tuple(rois.shape)}")
    if not _takes(maps, scales, dtype):
        return None
    assert _kernel is not None
    first = maps[0]
    n_img, channels = int(first.shape[0]), int(first.shape[1])
    size = _pair(output_size)
    out = torch.empty((rois.shape[0], channels, *size), dtype=dtype)
    if rois.shape[0] == 0 or channels == 0:
        return out
    rois = rois.to(torch.float32).contiguous()
    maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
    if levels is not None:
        levels = levels.to(torch.int64).contiguous()
        if levels.shape != (rois.shape[0],):
            raise ValueError(f"levels must have shape ({rois.shape[0]},), got {tuple(levels.shape)}")
    threads = 1 if getattr(_off, "one_thread", False) else kernel_threads(_kernel)
    status = _kernel.pool(
        [
            (m.data_ptr(), int(m.shape[2]), int(m.shape[3]), float(s))
            for m, s in zip(maps, scales, strict=True)
        ],
        first.dtype == torch.bfloat16,
        n_img,
        channels,
        rois.data_ptr(),
        rois.shape[0],
        0 if levels is None else levels.data_ptr(),
        size[0],
        size[1],
        int(sampling_ratio),
        bool(aligned),
        out.data_ptr(),
        dtype == torch.bfloat16,
        threads,
    )
    if status == _DONE:
        return out
    if status == _BAD_IMAGE:
        _bad_images(rois, n_img)
    if status == _BAD_LEVEL:
        assert levels is not None
        raise ValueError(f"levels must lie in [0, {len(maps)}), got {int(levels.min())}..{int(levels.max())}")
    return None  # a box past the kernel's limits (_roi_align.c, check_roi)


def _takes(maps: Sequence[torch.Tensor], scales: Sequence[float], dtype: torch.dtype) -> bool:
    """Whether :func:`pool_levels` runs the kernel on these maps (see its Args)."""
    first = maps[0]
    return (
        len(maps) <= _MAX_MAPS
        and all(accepts(m) for m in maps)
        and all(m.dtype == first.dtype and m.shape[:2] == first.shape[:2] for m in maps)
        and dtype in (torch.float32, first.dtype)
        and len(scales) == len(maps)
        and all(m.shape[2] > 0 and m.shape[3] > 0 for m in maps)
    )


def _bad_images(rois: torch.Tensor, n_img: int) -> None:
    images = rois[:, 0]  # truncated to int by both kernels
    if not bool(((images > -1) & (images < n_img)).all()):
        raise ValueError(
            f"RoI image indices must lie in [0, {n_img}), got {float(images.min()):g}..{float(images.max()):g}"
        )


def roi_align_nhwc(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: int | tuple[int, int] | list[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``torchvision.ops.roi_align(input.float(), rois.float(), ...).to(dtype)``, bit for bit.

    Args:
        input: (N, C, H, W) CPU features, fp32 or bf16, best channels-last (other layouts
            are copied to it first). See :func:`accepts`.
        rois: (R, 5) boxes: image index, then x0, y0, x1, y1 in input-image pixels.
        output_size: bins per RoI, ``(ph, pw)`` or one int for both.
        spatial_scale: feature-map pixels per image pixel.
        sampling_ratio: samples per bin along each axis; 0 for ``ceil(roi size / bins)``.
        aligned: shift the box by -0.5 pixel (detectron2's ``ROIAlignV2``).
        dtype: of the result: fp32 (default) or the input's dtype.

    Returns:
        (R, C, ph, pw) features in ``dtype``.

    Raises:
        ValueError: ``rois`` is not (R, 5), an image index is outside ``[0, N)``, or the map
            has no pixels while there are boxes.
    """
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"rois must have shape (R, 5), got {tuple(rois.shape)}")
    size = _pair(output_size)
    n_img, channels, height, width = input.shape
    rois = rois.to(torch.float32)
    if rois.shape[0] == 0 or channels == 0:
        return input.new_zeros((rois.shape[0], channels, *size), dtype=dtype)
    if height == 0 or width == 0:  # torchvision's CPU kernel would read out of bounds
        raise ValueError(f"cannot pool from an empty feature map of shape {tuple(input.shape)}")
    out = pool_levels([input], rois, None, size, [spatial_scale], sampling_ratio, aligned, dtype)
    if out is not None:
        return out
    _bad_images(rois, n_img)
    # Not this kernel's input, or a box past its limits (_roi_align.c, check_roi).
    return roi_align(input.float(), rois.contiguous(), size, spatial_scale, sampling_ratio, aligned).to(dtype)
