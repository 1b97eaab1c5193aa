"""Mask pasting and RLE encoding whose cost follows each mask's outline, not its box's area.

detectron2 pastes an ``M x M`` mask probability map into its box with ``grid_sample``
(bilinear, zero padding, ``align_corners=False``) and thresholds at 0.5. On a 12 MP photo
a box is hundreds of pixels on a side, and sampling every pixel of 100 boxes takes longer
than the network's forward. The pixels are not needed one by one: along an image column
the pasted map is piecewise linear (its knots are the mask's rows), so it crosses 0.5 at
most once per knot interval, where ``(0.5 - a) / (b - a)`` puts the crossing. An RLE
(column-major) is exactly the list of those crossings. So, per mask:

1. interpolate each column of the box along x at the mask's rows: a ``(columns, M + 2)``
   profile (zero padding rows included);
2. find each column's crossings and the pixel row each falls on;
3. wherever a pixel lies so near 0.5 that float rounding decides its side (a knot within
   :data:`KNOT_TOL` of 0.5, a pixel within :data:`PIXEL_TOL`, a nearly flat crossing),
   sample that whole column with ``grid_sample`` itself, on the same float32 grid values
   as detectron2's paste, so its pixels are detectron2's pixels.

The result is byte-identical to pasting with detectron2's ``paste_masks_in_image`` and
encoding with ``pycocotools.mask.encode`` (the tests check it on random and smooth masks),
for ``O(columns x M)`` work per mask instead of ``O(rows x columns)``.

A block of at most :data:`DIRECT_MAX_PIXELS` pixels is sampled whole by ``grid_sample``
(step 3 for every column) instead: at that size the fixed cost of the steps above is larger
than sampling every pixel (``benchmarks/README.md``, "Small masks sampled whole").
"""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

__all__ = ["DIRECT_MAX_PIXELS", "KNOT_TOL", "PIXEL_TOL", "paste_rles", "rles_from_edges"]

# A pixel whose value (modelled in float64) is this close to 0.5 is sampled by grid_sample:
# the float32 grid and arithmetic move a value by at most about 2e-6.
PIXEL_TOL = 1e-5
# A column with a profile knot this close to 0.5 is sampled whole (a touch or a flat run).
KNOT_TOL = 1e-4
# A block of at most this many pixels is sampled whole: faster there than finding crossings.
DIRECT_MAX_PIXELS = 32768


def box_regions(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, 4)`` int64 ``top, left, rows, columns`` of the block each mask is pasted into.

    The block detectron2's ``_do_paste_mask`` (``skip_empty``) samples for a single box:
    the box widened by one pixel on each side, rounded out to whole pixels, clipped.
    """
    x0 = torch.clamp(boxes[:, 0].floor() - 1, min=0).to(torch.int32)
    y0 = torch.clamp(boxes[:, 1].floor() - 1, min=0).to(torch.int32)
    x1 = torch.clamp(boxes[:, 2].ceil() + 1, max=width).to(torch.int32)
    y1 = torch.clamp(boxes[:, 3].ceil() + 1, max=height).to(torch.int32)
    return torch.stack([y0, x0, (y1 - y0).clamp(min=0), (x1 - x0).clamp(min=0)], 1).long()


def _grid_axis(start: int, count: int, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """detectron2's normalised sample coordinates of ``count`` pixels from ``start`` (float32)."""
    centres = torch.arange(count, dtype=torch.float32) + float(start) + 0.5
    return (centres - low) / (high - low) * 2 - 1


def _unnormalise(grid: torch.Tensor, size: int) -> np.ndarray:
    """grid_sample's source coordinate (``align_corners=False``), in float64."""
    return ((grid.double().numpy() + 1) * size - 1) / 2


def _sample_columns(
    probs: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor, columns: np.ndarray
) -> list[np.ndarray]:
    """Transition rows of ``columns``, each sampled whole by ``grid_sample`` at 0.5."""
    if len(columns) == 0:
        return []
    rows = len(gy)
    grid = np.empty((1, rows, len(columns), 2), np.float32)  # numpy: strided torch writes are slow
    grid[0, :, :, 0] = gx.numpy()[columns][None, :]
    grid[0, :, :, 1] = gy.numpy()[:, None]
    sampled = F.grid_sample(probs[None, None], torch.from_numpy(grid), align_corners=False)[0, 0] >= 0.5
    padded = np.zeros((rows + 2, len(columns)), np.int8)
    padded[1:-1] = sampled.numpy()
    r, c = np.nonzero(padded[1:] != padded[:-1])
    return [columns[c], r]


