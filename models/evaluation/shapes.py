"""Segmentations and keypoints: validation and conversion to what the IoU functions take.

Ground-truth masks become RLEs exactly as pycocotools' ``COCO.annToRLE`` makes them.
Result masks may be compressed RLE (what pycocotools accepts), uncompressed RLE or
polygons (converted to RLE on the image grid). A result's area for segm evaluation is
its mask area, as detectron2's COCOEvaluator does by dropping the box before loadRes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from cvserve.models.evaluation.checks import finite
from cvserve.models.evaluation.coco_io import Detections, GroundTruth
from cvserve.models.evaluation.errors import EvaluationInputError, describe

__all__ = ["KEYPOINT_SIGMAS", "dt_keypoints", "dt_rles", "gt_keypoints", "gt_rles"]

# pycocotools' default per-keypoint OKS sigmas (COCO person keypoints).
KEYPOINT_SIGMAS = (
    np.array(
        [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89]
    )
    / 10.0
)


def _segm_error(seg: Any, h: int, w: int) -> str | None:
    """Why ``seg`` is not a valid COCO segmentation for an ``h`` x ``w`` image, or None."""
    if type(seg) is dict:
        size, counts = seg.get("size"), seg.get("counts")
        if size != [h, w] and size != (h, w):
            return f"RLE 'size' must be the image's [height, width] = [{h}, {w}], got {describe(size)}"
        if isinstance(counts, str):
            return None if counts.isascii() else "RLE 'counts' string must be ASCII"
        if type(counts) is list and all(_is_count(c) for c in counts):
            return None if sum(counts) == h * w else f"RLE 'counts' must sum to height*width = {h * w}"
        return f"RLE 'counts' must be a string or a list of non-negative integers, got {describe(counts)}"
    if type(seg) is list and seg:
        for poly in seg:
            if not (type(poly) is list and len(poly) >= 4 and len(poly) % 2 == 0):
                return f"polygon must be a list of at least 2 (x, y) pairs, got {describe(poly)}"
            try:
                arr = np.asarray(poly)
            except ValueError:  # ragged nesting
                arr = np.zeros(0, object)
            if arr.dtype.kind not in "if" or arr.ndim != 1 or not np.isfinite(arr).all():
                return f"polygon coordinates must be finite numbers, got {describe(poly)}"
        return None
    return f"expected polygons (list of lists) or an RLE object, got {describe(seg)}"


def _is_count(c: Any) -> bool:
    return type(c) is int and c >= 0


def _image_size(gt: GroundTruth, img: int, where: str) -> tuple[int, int]:
    if "sizes" not in gt.cache:
        gt.cache["sizes"] = list(zip(gt.heights.tolist(), gt.widths.tolist(), strict=True))
    h, w = gt.cache["sizes"][img]
    if h <= 0 or w <= 0:
        image_id = int(gt.image_ids[img])
        raise EvaluationInputError(
            f"{gt.source}: image {image_id}: fields 'height' and 'width' are needed for segm evaluation ({where})"
        )
    return h, w


def _to_rle(seg: Any, h: int, w: int) -> dict[str, Any]:
    if type(seg) is list:
        return mask_util.merge(mask_util.frPyObjects(seg, h, w))
    if type(seg["counts"]) is list:
        return mask_util.frPyObjects(seg, h, w)
    return seg


def gt_rles(gt: GroundTruth) -> list[dict[str, Any]]:
    """RLEs of every ground-truth annotation (cached on ``gt``), as ``COCO.annToRLE`` makes them."""
    if "rles" in gt.cache:
        return gt.cache["rles"]  # type: ignore[no-any-return]
    rles: list[Any] = [None] * len(gt.anns)
    # Polygons of one image are rasterised in one call; an annotation of one polygon needs
    # no merge (merging one RLE returns it unchanged). pycocotools reads a first polygon of
    # 4 numbers as a box, so such annotations take the per-annotation path.
    batches: dict[int, list[int]] = {}
    for i, (ann, img) in enumerate(zip(gt.anns, gt.img.tolist(), strict=True)):
        h, w = _image_size(gt, img, gt.where(i))
        seg = ann.get("segmentation")
        err = _segm_error(seg, h, w)
        if err:
            raise EvaluationInputError(f"{gt.where(i)}: field 'segmentation': {err}")
        if type(seg) is list and len(seg[0]) > 4:
            batches.setdefault(img, []).append(i)
        else:
            rles[i] = _to_rle(seg, h, w)
    for img, idx in batches.items():
        h, w = int(gt.heights[img]), int(gt.widths[img])
        polys = [p for i in idx for p in gt.anns[i]["segmentation"]]
        flat = mask_util.frPyObjects(polys, h, w)
        j = 0
        for i in idx:
            n = len(gt.anns[i]["segmentation"])
            rles[i] = flat[j] if n == 1 else mask_util.merge(flat[j : j + n])
            j += n
    gt.cache["rles"] = rles
    return rles


def dt_rles(gt: GroundTruth, dets: Detections) -> tuple[list[dict[str, Any]], np.ndarray]:
    """RLEs and mask areas of every detection (cached on ``dets``)."""
    if "rles" not in dets.cache:
        rles = []
        for i, (r, img) in enumerate(zip(dets.entries, dets.img.tolist(), strict=True)):
            h, w = _image_size(gt, img, f"{dets.source}: entry {i}")
            seg = r.get("segmentation")
            err = _segm_error(seg, h, w)
            if err:
                raise EvaluationInputError(f"{dets.source}: entry {i}: field 'segmentation': {err}")
            rles.append(_to_rle(seg, h, w))
        areas = _areas(rles)
        dets.cache["rles"] = (rles, areas)
    return dets.cache["rles"]  # type: ignore[no-any-return]


def _areas(rles: list[dict[str, Any]]) -> np.ndarray:
    # pycocotools' area() sizes a temporary uint8 array by the list length, which numpy 2
    # rejects beyond 255 items, so the list goes in chunks.
    chunks = [mask_util.area(rles[i : i + 255]) for i in range(0, len(rles), 255)]
    return np.concatenate(chunks).astype(np.float64) if chunks else np.zeros(0)


def _kpt_array(values: Any, where: str) -> np.ndarray:
    n = 3 * len(KEYPOINT_SIGMAS)
    if not (type(values) is list and len(values) == n and all(finite(v) for v in values)):
        raise EvaluationInputError(
            f"{where}: field 'keypoints': expected {n} finite numbers (x, y, v) * {n // 3}, got {describe(values)}"
        )
    return np.asarray(values, np.float64)


def gt_keypoints(gt: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 51)`` keypoints and a bool array: annotation has no labelled keypoint."""
    if "kpts" not in gt.cache:
        kpts, empty = [], []
        for i, ann in enumerate(gt.anns):
            kpts.append(_kpt_array(ann.get("keypoints"), gt.where(i)))
            num = ann.get("num_keypoints")
            if not (type(num) is int and num >= 0):
                raise EvaluationInputError(
                    f"{gt.where(i)}: field 'num_keypoints': expected an integer >= 0, got {describe(num)}"
                )
            empty.append(num == 0)
        gt.cache["kpts"] = (np.asarray(kpts).reshape(-1, 3 * len(KEYPOINT_SIGMAS)), np.asarray(empty, bool))
    return gt.cache["kpts"]  # type: ignore[no-any-return]


def dt_keypoints(dets: Detections) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 51)`` keypoints and the area of each detection.

    The area is the box's when the entry has one, else the keypoints' extent, which is
    what pycocotools' ``loadRes`` does for consistent files.
    """
    if "kpts" not in dets.cache:
        kpts, areas = [], []
        for i, r in enumerate(dets.entries):
            k = _kpt_array(r.get("keypoints"), f"{dets.source}: entry {i}")
            box = r.get("bbox")
            if box:
                if not (type(box) is list and len(box) == 4 and all(finite(v) for v in box)):
                    raise EvaluationInputError(
                        f"{dets.source}: entry {i}: field 'bbox': expected 4 finite numbers, got {describe(box)}"
                    )
                areas.append(box[2] * box[3])
            else:
                x, y = k[0::3], k[1::3]
                areas.append((np.max(x) - np.min(x)) * (np.max(y) - np.min(y)))
            kpts.append(k)
        dets.cache["kpts"] = (
            np.asarray(kpts).reshape(-1, 3 * len(KEYPOINT_SIGMAS)),
            np.asarray(areas, np.float64),
        )
    return dets.cache["kpts"]  # type: ignore[no-any-return]
