"""``evaluate_coco``: COCO bbox / segm / keypoints metrics that agree with pycocotools.

Figures are in pycocotools' units (fractions in [0, 1]; -1 where a figure is undefined,
e.g. no ground truth of that area). The 12 (keypoints: 10) summary numbers are
pycocotools' ``COCOeval.stats``; per-category figures are the same summaries restricted
to one category (detectron2's per-category AP is the ``AP`` column).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from cvserve.models.evaluation import shapes
from cvserve.models.evaluation.coco_io import Detections, GroundTruth, parse_ground_truth, parse_results
from cvserve.models.evaluation.cocoeval import Accumulated, EvalParams, evaluate
from cvserve.models.evaluation.iou import bbox_pair_iou, oks_pair_iou, segm_pair_iou

__all__ = ["STAT_NAMES", "evaluate_coco", "evaluate_loaded", "summarize"]

logger = logging.getLogger(__name__)

# (name, ap?, iou threshold, area label, max dets) -- pycocotools' summarize() in order.
_DET_STATS = [
    ("AP", 1, None, "all", 100), ("AP50", 1, 0.5, "all", 100), ("AP75", 1, 0.75, "all", 100),
    ("APs", 1, None, "small", 100), ("APm", 1, None, "medium", 100), ("APl", 1, None, "large", 100),
    ("AR1", 0, None, "all", 1), ("AR10", 0, None, "all", 10), ("AR100", 0, None, "all", 100),
    ("ARs", 0, None, "small", 100), ("ARm", 0, None, "medium", 100), ("ARl", 0, None, "large", 100),
]  # fmt: skip
_KPT_STATS = [
    ("AP", 1, None, "all", 20), ("AP50", 1, 0.5, "all", 20), ("AP75", 1, 0.75, "all", 20),
    ("APm", 1, None, "medium", 20), ("APl", 1, None, "large", 20),
    ("AR", 0, None, "all", 20), ("AR50", 0, 0.5, "all", 20), ("AR75", 0, 0.75, "all", 20),
    ("ARm", 0, None, "medium", 20), ("ARl", 0, None, "large", 20),
]  # fmt: skip
STAT_NAMES = {
    "bbox": [s[0] for s in _DET_STATS],
    "segm": [s[0] for s in _DET_STATS],
    "keypoints": [s[0] for s in _KPT_STATS],
}


def _one(acc: Accumulated, ap: int, iou_thr: float | None, area: str, max_det: int, cat: int | None) -> float:
    """One pycocotools ``_summarize`` figure, optionally for a single category index."""
    p = acc.params
    a = p.area_labels.index(area)
    m = p.max_dets.index(max_det)
    s = acc.precision[:, :, :, a, m] if ap else acc.recall[:, :, a, m]
    if iou_thr is not None:
        s = s[np.where(iou_thr == p.iou_thrs)[0]]
    if cat is not None:
        s = s[..., cat] if not ap else s[:, :, cat]
    valid = s[s > -1]
    return float(np.mean(valid)) if len(valid) else -1.0


def summarize(acc: Accumulated, cat: int | None = None) -> dict[str, float]:
    """pycocotools' summary figures, by name, for all categories or one category index."""
    table = _KPT_STATS if acc.params.iou_type == "keypoints" else _DET_STATS
    return {name: _one(acc, ap, thr, area, md, cat) for name, ap, thr, area, md in table}


def _accumulate_type(gt: GroundTruth, dets: Detections, iou_type: str) -> Accumulated:
    params = EvalParams.for_type(iou_type)
    gt_ignore = gt.crowd.copy()
    if iou_type == "bbox":
        assert dets.bbox is not None  # parse_results reads boxes whenever bbox is evaluated
        pair_iou = bbox_pair_iou(dets.bbox, gt.bbox, gt.crowd)
        dt_area = dets.bbox[:, 2] * dets.bbox[:, 3]
    elif iou_type == "segm":
        rles, dt_area = shapes.dt_rles(gt, dets)
        pair_iou = segm_pair_iou(rles, shapes.gt_rles(gt), gt.crowd)
    else:
        gk, no_kpts = shapes.gt_keypoints(gt)
        dk, dt_area = shapes.dt_keypoints(dets)
        pair_iou = oks_pair_iou(dk, gk, gt.bbox, gt.area, shapes.KEYPOINT_SIGMAS)
        gt_ignore |= no_kpts
    return evaluate(
        params,
        len(gt.image_ids),
        len(gt.cat_ids),
        {"img": gt.img, "cat": gt.cat, "area": gt.area, "crowd": gt.crowd, "ignore": gt_ignore},
        {"img": dets.img, "cat": dets.cat, "score": dets.score, "area": dt_area},
        pair_iou,
    )


def evaluate_loaded(
    gt: GroundTruth, dets: Detections, iou_types: tuple[str, ...] | None = None
) -> tuple[dict[str, Any], dict[str, Accumulated]]:
    """Evaluate already parsed inputs; also returns the accumulated arrays (for plots).

    Returns:
        ``(metrics, accumulated)``; see :func:`evaluate_coco` for ``metrics``.
    """
    metrics: dict[str, Any] = {}
    arrays: dict[str, Accumulated] = {}
    for iou_type in iou_types or dets.iou_types:
        tic = time.perf_counter()
        acc = _accumulate_type(gt, dets, iou_type)
        per_cat = []
        for k, (cid, name) in enumerate(zip(gt.cat_ids.tolist(), gt.cat_names, strict=True)):
            per_cat.append({"id": cid, "name": name, **summarize(acc, k)})
        metrics[iou_type] = {"stats": summarize(acc), "per_category": per_cat}
        arrays[iou_type] = acc
        logger.info("%s evaluation: %.2fs", iou_type, time.perf_counter() - tic)
    return metrics, arrays


def evaluate_coco(
    gt: str | os.PathLike[str] | dict[str, Any] | Any,
    results: str | os.PathLike[str] | list[dict[str, Any]],
    iou_types: tuple[str, ...] | list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate COCO results against COCO ground truth.

    Args:
        gt: a ground-truth JSON path, a parsed dict, or a ``pycocotools.coco.COCO``
            (or faster-coco-eval ``COCO``) object.
        results: a results JSON path or a list of result entries.
        iou_types: any of ``bbox``, ``segm``, ``keypoints``; default: every type the
            results carry (keypoint results are evaluated as keypoints only).

    Returns:
        ``{iou_type: {"stats": {name: value}, "per_category": [{"id", "name", <stats>}]}}``
        with pycocotools' values (``stats`` in ``COCOeval.stats`` order).

    Raises:
        EvaluationInputError: an input is malformed; the message names file, entry and field.
    """
    if hasattr(gt, "dataset") and isinstance(gt.dataset, dict):
        gt = gt.dataset
    truth = parse_ground_truth(gt)
    types = tuple(iou_types) if iou_types else None
    dets = parse_results(results, truth, types)
    metrics, _ = evaluate_loaded(truth, dets, types)
    return metrics