def _mask_edges(
    probs: torch.Tensor, box: torch.Tensor, top: int, left: int, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(column, row)`` of every 0/1 transition of one pasted mask inside its block.

    A row index equal to ``rows`` is a run of ones ending at the block's last row.
    """
    empty = np.zeros(0, np.int64)
    if rows == 0 or cols == 0:
        return empty, empty
    size = probs.shape[-1]
    gx = _grid_axis(left, cols, box[0], box[2])
    gy = _grid_axis(top, rows, box[1], box[3])
    everything = np.arange(cols)
    if rows * cols <= DIRECT_MAX_PIXELS:
        return tuple(_sample_columns(probs, gx, gy, everything))  # type: ignore[return-value]
    ix, iy = _unnormalise(gx, size), _unnormalise(gy, size)
    if not (np.isfinite(ix).all() and np.isfinite(iy).all() and (rows == 1 or iy[-1] > iy[0])):
        return tuple(_sample_columns(probs, gx, gy, everything))  # type: ignore[return-value]
    # 1. The profile: each column interpolated along x at the mask's rows (and the zero rows
    #    around them, knot k at source row k - 1).
    padded = np.zeros((size + 2, size + 2))
    padded[1:-1, 1:-1] = probs.double().numpy()
    i0 = np.floor(ix)
    fx = ix - i0
    outside = (i0 < -1) | (i0 > size - 1)
    a = np.clip(i0 + 1, 0, size + 1).astype(np.int64)
    b = np.clip(i0 + 2, 0, size + 1).astype(np.int64)
    profile = (padded[:, a] * (1 - fx) + padded[:, b] * fx).T  # (cols, size + 2)
    profile[outside] = 0.0
    # 2. Crossings of 0.5 between consecutive knots, and the pixel row each lands on.
    above = profile >= 0.5
    c, k = np.nonzero(above[:, 1:] != above[:, :-1])
    lo, hi = profile[c, k], profile[c, k + 1]
    cross = (k - 1) + (0.5 - lo) / (hi - lo)
    rising = hi >= 0.5
    row = np.where(rising, np.searchsorted(iy, cross, side="left"), np.searchsorted(iy, cross, side="right"))
    # 3. Columns where rounding could decide a pixel: sampled whole by grid_sample.
    slope = np.abs(hi - lo)
    near = np.zeros(len(c), bool)
    for r in (row - 1, row):
        inside = (r >= 0) & (r < rows)
        near |= inside & (np.abs(iy[np.clip(r, 0, rows - 1)] - cross) * slope < PIXEL_TOL)
    step = (iy[-1] - iy[0]) / (rows - 1) if rows > 1 else np.inf
    near |= slope * step < 2 * PIXEL_TOL  # so flat that two pixels could sit by 0.5
    exact = np.zeros(cols, bool)
    exact[np.abs(profile - 0.5).min(axis=1) < KNOT_TOL] = True
    exact[c[near]] = True
    keep = ~exact[c]
    sampled = _sample_columns(probs, gx, gy, np.flatnonzero(exact))
    columns = np.concatenate([c[keep], *sampled[:1]]).astype(np.int64)
    rows_at = np.concatenate([np.clip(row[keep], 0, rows), *sampled[1:]]).astype(np.int64)
    return columns, rows_at


def rles_from_edges(edges: list[np.ndarray], height: int, width: int) -> list[bytes]:
    """COCO compressed RLEs from each mask's transition indices in the column-major image.

    Indices may repeat (a run crossing from one image column into the next, crossings
    before a block's first row): an index present an even number of times is no transition.
    """
    total = height * width
    objs = []
    for e in edges:
        values, counts = np.unique(e, return_counts=True)
        kept = values[(counts % 2 == 1) & (values < total)]
        objs.append(
            {"size": [height, width], "counts": np.diff(np.concatenate(([0], kept, [total]))).tolist()}
        )
    return [r["counts"] for r in mask_util.frPyObjects(objs, height, width)] if objs else []


def paste_rles(probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> list[bytes]:
    """Paste each ``(M, M)`` mask probability map into its box and RLE-encode it.

    The pixels of detectron2's ``paste_masks_in_image`` on the CPU (bilinear, threshold
    0.5), encoded as ``pycocotools.mask.encode`` would; see the module docstring.
    """
    if len(probs) == 0:
        return []
    probs = probs if probs.dtype == torch.float32 else probs.float()
    boxes = boxes if boxes.dtype == torch.float32 else boxes.float()
    regions = box_regions(boxes, height, width).tolist()
    edges = []
    for i, (top, left, rows, cols) in enumerate(regions):
        columns, rows_at = _mask_edges(probs[i], boxes[i], top, left, rows, cols)
        edges.append((left + columns) * height + top + rows_at)
    return rles_from_edges(edges, height, width)
