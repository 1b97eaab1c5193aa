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
from cvserve.models.evaluation.cocoeval import evaluate
from cvserve.models.evaluation.engines import reference_accumulate
from cvserve.models.evaluation.errors import EvaluationInputError
from cvserve.models.evaluation.iou import bbox_pair_iou, oks_pair_iou, segm_pair_iou
from cvserve.models.evaluation.params import Accumulated, EvalParams, EvalSettings, PairIoU

__all__ = ["STAT_NAMES", "evaluate_coco", "evaluate_loaded", "stat_names", "summarize", "zero_id_count"]

logger = logging.getLogger(__name__)

# (name, ap?, iou threshold, area label, max dets index) -- pycocotools' summarize() in order;
# the detection table reads maxDets[0..2] as pycocotools does (AR1 / AR10 / AR100 by default).
_DET_STATS = [
    ("AP", 1, None, "all", 2), ("AP50", 1, 0.5, "all", 2), ("AP75", 1, 0.75, "all", 2),
    ("APs", 1, None, "small", 2), ("APm", 1, None, "medium", 2), ("APl", 1, None, "large", 2),
    ("AR{0}", 0, None, "all", 0), ("AR{1}", 0, None, "all", 1), ("AR{2}", 0, None, "all", 2),
    ("ARs", 0, None, "small", 2), ("ARm", 0, None, "medium", 2), ("ARl", 0, None, "large", 2),
]  # fmt: skip
_KPT_STATS = [
    ("AP", 1, None, "all", 0), ("AP50", 1, 0.5, "all", 0), ("AP75", 1, 0.75, "all", 0),
    ("APm", 1, None, "medium", 0), ("APl", 1, None, "large", 0),
    ("AR", 0, None, "all", 0), ("AR50", 0, 0.5, "all", 0), ("AR75", 0, 0.75, "all", 0),
    ("ARm", 0, None, "medium", 0), ("ARl", 0, None, "large", 0),
]  # fmt: skip


def stat_names(params: EvalParams) -> list[str]:
    """Names of the summary figures under ``params`` (AR1 / AR10 / AR100 follow ``max_dets``)."""
    table = _KPT_STATS if params.iou_type == "keypoints" else _DET_STATS
    return [s[0].format(*params.max_dets) for s in table]


STAT_NAMES = {t: stat_names(EvalParams.for_type(t)) for t in ("bbox", "segm", "keypoints")}


def _one(acc: Accumulated, ap: int, iou_thr: float | None, area: str, m: int, cat: int | None) -> float:
    """One pycocotools ``_summarize`` figure, optionally for a single category index."""
    p = acc.params
    a = [i for i, lbl in enumerate(p.area_labels) if lbl == area]
    s = acc.precision[:, :, :, a, m] if ap else acc.recall[:, :, a, m]
    if iou_thr is not None:
        s = s[np.where(iou_thr == p.iou_thrs)[0]]
    if cat is not None:
        s = s[..., cat, :] if not ap else s[:, :, cat, :]
    valid = s[s > -1]
    return float(np.mean(valid)) if len(valid) else -1.0


def summarize(acc: Accumulated, cat: int | None = None) -> dict[str, float]:
    """pycocotools' summary figures, by name, for all categories or one category index.

    ``AP`` reads ``max_dets[2]`` like every other detection figure (as detectron2's
    ``COCOevalMaxDets`` does); pycocotools' own ``summarize`` reads a literal 100 there,
    which is the same figure unless the max-detections setting is changed.
    """
    table = _KPT_STATS if acc.params.iou_type == "keypoints" else _DET_STATS
    return {
        name: _one(acc, ap, thr, area, m, cat)
        for name, (_, ap, thr, area, m) in zip(stat_names(acc.params), table, strict=True)
    }


def zero_id_count(gt: GroundTruth) -> int:
    """Ground-truth annotations whose id is 0 (pycocotools counts a match to one as a false positive)."""
    return sum(1 for a in gt.anns if a["id"] == 0)


