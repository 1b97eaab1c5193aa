"""TIDE error analysis (Bolya et al., 2020) through the ``tidecv`` package.

The inputs reach tidecv as its own COCO loaders would build them (ground truth, crowd
regions as ignore regions, detections with their box or mask), from the validated data,
so the breakdown equals tidecv's on the same files. Figures are TIDE's: the AP50 gained
(percentage points) by fixing each error type.
"""

from __future__ import annotations

from typing import Any

from cvserve.models.evaluation import shapes
from cvserve.models.evaluation.coco_io import Detections, GroundTruth
from cvserve.models.evaluation.errors import EvaluationInputError

__all__ = ["TIDE_NAMES", "tide_errors"]

# tidecv's short names -> report names.
TIDE_NAMES = {
    "Cls": "classification",
    "Loc": "localisation",
    "Both": "both",
    "Dupe": "duplicate",
    "Bkg": "background",
    "Miss": "missed",
    "FalsePos": "false_positive",
    "FalseNeg": "false_negative",
}


def _data(gt: GroundTruth, dets: Detections, masks: bool) -> tuple[Any, Any]:
    from tidecv import Data

    truth, preds = Data("ground truth", max_dets=100), Data("results")
    for image_id, name in zip(gt.image_ids.tolist(), gt.file_names, strict=True):
        truth.add_image(image_id, name)
    for cid, name in zip(gt.cat_ids.tolist(), gt.cat_names, strict=True):
        truth.add_class(cid, name)
    gt_masks = shapes.gt_rles(gt) if masks else [None] * len(gt.anns)
    for a, mask in zip(gt.anns, gt_masks, strict=True):
        add = truth.add_ignore_region if a.get("iscrowd", 0) else truth.add_ground_truth
        add(a["image_id"], a["category_id"], a["bbox"], mask)
    dt_masks = shapes.dt_rles(gt, dets)[0] if masks else [None] * len(dets.entries)
    for r, mask in zip(dets.entries, dt_masks, strict=True):
        preds.add_detection(r["image_id"], r["category_id"], r["score"], r.get("bbox"), mask)
    return truth, preds


def tide_errors(gt: GroundTruth, dets: Detections, iou_types: tuple[str, ...]) -> dict[str, Any]:
    """TIDE's main and special errors per IoU type (``bbox`` -> box mode, ``segm`` -> mask mode).

    Returns:
        ``{iou_type: {"AP50": ..., "dAP": {name: value}}}`` with :data:`TIDE_NAMES` names,
        in percentage points as TIDE reports them.

    Raises:
        EvaluationInputError: a type is not bbox / segm, or the results lack boxes for bbox.
    """
    try:
        from tidecv import TIDE
    except ImportError:
        raise EvaluationInputError(
            "TIDE error analysis needs tidecv: pip install 'cvserve[tide]' and then"
            " pip install --no-deps tidecv==1.0.1 (docs/evaluation.md)"
        ) from None
    out: dict[str, Any] = {}
    for t in iou_types:
        if t not in ("bbox", "segm"):
            raise EvaluationInputError(f"TIDE error analysis covers bbox and segm, not {t}")
        truth, preds = _data(gt, dets, masks=t == "segm")
        tide = TIDE()
        run = tide.evaluate(truth, preds, mode=TIDE.MASK if t == "segm" else TIDE.BOX, name=t)
        main = tide.get_main_errors()[t]
        special = tide.get_special_errors()[t]
        out[t] = {
            "AP50": float(run.ap),
            "dAP": {TIDE_NAMES[k]: float(v) for k, v in {**main, **special}.items()},
        }
    return out
