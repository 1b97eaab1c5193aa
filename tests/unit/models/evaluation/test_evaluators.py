"""The DatasetEvaluator adapters work with detectron2's ``inference_on_dataset``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from cvserve.models.evaluation import evaluate_coco
from cvserve.models.evaluation.evaluators import COCOInstanceEvaluator, SemanticEvaluator
from cvserve.models.types import Instance, Mask, Prediction
from tests.fixtures.coco.synth import SynthConfig, make_dataset

# pycocotools' decode (used here to build detectron2 masks) trips a numpy 2 deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _inference(model, loader, evaluator):  # type: ignore[no-untyped-def]
    from detectron2.evaluation import inference_on_dataset

    return inference_on_dataset(model, loader, evaluator)


def _instances_from(results: list[dict], image: dict):  # type: ignore[no-untyped-def]
    from detectron2.structures import Boxes, Instances

    mine = [r for r in results if r["image_id"] == image["id"]]
    inst = Instances((image["height"], image["width"]))
    boxes = np.array([r["bbox"] for r in mine], np.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    inst.pred_boxes = Boxes(torch.from_numpy(boxes))
    inst.scores = torch.tensor([r["score"] for r in mine], dtype=torch.float32)
    inst.pred_classes = torch.tensor([CAT_INDEX[r["category_id"]] for r in mine], dtype=torch.int64)
    masks = [mask_util.decode(r["segmentation"]) for r in mine]
    inst.pred_masks = torch.from_numpy(
        np.stack(masks).astype(bool) if masks else np.zeros((0, image["height"], image["width"]), bool)
    )
    return inst


CAT_INDEX: dict[int, int] = {}


def test_coco_evaluator_with_detectron2_instances() -> None:
    gt, results = make_dataset(SynthConfig(seed=30, rle_results=1.0, crowded_images=0))
    CAT_INDEX.update({c["id"]: i for i, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))})
    # detectron2 keeps boxes and scores in float32: the reference gets the same values.
    for r in results:
        r["bbox"] = [
            float(v)
            for v in np.float32([*r["bbox"][:2], r["bbox"][0] + r["bbox"][2], r["bbox"][1] + r["bbox"][3]])
        ]
        r["bbox"][2:] = [r["bbox"][2] - r["bbox"][0], r["bbox"][3] - r["bbox"][1]]
        r["score"] = float(np.float32(r["score"]))
    loader = [[{"image_id": im["id"]}] for im in gt["images"]]
    by_id = {im["id"]: im for im in gt["images"]}

    def model(batch: list[dict]) -> list[dict]:
        return [{"instances": _instances_from(results, by_id[b["image_id"]])} for b in batch]

    out = _inference(model, loader, COCOInstanceEvaluator(gt))
    expected = evaluate_coco(gt, results, ["bbox", "segm"])
    assert set(out) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert out[iou_type]["AP"] == pytest.approx(100 * expected[iou_type]["stats"]["AP"], abs=1e-6)
        first = expected[iou_type]["per_category"][0]
        ap = out[iou_type][f"AP-{first['name']}"]
        assert (math.isnan(ap) and first["AP"] == -1) or ap == pytest.approx(100 * first["AP"], abs=1e-6)


def test_coco_evaluator_with_predictions_and_class_names() -> None:
    gt = {
        "images": [{"id": 1, "height": 20, "width": 20}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}
        ],
    }
    m = np.zeros((20, 20), np.uint8)
    m[2:12, 2:12] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    pred = Prediction((20, 20), (Instance((2, 2, 12, 12), 1, 0.9, Mask((20, 20), rle["counts"])),))
    evaluator = COCOInstanceEvaluator(gt, class_names=("dog", "cat"), iou_types=["bbox"])
    out = _inference(lambda batch: [pred for _ in batch], [[{"image_id": 1}]], evaluator)
    assert out["bbox"]["AP"] == pytest.approx(100.0, abs=1e-12)
    assert math.isnan(out["bbox"]["AP-dog"])  # no ground truth: undefined, as detectron2 reports


def test_semantic_evaluator_with_predictions() -> None:
    gt = np.array([[0, 1], [1, 255]])
    from cvserve.models.types import SemanticMap

    pred = Prediction((2, 2), semantic=SemanticMap(np.array([[0, 1], [0, 1]]), ("a", "b")))
    out = _inference(lambda batch: [pred for _ in batch], [[{"sem_seg": gt}]], SemanticEvaluator(("a", "b")))
    assert out["sem_seg"]["pACC"] == pytest.approx(100 * 2 / 3)
    assert out["sem_seg"]["IoU-a"] == pytest.approx(50.0)
