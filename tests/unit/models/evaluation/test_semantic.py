"""Semantic metrics give the same numbers as detectron2's SemSegEvaluator on the same inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvserve.models.evaluation.errors import EvaluationInputError
from cvserve.models.evaluation.evaluators import SemanticEvaluator
from cvserve.models.evaluation.semantic import evaluate_semantic

CLASSES = ("background", "road", "car", "sky", "never-seen")


def _dataset(tmp_path: Path, seed: int, n: int = 4) -> tuple[list[np.ndarray], list[np.ndarray], list[dict]]:
    rng = np.random.default_rng(seed)
    preds, labels, records = [], [], []
    for i in range(n):
        h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        gt = rng.integers(0, 4, (h, w)).astype(np.uint8)  # class 4 never in the ground truth...
        gt[rng.random((h, w)) < 0.1] = 255  # ...and some pixels ignored
        pred = np.where(rng.random((h, w)) < 0.6, np.minimum(gt, 4), rng.integers(0, 5, (h, w))).astype(
            np.int64
        )
        pred[0, 0] = 4  # ...but predicted: detectron2 counts it in the mIoU denominator
        label_path = tmp_path / f"{i}.png"
        Image.fromarray(gt).save(label_path)
        preds.append(pred)
        labels.append(gt)
        records.append(
            {"file_name": f"img{i}.jpg", "sem_seg_file_name": str(label_path), "height": h, "width": w}
        )
    return preds, labels, records


def _detectron2_results(name: str, preds: list[np.ndarray], records: list[dict]) -> dict:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator

    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=list(CLASSES), ignore_label=255)
    evaluator = SemSegEvaluator(name, distributed=False)
    evaluator.reset()
    for pred, rec in zip(preds, records, strict=True):
        logits = torch.nn.functional.one_hot(torch.from_numpy(pred), len(CLASSES)).permute(2, 0, 1).float()
        evaluator.process([rec], [{"sem_seg": logits}])
    return evaluator.evaluate()["sem_seg"]


def _assert_same(ours: dict, theirs: dict) -> None:
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        if math.isnan(value):
            assert math.isnan(ours[key]), key
        else:
            assert ours[key] == pytest.approx(value, rel=0, abs=1e-9), key


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_detectron2_sem_seg_evaluator(tmp_path: Path, seed: int) -> None:
    preds, labels, records = _dataset(tmp_path, seed)
    theirs = _detectron2_results(f"cvserve_semseg_test_{seed}", preds, records)
    assert math.isnan(theirs["IoU-never-seen"])  # the fixture exercises the absent-class convention
    _assert_same(evaluate_semantic(preds, labels, CLASSES), theirs)

    evaluator = SemanticEvaluator(CLASSES)
    evaluator.reset()
    for pred, rec in zip(preds, records, strict=True):
        logits = torch.nn.functional.one_hot(torch.from_numpy(pred), len(CLASSES)).permute(2, 0, 1).float()
        evaluator.process([rec], [{"sem_seg": logits}])
    _assert_same(evaluator.evaluate()["sem_seg"], theirs)


def test_directories_of_pngs(tmp_path: Path) -> None:
    labels_dir, preds_dir = tmp_path / "labels", tmp_path / "preds"
    labels_dir.mkdir()
    preds_dir.mkdir()
    preds, labels, _ = _dataset(labels_dir, 3)
    for i, pred in enumerate(preds):
        Image.fromarray(pred.astype(np.uint8)).save(preds_dir / f"{i}.png")
    from_files = evaluate_semantic(preds_dir, labels_dir, CLASSES)
    from_arrays = evaluate_semantic(preds, labels, CLASSES)
    assert from_files["confusion_matrix"] == from_arrays["confusion_matrix"]
    assert from_files["num_images"] == len(preds)
    _assert_same(from_files, {k: v for k, v in from_arrays.items() if isinstance(v, float)})


def test_perfect_prediction_and_ignore_label() -> None:
    gt = np.array([[0, 1, 2], [2, 255, 1]], np.uint8)
    pred = np.array([[0, 1, 2], [2, 0, 1]])
    res = evaluate_semantic([pred], [gt], CLASSES[:3])
    assert res["mIoU"] == 100.0 and res["pACC"] == 100.0
    conf = np.array(res["confusion_matrix"])
    assert conf[:, -1].sum() == 1  # the ignored pixel is only in the ignore column


def test_bad_labels_are_named() -> None:
    with pytest.raises(EvaluationInputError, match="image 0: label value 7 is neither a class"):
        evaluate_semantic([np.zeros((2, 2), int)], [np.full((2, 2), 7)], CLASSES[:3])
    with pytest.raises(EvaluationInputError, match="image 0: prediction is 2x2 but the label map is 3x2"):
        evaluate_semantic([np.zeros((2, 2), int)], [np.zeros((3, 2), int)], CLASSES[:3])
