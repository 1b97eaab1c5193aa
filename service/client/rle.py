"""COCO run-length encoding of binary masks in numpy, byte for byte as pycocotools writes it.

A mask is read in column-major (Fortran) order; its runs alternate background and
foreground, starting with background (a leading zero-length run when the first pixel is
set). The compressed ``counts`` string stores each run, minus the run two before it from
the fourth on, as 5-bit groups, least significant first, with a continuation bit, offset
into printable ASCII from ``'0'`` (``rleToString`` in pycocotools' ``maskApi.c``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["encode_counts", "encode_mask", "run_lengths"]

_MAX_GROUPS = 7  # 5-bit groups of a 32-bit run length or difference (the C code's uint counts)


def run_lengths(mask: np.ndarray) -> np.ndarray:
    """The runs of a 2-D mask in column-major order, starting with background.

    Args:
        mask: ``(H, W)`` array; nonzero pixels are foreground.

    Returns:
        int64 run lengths summing to ``H * W`` (``[0]`` for an empty mask).
    """
    flat = np.asarray(mask).ravel(order="F") != 0
    if flat.size == 0:
        return np.zeros(1, np.int64)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], changes, [flat.size]))
    runs = np.diff(bounds)
    return np.concatenate(([0], runs)) if flat[0] else runs


def encode_counts(runs: np.ndarray) -> bytes:
    """The compressed counts string of run lengths, as pycocotools' ``rleToString`` writes it."""
    values = np.asarray(runs, dtype=np.int64).copy()
    values[3:] -= np.asarray(runs, dtype=np.int64)[1:-2]  # from the fourth run on: minus the run two back
    shifts = 5 * np.arange(_MAX_GROUPS, dtype=np.int64)
    groups = (values[:, None] >> shifts) & 0x1F  # (runs, groups), arithmetic shift keeps the sign
    rest = values[:, None] >> (shifts + 5)
    # More groups follow while the rest is not the sign extension of this group's top bit.
    more = np.where(groups & 0x10, rest != -1, rest != 0)
    used = np.concatenate((np.ones((values.size, 1), bool), np.cumprod(more, axis=1)[:, :-1] != 0), axis=1)
    chars = (groups | np.where(more, 0x20, 0)) + 48
    return chars[used].astype(np.uint8).tobytes()


def encode_mask(mask: np.ndarray) -> tuple[tuple[int, int], bytes]:
    """``(size, counts)`` of a 2-D binary mask: what ``pycocotools.mask.encode`` returns.

    Args:
        mask: ``(H, W)`` array; nonzero pixels are foreground.

    Raises:
        ValueError: the array is not 2-D.
    """
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"a mask must be a 2-D (H, W) array, got shape {array.shape}")
    height, width = array.shape
    return (int(height), int(width)), encode_counts(run_lengths(array))
