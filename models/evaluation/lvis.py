"""LVIS v1 evaluation through the official ``lvis`` package's ``LVISEval``.

LVIS is federated: a category counts as a false positive on an image only where it is
verified absent (``neg_category_ids``) or present, and detections of categories in
``not_exhaustive_category_ids`` that match nothing are ignored; 300 detections per image
are kept. The official implementation is used as is, on inputs validated by this
package, so its figures are LVIS's own. For segm the result's box is dropped first, as
detectron2's ``LVISEvaluator`` does, so a result's area is its mask's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from cvserve.models.evaluation import shapes
from cvserve.models.evaluation.coco_io import Detections, GroundTruth
from cvserve.models.evaluation.errors import EvaluationInputError

__all__ = ["LVIS_STATS", "evaluate_lvis", "numpy_aliases"]

LVIS_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR@300")
_LVIS_FIELDS = ("neg_category_ids", "not_exhaustive_category_ids")


@contextlib.contextmanager
def numpy_aliases() -> Iterator[None]:
    """``np.float`` / ``np.int`` / ``np.bool`` while inside (the ``lvis`` package still uses them).

    numpy 2 removed the aliases; they are added for the duration of one call and removed
    again, so nothing else sees them.
    """
    added = [name for name in ("float", "int", "bool") if name not in np.__dict__]
    for name in added:
        setattr(np, name, {"float": float, "int": int, "bool": bool}[name])
    try:
        yield
    finally:
        for name in added:
            delattr(np, name)


def _check_lvis(gt: GroundTruth) -> None:
    for i, im in enumerate(gt.data["images"]):
        for key in _LVIS_FIELDS:
            ids = im.get(key)
            if type(ids) is not list or not all(c in gt.cat_index for c in ids):
                raise EvaluationInputError(
                    f"{gt.source}: images[{i}]: field '{key}': expected a list of category ids (LVIS v1)"
                )
    for i, c in enumerate(gt.data["categories"]):
        if c.get("frequency") not in ("r", "c", "f"):
            raise EvaluationInputError(
                f"{gt.source}: categories[{i}]: field 'frequency': expected 'r', 'c' or 'f' (LVIS v1)"
            )


def _results(gt: GroundTruth, dets: Detections, iou_type: str) -> list[dict[str, Any]]:
    base = [
        {"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"]}
        for r in dets.entries
    ]
    if iou_type == "bbox":
        return [{**b, "bbox": list(r["bbox"])} for b, r in zip(base, dets.entries, strict=True)]
    rles, _ = shapes.dt_rles(gt, dets)
    return [
        {**b, "segmentation": {"size": list(m["size"]), "counts": m["counts"]}}
        for b, m in zip(base, rles, strict=True)
    ]


def evaluate_lvis(gt: GroundTruth, dets: Detections, iou_types: tuple[str, ...]) -> dict[str, Any]:
    """LVIS AP figures per IoU type (``bbox``, ``segm``).

    Returns:
        ``{iou_type: {"stats": {name: value}}}`` with :data:`LVIS_STATS` names, in [0, 1],
        -1 where undefined (LVIS's convention).

    Raises:
        EvaluationInputError: the ground truth lacks LVIS fields, or a type is not bbox / segm.
    """
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError:
        raise EvaluationInputError(
            "LVIS evaluation needs the lvis package: pip install 'cvserve[lvis]' and then"
            " pip install --no-deps lvis==0.5.3 (docs/evaluation.md)"
        ) from None
    _check_lvis(gt)
    bad = [t for t in iou_types if t not in ("bbox", "segm")]
    if bad:
        raise EvaluationInputError(f"LVIS evaluation covers bbox and segm, not {bad[0]}")
    lvis_gt = LVIS.__new__(LVIS)  # the constructor only reads a path; the data is already parsed
    lvis_gt.logger = logging.getLogger("lvis")
    lvis_gt.dataset = copy.deepcopy(gt.data)
    lvis_gt._create_index()
    out: dict[str, Any] = {}
    for t in iou_types:
        results = _results(gt, dets, t)
        if not results:
            raise EvaluationInputError(f"{dets.source}: no detections (LVIS's evaluation needs at least one)")
        with numpy_aliases():
            e = LVISEval(lvis_gt, LVISResults(lvis_gt, results, max_dets=300), t)
            e.evaluate()
            e.accumulate()
            e.summarize()
        out[t] = {"stats": {k: float(e.results[k]) for k in LVIS_STATS}, "per_category": []}
    return out