def _check_subsets(gt: GroundTruth, settings: EvalSettings) -> None:
    for name, ids, index in (
        ("image", settings.img_ids, gt.image_index),
        ("category", settings.cat_ids, gt.cat_index),
    ):
        missing = [i for i in ids or () if i not in index]
        if missing:
            raise EvaluationInputError(f"{gt.source}: {name} id {missing[0]} is not in the ground truth")


def _selected_cats(gt: GroundTruth, settings: EvalSettings) -> np.ndarray:
    """Category indices evaluated, ascending id order (pycocotools sorts ``catIds``)."""
    if settings.cat_ids is None:
        return np.arange(len(gt.cat_ids))
    return np.array(sorted(gt.cat_index[c] for c in set(settings.cat_ids)), np.int64)


def _row_filter(gt: GroundTruth, img: np.ndarray, cat: np.ndarray, settings: EvalSettings) -> np.ndarray:
    keep = np.ones(len(img), bool)
    if settings.img_ids is not None:
        keep &= np.isin(img, [gt.image_index[i] for i in settings.img_ids])
    if settings.cat_ids is not None:
        keep &= np.isin(cat, _selected_cats(gt, settings))
    return keep


def _dt_area_and_iou(
    gt: GroundTruth, dets: Detections, iou_type: str, settings: EvalSettings
) -> tuple[np.ndarray, PairIoU, np.ndarray]:
    """Detection areas, the pair IoU function and extra ground-truth ignore flags of ``iou_type``."""
    no_extra = np.zeros(len(gt.anns), bool)
    if iou_type == "bbox":
        assert dets.bbox is not None  # parse_results reads boxes whenever bbox is evaluated
        return dets.bbox[:, 2] * dets.bbox[:, 3], bbox_pair_iou(dets.bbox, gt.bbox, gt.crowd), no_extra
    if iou_type == "segm":
        rles, dt_area = shapes.dt_rles(gt, dets)
        if settings.segm_area == "box":
            dt_area = shapes.dt_box_areas(dets)
        return dt_area, segm_pair_iou(rles, shapes.gt_rles(gt), gt.crowd), no_extra
    gk, no_kpts = shapes.gt_keypoints(gt)
    dk, dt_area = shapes.dt_keypoints(dets)
    return dt_area, oks_pair_iou(dk, gk, gt.bbox, gt.area, shapes.KEYPOINT_SIGMAS), no_kpts


def _accumulate_numpy(
    gt: GroundTruth, dets: Detections, params: EvalParams, settings: EvalSettings
) -> Accumulated:
    dt_area, pair_iou, extra_ignore = _dt_area_and_iou(gt, dets, params.iou_type, settings)
    g_keep = np.flatnonzero(_row_filter(gt, gt.img, gt.cat, settings))
    d_keep = np.flatnonzero(_row_filter(gt, dets.img, dets.cat, settings))
    cats = _selected_cats(gt, settings)
    if not params.use_cats and settings.cat_ids is not None:
        # Class-agnostic pycocotools lists an image's objects in the given category order (unsorted).
        cats = np.array([gt.cat_index[c] for c in settings.cat_ids], np.int64)
    remap = np.full(len(gt.cat_ids), -1, np.int64)
    remap[cats] = np.arange(len(cats))
    zero_id = np.array([a["id"] == 0 for a in gt.anns], bool) & (not settings.renumber_ids)

    def iou(d: np.ndarray, g: np.ndarray, groups: np.ndarray) -> np.ndarray:
        return pair_iou(d_keep[d], g_keep[g], groups)

    g = {"img": gt.img, "cat": remap[gt.cat], "area": gt.area, "crowd": gt.crowd,
         "ignore": gt.crowd | extra_ignore, "zero_id": zero_id}  # fmt: skip
    d = {"img": dets.img, "cat": remap[dets.cat], "score": dets.score, "area": dt_area}
    return evaluate(
        params,
        len(gt.image_ids),
        len(cats),
        {k: v[g_keep] for k, v in g.items()},
        {k: v[d_keep] for k, v in d.items()},
        iou,
    )


