"""``cvserve eval --results`` takes annotate's output unchanged: folder ids and COCO json ids alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from cvserve.cli.main import main

REPO = """\
models:
  - name: det
    task: instance
    config: unused
    handler: tests.fixtures.fake_models:build_fake
"""
# Ids and order unlike the model's 1..3, so only a mapping by name gets them right.
COCO_CATEGORIES = [{"id": 11, "name": "blue"}, {"id": 3, "name": "green"}, {"id": 7, "name": "red"}]

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _images(folder: Path) -> None:
    for i in range(12):
        rgb = np.zeros((48, 64, 3), np.uint8)
        rgb[:, : 20 + 2 * i, i % 3] = 240
        rgb[10 + i :, 30:, (i + 1) % 3] = 250
        path = folder / f"g{i % 2}" / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rgb[..., ::-1])


def _ground_truth(
    results: list[dict[str, Any]], doc: dict[str, Any], ids: dict[int, int], categories: list[dict[str, Any]]
) -> dict[str, Any]:
    """A COCO dataset whose annotations are exactly the given results, with image ids
    renumbered by ``ids`` and category ids taken from ``categories`` by name."""
    names = {c["id"]: c["name"] for c in doc["categories"]}
    by_name = {c["name"]: c["id"] for c in categories}
    annotations = []
    for n, r in enumerate(results, start=1):
        rle = {**r["segmentation"], "counts": r["segmentation"]["counts"].encode()}
        annotations.append(
            {
                "id": n,
                "image_id": ids[r["image_id"]],
                "category_id": by_name[names[r["category_id"]]],
                "bbox": r["bbox"],
                "segmentation": r["segmentation"],
                "area": float(mask_util.area(rle)),
                "iscrowd": 0,
            }
        )
    images = [{**img, "id": ids[img["id"]]} for img in doc["images"]]
    return {"images": images, "categories": categories, "annotations": annotations}


def _evaluate(gt: Path, results: Path, out: Path) -> dict[str, float]:
    assert main(["eval", "--gt", str(gt), "--results", str(results), "--out", str(out), "--no-plots"]) == 0
    metrics = json.loads((out / "report.json").read_text())["metrics"]
    return {iou: metrics[iou]["stats"]["AP"] for iou in ("bbox", "segm")}


def test_perfect_predictions_score_ap_1_through_cvserve_eval(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(REPO)
    _images(tmp_path / "images")
    common = ["--model", "det", "--models", str(tmp_path / "models.yaml"), "--quiet"]
    first = tmp_path / "a" / "results.json"
    assert main(["annotate", str(tmp_path / "images"), *common, "--out", str(first)]) == 0
    results = json.loads(first.read_text())
    doc = json.loads(first.with_name("results.images.json").read_text())
    assert len(results) > 12

    # The folder run's files as they are: its images file and results against the same predictions.
    gt_same = tmp_path / "gt_same.json"
    same_ids = {img["id"]: img["id"] for img in doc["images"]}
    gt_same.write_text(json.dumps(_ground_truth(results, doc, same_ids, doc["categories"])))
    assert _evaluate(gt_same, first, tmp_path / "eval-a") == {"bbox": 1.0, "segm": 1.0}

    # A COCO json with other image and category ids as input: its ids are kept, categories
    # mapped by name, and the results evaluate unchanged against it.
    gt = tmp_path / "gt.json"
    other_ids = {img["id"]: 500 + img["id"] for img in doc["images"]}
    gt.write_text(json.dumps(_ground_truth(results, doc, other_ids, COCO_CATEGORIES)))
    second = tmp_path / "b" / "results.json"
    argv = ["annotate", str(gt), "--image-root", str(tmp_path / "images"), *common, "--out", str(second)]
    assert main(argv) == 0
    assert {r["image_id"] for r in json.loads(second.read_text())} == set(other_ids.values())
    assert _evaluate(gt, second, tmp_path / "eval-b") == {"bbox": 1.0, "segm": 1.0}
