"""The COCO API's ``analyze``: precision-recall curves as errors are removed one kind at a time.

Layers, per category (area ``all``, 100 detections per image), as the COCO API defines them:

* ``C75``, ``C50``: precision at IoU 0.75 and 0.5;
* ``Loc``: at IoU 0.1 (localisation errors forgiven, duplicates still count);
* ``Sim``: also forgiving confusion with categories of the same supercategory (their ground
  truths become crowd regions of this category, so matching them is neither right nor wrong);
* ``Oth``: forgiving confusion with any category;
* ``BG``: also without background false positives (precision 1 wherever it was above 0);
* ``FN``: also without missed objects (1 everywhere).

The relabelled evaluations run through this package's COCOeval, as the COCO API's Python
port (mmdetection's ``coco_error_analysis``) runs them through pycocotools.
"""

from __future__ import annotations

import numpy as np

from cvserve.models.evaluation import shapes
from cvserve.models.evaluation.coco_io import Detections, GroundTruth
from cvserve.models.evaluation.cocoeval import evaluate
from cvserve.models.evaluation.errors import EvaluationInputError
from cvserve.models.evaluation.iou import bbox_pair_iou, segm_pair_iou
from cvserve.models.evaluation.params import EvalParams, PairIoU

__all__ = ["LAYERS", "analyze"]

LAYERS = ("C75", "C50", "Loc", "Sim", "Oth", "BG", "FN")


def _params(iou_type: str, thrs: tuple[float, ...]) -> EvalParams:
    return EvalParams(
        iou_type,
        iou_thrs=np.array(thrs),
        max_dets=(100,),
        area_rngs=np.array([[0.0, 1e10]]),
        area_labels=("all",),
    )


def _pair_iou(gt: GroundTruth, dets: Detections, iou_type: str, crowd: np.ndarray) -> PairIoU:
    if iou_type == "bbox":
        assert dets.bbox is not None  # parsed for bbox
        return bbox_pair_iou(dets.bbox, gt.bbox, crowd)
    return segm_pair_iou(shapes.dt_rles(gt, dets)[0], shapes.gt_rles(gt), crowd)


def _dt_area(gt: GroundTruth, dets: Detections, iou_type: str) -> np.ndarray:
    if iou_type == "bbox":
        assert dets.bbox is not None
        return dets.bbox[:, 2] * dets.bbox[:, 3]
    return shapes.dt_rles(gt, dets)[1]


def _run(
    gt: GroundTruth,
    dets: Detections,
    iou_type: str,
    thrs: tuple[float, ...],
    g_rows: np.ndarray,
    d_rows: np.ndarray,
    crowd: np.ndarray,
    cats: tuple[np.ndarray, np.ndarray],
    num_cats: int,
    zero_id: np.ndarray,
) -> np.ndarray:
    """Precision ``(T, R, K)`` of the given rows; ``crowd`` and ``cats`` (ground truth, detections) cover all rows."""
    pair_iou = _pair_iou(gt, dets, iou_type, crowd)

    def iou(d: np.ndarray, g: np.ndarray, groups: np.ndarray) -> np.ndarray:
        return pair_iou(d_rows[d], g_rows[g], groups)

    acc = evaluate(
        _params(iou_type, thrs),
        len(gt.image_ids),
        num_cats,
        {
            "img": gt.img[g_rows],
            "cat": cats[0][g_rows],
            "area": gt.area[g_rows],
            "crowd": crowd[g_rows],
            "ignore": crowd[g_rows],
            "zero_id": zero_id[g_rows],
        },
        {
            "img": dets.img[d_rows],
            "cat": cats[1][d_rows],
            "score": dets.score[d_rows],
            "area": _dt_area(gt, dets, iou_type)[d_rows],
        },
        iou,
    )
    return acc.precision[:, :, :, 0, 0]


def _supercategories(gt: GroundTruth) -> list[str]:
    sup = {c["id"]: c.get("supercategory") for c in gt.data["categories"]}
    # A category without a supercategory is alone in its own.
    return [str(sup[c]) if sup[c] is not None else f"\0{c}" for c in gt.cat_ids.tolist()]


def analyze(gt: GroundTruth, dets: Detections, iou_type: str, renumber_ids: bool = False) -> np.ndarray:
    """The seven precision layers of :data:`LAYERS` for every category.

    Returns:
        ``(7, R, K)`` precision over the 101 recall thresholds; -1 where a category has no
        ground truth.

    Raises:
        EvaluationInputError: ``iou_type`` is not bbox or segm.
    """
    if iou_type not in ("bbox", "segm"):
        raise EvaluationInputError(f"error analysis covers bbox and segm, not {iou_type}")
    n_k = len(gt.cat_ids)
    zero_id = np.array([a["id"] == 0 for a in gt.anns], bool) & (not renumber_ids)
    all_g, all_d = np.arange(len(gt.anns)), np.arange(len(dets.entries))
    base = _run(
        gt, dets, iou_type, (0.75, 0.5, 0.1), all_g, all_d, gt.crowd, (gt.cat, dets.cat), n_k, zero_id
    )
    out = np.concatenate([base, np.zeros((4, *base.shape[1:]))])
    sup = np.array(_supercategories(gt), object)
    for k in range(n_k):
        d_rows = np.flatnonzero(dets.cat == k)
        others = gt.cat != k
        # Every ground truth and detection relabelled to this category (index 0 of one).
        as_k = (np.zeros(len(gt.anns), np.int64), np.zeros(len(dets.entries), np.int64))
        sim_rows = np.flatnonzero(sup[gt.cat] == sup[k])
        for layer, g_rows in ((3, sim_rows), (4, all_g)):
            out[layer, :, k] = _run(
                gt, dets, iou_type, (0.1,), g_rows, d_rows, gt.crowd | others, as_k, 1, zero_id
            )[0, :, 0]
    out[5] = np.where(out[4] > -1, (out[4] > 0).astype(np.float64), -1)
    out[6] = np.where(out[4] > -1, 1.0, -1)
    return out
