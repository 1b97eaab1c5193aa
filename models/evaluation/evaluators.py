"""detectron2 ``DatasetEvaluator`` adapters, usable with ``inference_on_dataset``.

They accept detectron2 model outputs (``{"instances": Instances}`` / ``{"sem_seg":
logits}``) as well as :class:`cvserve.models.types.Prediction`, and report in detectron2's units
(percent; NaN where a figure is undefined), computed by this package's evaluators.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from detectron2.evaluation import DatasetEvaluator
from pycocotools import mask as mask_util

from cvserve.models.evaluation.coco import evaluate_loaded
from cvserve.models.evaluation.coco_io import parse_ground_truth, parse_results
from cvserve.models.evaluation.inference import map_categories, prediction_entries
from cvserve.models.evaluation.semantic import read_label_png, semantic_metrics, update_confusion
from cvserve.models.types import Prediction

__all__ = ["COCOInstanceEvaluator", "SemanticEvaluator"]

logger = logging.getLogger(__name__)


def _percent(v: float) -> float:
    return float("nan") if v == -1 else 100.0 * v


def _entries_from_instances(instances: Any, image_id: int, cat_map: Sequence[int]) -> list[dict[str, Any]]:
    """COCO results entries from detectron2 ``Instances`` (on any device)."""
    inst = instances.to("cpu")
    boxes = inst.pred_boxes.tensor.numpy().astype(np.float64)
    scores = inst.scores.numpy().tolist()
    classes = inst.pred_classes.numpy().tolist()
    masks = inst.pred_masks.numpy() if inst.has("pred_masks") else None
    kpts = inst.pred_keypoints.numpy() if inst.has("pred_keypoints") else None
    out = []
    for i in range(len(inst)):
        x0, y0, x1, y1 = boxes[i].tolist()
        e: dict[str, Any] = {"image_id": image_id, "category_id": cat_map[classes[i]],
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[i])}  # fmt: skip
        if masks is not None:
            rle = mask_util.encode(np.asfortranarray(masks[i].astype(np.uint8)))
            e["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        if kpts is not None:
            k = kpts[i].astype(np.float64).copy()
            k[:, :2] -= 0.5  # COCO keypoints are pixel indices; detectron2's COCOEvaluator does the same
            e["keypoints"] = k.ravel().tolist()
        out.append(e)
    return out


class COCOInstanceEvaluator(DatasetEvaluator):
    """COCO bbox / segm / keypoints AP of an instance model over a COCO-format dataset.

    Args:
        gt: COCO ground truth (path or dict); inputs carry its ``image_id``.
        class_names: the model's class names, mapped to categories by name; default:
            contiguous class ``i`` is the ``i``-th category in ascending id order
            (detectron2's ``thing_dataset_id_to_contiguous_id``).
        iou_types: default: ``bbox``, plus ``segm`` / ``keypoints`` when predicted.
    """

    def __init__(
        self,
        gt: str | os.PathLike[str] | dict[str, Any],
        class_names: Sequence[str] | None = None,
        iou_types: Sequence[str] | None = None,
    ) -> None:
        self._gt = parse_ground_truth(gt)
        self._cat_map = map_categories(class_names, self._gt) if class_names else self._gt.cat_ids.tolist()
        self._iou_types = tuple(iou_types) if iou_types else None
        self.reset()

    def reset(self) -> None:
        self._results: list[dict[str, Any]] = []

    def process(self, inputs: Sequence[dict[str, Any]], outputs: Sequence[Any]) -> None:
        for inp, out in zip(inputs, outputs, strict=True):
            image_id = int(inp["image_id"])
            if isinstance(out, Prediction):
                self._results += prediction_entries(out, image_id, self._cat_map)
            else:
                self._results += _entries_from_instances(out["instances"], image_id, self._cat_map)

    def evaluate(self) -> OrderedDict[str, dict[str, float]]:
        # Without iou_types, parse_results picks them from the first entry: bbox, plus segm
        # when masks were predicted; keypoints alone when keypoints were.
        dets = parse_results(self._results, self._gt, self._iou_types)
        metrics, _ = evaluate_loaded(self._gt, dets)
        out: OrderedDict[str, dict[str, float]] = OrderedDict()
        for iou_type, res in metrics.items():
            figures = {k: _percent(v) for k, v in res["stats"].items()}
            figures.update({f"AP-{c['name']}": _percent(c["AP"]) for c in res["per_category"]})
            out[iou_type] = figures
        logger.info("COCO evaluation: %s", dict(out))
        return out


class SemanticEvaluator(DatasetEvaluator):
    """mIoU, fwIoU, mACC, pACC and per-class IoU / accuracy, as detectron2's ``SemSegEvaluator``.

    Ground truth is read from ``inputs[i]["sem_seg_file_name"]`` (as detectron2 does), else
    taken from ``inputs[i]["sem_seg"]``.
    """

    def __init__(self, class_names: Sequence[str], ignore_label: int = 255) -> None:
        self._class_names = tuple(class_names)
        self._ignore_label = ignore_label
        self.reset()

    def reset(self) -> None:
        n = len(self._class_names)
        self._conf = np.zeros((n + 1, n + 1), np.int64)

    def process(self, inputs: Sequence[dict[str, Any]], outputs: Sequence[Any]) -> None:
        for inp, out in zip(inputs, outputs, strict=True):
            if isinstance(out, Prediction):
                assert out.semantic is not None, "a semantic evaluator needs semantic predictions"
                pred = np.asarray(out.semantic.labels)
            else:
                pred = out["sem_seg"].argmax(dim=0).cpu().numpy()
            if "sem_seg_file_name" in inp:
                gt, where = read_label_png(Path(inp["sem_seg_file_name"])), str(inp["sem_seg_file_name"])
            else:
                gt, where = np.asarray(inp["sem_seg"]), str(inp.get("file_name", "image"))
            update_confusion(self._conf, pred, gt, self._ignore_label, where)

    def evaluate(self) -> OrderedDict[str, dict[str, Any]]:
        return OrderedDict({"sem_seg": semantic_metrics(self._conf, self._class_names)})

    @property
    def confusion_matrix(self) -> np.ndarray:
        """Pixel counts, rows = prediction, columns = ground truth (last column: ignored)."""
        return self._conf.copy()
