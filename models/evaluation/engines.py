"""pycocotools and faster-coco-eval as evaluation engines, fed the validated inputs.

``cvserve eval --engine pycocotools`` reproduces a figure with pycocotools itself; the
inputs reach it as they would from a user script: the ground-truth dict (annotation ids
renumbered from 1 only when asked), results through ``loadRes`` with masks as compressed
RLE, and the same parameters. For segm with the ``mask`` area rule the box is dropped
before ``loadRes`` (detectron2's convention); with ``box`` it is kept (plain ``loadRes``).
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import numpy as np

from cvserve.models.evaluation import shapes
from cvserve.models.evaluation.coco_io import Detections, GroundTruth
from cvserve.models.evaluation.errors import EvaluationInputError
from cvserve.models.evaluation.params import Accumulated, EvalParams, EvalSettings

__all__ = ["reference_accumulate"]


def _gt_dataset(gt: GroundTruth, renumber: bool) -> dict[str, Any]:
    data = {k: v for k, v in gt.data.items() if k != "annotations"}
    anns = copy.deepcopy(gt.anns)
    if renumber:
        for i, a in enumerate(anns, start=1):
            a["id"] = i
    data["annotations"] = anns
    return data


def _result_entries(gt: GroundTruth, dets: Detections, iou_type: str, segm_area: str) -> list[dict[str, Any]]:
    """Results as ``loadRes`` takes them for ``iou_type`` (fresh dicts: ``loadRes`` mutates them)."""
    base = [
        {"image_id": r["image_id"], "category_id": r["category_id"], "score": r["score"]}
        for r in dets.entries
    ]
    if iou_type == "bbox":
        return [{**b, "bbox": list(r["bbox"])} for b, r in zip(base, dets.entries, strict=True)]
    if iou_type == "keypoints":
        return [copy.deepcopy(r) for r in dets.entries]
    rles, _ = shapes.dt_rles(gt, dets)
    out = []
    for b, r, rle in zip(base, dets.entries, rles, strict=True):
        e = {**b, "segmentation": {"size": list(rle["size"]), "counts": rle["counts"]}}
        if segm_area == "box":
            e["bbox"] = list(r["bbox"])
        out.append(e)
    return out


def _load(lib: str, gt_data: dict[str, Any], results: list[dict[str, Any]]) -> tuple[Any, Any, Any]:
    """(ground truth COCO, results COCO, COCOeval class) of ``lib``."""
    if lib == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval as Eval
    else:
        try:
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as Eval
        except ImportError:
            raise EvaluationInputError(
                "--engine faster-coco-eval needs faster-coco-eval: pip install 'cvserve[faster-coco-eval]'"
            ) from None
    coco_gt = COCO()
    coco_gt.dataset = gt_data
    coco_gt.createIndex()
    if results:
        coco_dt = coco_gt.loadRes(results)
    else:  # loadRes reads the first entry to pick a format, so an empty list needs building by hand
        coco_dt = COCO()
        coco_dt.dataset = {"images": list(gt_data["images"]), "categories": copy.deepcopy(gt_data["categories"]),
                           "annotations": []}  # fmt: skip
        coco_dt.createIndex()
    return coco_gt, coco_dt, Eval


def reference_accumulate(
    engine: str,
    gt: GroundTruth,
    dets: Detections,
    params: EvalParams,
    settings: EvalSettings,
) -> Accumulated:
    """Run ``engine`` (``pycocotools`` or ``faster-coco-eval``): ``evaluate()``, ``accumulate()``.

    Returns:
        The engine's accumulated arrays (``COCOeval.eval``).
    """
    results = _result_entries(gt, dets, params.iou_type, settings.segm_area)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt, eval_cls = _load(engine, _gt_dataset(gt, settings.renumber_ids), results)
        kw = {"print_function": lambda *a, **k: None} if engine != "pycocotools" else {}
        e = eval_cls(coco_gt, coco_dt, params.iou_type, **kw)
        p = e.params
        p.iouThrs = np.asarray(params.iou_thrs, np.float64)
        p.maxDets = list(params.max_dets)
        p.areaRng = [list(r) for r in np.asarray(params.area_rngs).tolist()]
        p.areaRngLbl = list(params.area_labels)
        p.useCats = int(params.use_cats)
        if settings.img_ids is not None:
            p.imgIds = sorted(settings.img_ids)
        if settings.cat_ids is not None:
            p.catIds = list(settings.cat_ids)  # pycocotools sorts them only with useCats=1
        e.evaluate()
        e.accumulate()
    ev = e.eval
    return Accumulated(
        params, np.asarray(ev["precision"]), np.asarray(ev["recall"]), np.asarray(ev["scores"])
    )