def evaluate_loaded(
    gt: GroundTruth,
    dets: Detections,
    iou_types: tuple[str, ...] | None = None,
    settings: EvalSettings | None = None,
) -> tuple[dict[str, Any], dict[str, Accumulated]]:
    """Evaluate already parsed inputs; also returns the accumulated arrays (for plots).

    Args:
        gt: parsed ground truth.
        dets: parsed results.
        iou_types: types to evaluate (default: those ``dets`` were parsed for).
        settings: parameters and engine (default: pycocotools' defaults, numpy engine).

    Returns:
        ``(metrics, accumulated)``; see :func:`evaluate_coco` for ``metrics``.

    Raises:
        EvaluationInputError: an image or category id of a subset is not in ``gt``, a
            segm result lacks the box the ``box`` area rule needs, or the settings do not
            apply to an IoU type.
    """
    settings = settings or EvalSettings()
    _check_subsets(gt, settings)
    if (n := zero_id_count(gt)) and not settings.renumber_ids:
        logger.warning(
            "%s: %d ground-truth annotation(s) have id 0; pycocotools (and so these figures) count a "
            "detection matched to one as a false positive. --renumber-ids renumbers them from 1.",
            gt.source,
            n,
        )
    metrics: dict[str, Any] = {}
    arrays: dict[str, Accumulated] = {}
    cats = _selected_cats(gt, settings)
    for iou_type in iou_types or dets.iou_types:
        tic = time.perf_counter()
        try:
            params = settings.params(iou_type)
        except ValueError as e:
            raise EvaluationInputError(str(e)) from None
        if settings.engine == "numpy":
            acc = _accumulate_numpy(gt, dets, params, settings)
        else:
            acc = reference_accumulate(settings.engine, gt, dets, params, settings)
        stats = summarize(acc)
        per_cat = []
        if params.use_cats:
            for k, c in enumerate(cats.tolist()):
                per_cat.append({"id": int(gt.cat_ids[c]), "name": gt.cat_names[c], **summarize(acc, k)})
        metrics[iou_type] = {"stats": stats, "per_category": per_cat}
        arrays[iou_type] = acc
        logger.info("%s evaluation (%s): %.2fs", iou_type, settings.engine, time.perf_counter() - tic)
    return metrics, arrays


def evaluate_coco(
    gt: str | os.PathLike[str] | dict[str, Any] | Any,
    results: str | os.PathLike[str] | list[dict[str, Any]],
    iou_types: tuple[str, ...] | list[str] | None = None,
    settings: EvalSettings | None = None,
) -> dict[str, Any]:
    """Evaluate COCO results against COCO ground truth.

    Args:
        gt: a ground-truth JSON path, a parsed dict, or a ``pycocotools.coco.COCO``
            (or faster-coco-eval ``COCO``) object.
        results: a results JSON path or a list of result entries.
        iou_types: any of ``bbox``, ``segm``, ``keypoints``; default: every type the
            results carry (keypoint results are evaluated as keypoints only).
        settings: parameters and engine; default: pycocotools' defaults, numpy engine.

    Returns:
        ``{iou_type: {"stats": {name: value}, "per_category": [{"id", "name", <stats>}]}}``
        with pycocotools' values (``stats`` in ``COCOeval.stats`` order; ``per_category``
        is empty for class-agnostic evaluation).

    Raises:
        EvaluationInputError: an input is malformed; the message names file, entry and field.
    """
    if hasattr(gt, "dataset") and isinstance(gt.dataset, dict):
        gt = gt.dataset
    truth = parse_ground_truth(gt)
    types = tuple(iou_types) if iou_types else None
    dets = parse_results(results, truth, types)
    metrics, _ = evaluate_loaded(truth, dets, types, settings)
    return metrics
