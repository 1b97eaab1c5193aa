"""IoU and OKS of (detection, ground truth) pairs, bit-identical to pycocotools.

Each function returns a :data:`~cvserve.models.evaluation.cocoeval.PairIoU`: given index arrays
of detections and ground truths (one entry per pair, pairs of one (image, category)
contiguous and detection-major) it returns one similarity per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from cvserve.models.evaluation.cocoeval import PairIoU

__all__ = ["bbox_pair_iou", "oks_pair_iou", "segm_pair_iou"]


def bbox_pair_iou(dt_boxes: np.ndarray, gt_boxes: np.ndarray, gt_crowd: np.ndarray) -> PairIoU:
    """Box IoU of XYWH boxes; for a crowd ground truth the union is the detection's area.

    The arithmetic follows pycocotools' ``bbIou`` operation by operation so thresholds
    compare on identical doubles.
    """

    def iou(d: np.ndarray, g: np.ndarray, groups: np.ndarray) -> np.ndarray:
        del groups
        dx, dy, dw, dh = dt_boxes[d].T
        gx, gy, gw, gh = gt_boxes[g].T
        w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
        h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
        inter = w * h
        da = dw * dh
        union = np.where(gt_crowd[g], da, da + gw * gh - inter)
        overlap = (w > 0) & (h > 0)
        out = np.zeros(len(d))
        out[overlap] = inter[overlap] / union[overlap]
        return out

    return iou


def segm_pair_iou(
    dt_rles: Sequence[dict[str, Any]], gt_rles: Sequence[dict[str, Any]], gt_crowd: np.ndarray
) -> PairIoU:
    """Mask IoU of COCO RLEs through pycocotools' C implementation, one call per group."""
    crowd = gt_crowd.astype(np.uint8).tolist()

    def iou(d: np.ndarray, g: np.ndarray, groups: np.ndarray) -> np.ndarray:
        out = np.empty(len(d))
        d_list, g_list = d.tolist(), g.tolist()
        for s, e, ng in groups.tolist():
            dets = [dt_rles[i] for i in d_list[s:e:ng]]
            gidx = g_list[s : s + ng]
            gts = [gt_rles[i] for i in gidx]
            out[s:e] = np.asarray(mask_util.iou(dets, gts, [crowd[i] for i in gidx])).ravel()
        return out

    return iou


def oks_pair_iou(
    dt_kpts: np.ndarray,
    gt_kpts: np.ndarray,
    gt_boxes: np.ndarray,
    gt_area: np.ndarray,
    sigmas: np.ndarray,
) -> PairIoU:
    """Object keypoint similarity, computed as pycocotools' ``computeOks`` does.

    Per-row sums stay one-dimensional so the reduction order (and so every bit of the
    result) matches pycocotools.
    """
    variances = (sigmas * 2) ** 2

    def iou(d: np.ndarray, g: np.ndarray, groups: np.ndarray) -> np.ndarray:
        out = np.empty(len(d))
        for s, e, ng in groups.tolist():
            dets = d[s:e:ng]
            xd, yd = dt_kpts[dets][:, 0::3], dt_kpts[dets][:, 1::3]
            for j, gi in enumerate(g[s : s + ng].tolist()):
                out[s + j : e : ng] = _oks_one_gt(
                    xd, yd, gt_kpts[gi], gt_boxes[gi], float(gt_area[gi]), variances
                )
        return out

    return iou


def _oks_one_gt(
    xd: np.ndarray, yd: np.ndarray, kg: np.ndarray, bb: np.ndarray, area: float, variances: np.ndarray
) -> np.ndarray:
    xg, yg, vg = kg[0::3], kg[1::3], kg[2::3]
    visible = vg > 0
    if np.count_nonzero(visible) > 0:
        dx, dy = xd - xg, yd - yg
    else:
        # No visible keypoint: distance to the box doubled around the ground truth.
        x0, x1 = bb[0] - bb[2], bb[0] + bb[2] * 2
        y0, y1 = bb[1] - bb[3], bb[1] + bb[3] * 2
        z = np.zeros_like(xd)
        dx = np.maximum(z, x0 - xd) + np.maximum(z, xd - x1)
        dy = np.maximum(z, y0 - yd) + np.maximum(z, yd - y1)
    e = (dx**2 + dy**2) / variances / (area + np.spacing(1)) / 2
    if np.count_nonzero(visible) > 0:
        e = e[:, visible]
    return np.array([np.sum(row) / row.shape[0] for row in np.exp(-e)])
