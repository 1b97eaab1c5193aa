"""The vectorised COCOeval agrees with pycocotools on deterministic synthetic datasets."""

from __future__ import annotations

import numpy as np
import pytest

from cvserve.models.evaluation import evaluate_coco
from cvserve.models.evaluation.coco import evaluate_loaded
from cvserve.models.evaluation.coco_io import parse_ground_truth, parse_results
from tests.fixtures.coco.reference import detectron2_per_category_ap, pycocotools_eval
from tests.fixtures.coco.synth import SynthConfig, make_dataset

TOL = 1e-9

CONFIGS = {
    "default": SynthConfig(seed=0),
    "crowd-heavy": SynthConfig(seed=1, crowd_fraction=0.35),
    "empty-images": SynthConfig(seed=2, empty_gt_fraction=0.4, empty_dt_fraction=0.4),
    "over-100-dets": SynthConfig(seed=3, crowded_images=4, num_images=8),
    "many-categories": SynthConfig(seed=4, num_categories=60, num_images=80, gt_per_image=6),
    "all-areas": SynthConfig(seed=5, size=(120, 400), num_images=25),
    "tied-scores": SynthConfig(seed=6, score_levels=3, gt_per_image=8, dets_per_image=25),
    "rle-and-polygon-results": SynthConfig(seed=7, rle_results=0.5),
    "continuous-scores": SynthConfig(seed=8, score_levels=0),
}


def _check(gt: dict, results: list, iou_type: str, metrics: dict, arrays: dict) -> None:
    ref = pycocotools_eval(gt, results, iou_type)
    ours = arrays[iou_type]
    assert metrics[iou_type]["stats"]["AP"] > 0  # a fixture where nothing matches would prove little
    np.testing.assert_allclose(list(metrics[iou_type]["stats"].values()), ref.stats, rtol=0, atol=TOL)
    np.testing.assert_allclose(ours.precision, ref.eval["precision"], rtol=0, atol=TOL)
    np.testing.assert_allclose(ours.recall, ref.eval["recall"], rtol=0, atol=TOL)
    np.testing.assert_allclose(ours.scores, ref.eval["scores"], rtol=0, atol=TOL)
    per_cat = [c["AP"] for c in metrics[iou_type]["per_category"]]
    expected = [-1.0 if np.isnan(v) else v for v in detectron2_per_category_ap(ref)]
    np.testing.assert_allclose(per_cat, expected, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bbox_and_segm_agree_with_pycocotools(name: str) -> None:
    gt, results = make_dataset(CONFIGS[name])
    truth = parse_ground_truth(gt)
    metrics, arrays = evaluate_loaded(truth, parse_results(results, truth, ("bbox", "segm")))
    for iou_type in ("bbox", "segm"):
        _check(gt, results, iou_type, metrics, arrays)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keypoints_agree_with_pycocotools(seed: int) -> None:
    gt, results = make_dataset(
        SynthConfig(seed=20 + seed, keypoints=True, segm=False, num_images=30, size=(100, 300))
    )
    truth = parse_ground_truth(gt)
    metrics, arrays = evaluate_loaded(truth, parse_results(results, truth))
    assert list(metrics) == ["keypoints"]
    _check(gt, results, "keypoints", metrics, arrays)


def test_fixtures_cover_the_corner_cases() -> None:
    """The datasets above really contain what their names promise."""
    gt, results = make_dataset(CONFIGS["over-100-dets"])
    per_image = np.bincount([r["image_id"] - 1000 for r in results])
    assert per_image.max() > 100
    gt, _ = make_dataset(CONFIGS["all-areas"])
    areas = np.array([a["area"] for a in gt["annotations"]])
    assert (areas < 32**2).any() and ((areas > 32**2) & (areas < 96**2)).any() and (areas > 96**2).any()
    gt, results = make_dataset(CONFIGS["crowd-heavy"])
    crowd = [a for a in gt["annotations"] if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
    gt, results = make_dataset(CONFIGS["empty-images"])
    with_gt = {a["image_id"] for a in gt["annotations"]}
    with_dt = {r["image_id"] for r in results}
    ids = {im["id"] for im in gt["images"]}
    assert ids - with_gt and ids - with_dt
    _, results = make_dataset(CONFIGS["rle-and-polygon-results"])
    kinds = {type(r["segmentation"]).__name__ for r in results}
    assert kinds == {"dict", "list"}


def test_perfect_predictions_score_one() -> None:
    gt, _ = make_dataset(SynthConfig(seed=9, crowd_fraction=0.0, empty_gt_fraction=0.0))
    # A sliver of a polygon rasterises to an empty mask, which overlaps nothing, even itself.
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] >= 4]
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
         "segmentation": a["segmentation"]}
        for a in gt["annotations"]
    ]  # fmt: skip
    metrics = evaluate_coco(gt, results, ["bbox", "segm"])
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["stats"]["AP"] == pytest.approx(1.0, abs=1e-12)
        assert metrics[iou_type]["stats"]["AR100"] == pytest.approx(1.0, abs=1e-12)


def test_empty_results_score_zero_where_ground_truth_exists() -> None:
    gt, _ = make_dataset(SynthConfig(seed=10))
    stats = evaluate_coco(gt, [])["bbox"]["stats"]
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0
    assert stats["APl"] == -1.0  # no large objects at this image size: undefined, as pycocotools says


def test_polygon_results_equal_their_rle() -> None:
    gt, results = make_dataset(CONFIGS["rle-and-polygon-results"])
    from tests.fixtures.coco.reference import polygons_to_rle

    a = evaluate_coco(gt, results, ["segm"])
    b = evaluate_coco(gt, polygons_to_rle(gt, results), ["segm"])
    assert a == b


def test_accepts_a_pycocotools_coco_object() -> None:
    from pycocotools.coco import COCO

    gt, results = make_dataset(SynthConfig(seed=11))
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert evaluate_coco(coco, results, ["bbox"]) == evaluate_coco(gt, results, ["bbox"])
