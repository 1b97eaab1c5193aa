"""Property-based agreement with pycocotools on generated datasets and settings.

Each example draws a small dataset (annotation ids from 0 or 1, crowd regions, tied scores,
images without ground truth or detections, sometimes more than 100 detections for one
(image, category)) and user settings (max detections, IoU thresholds, area ranges, image
and category subsets, class-agnostic, segm area rule), and checks every figure against
pycocotools run on the same inputs the way a user script would run it.

``CVSERVE_EVAL_EXAMPLES`` sets the examples per test (default 60); with ``CI`` set the
examples are derandomised, so a CI run is reproducible.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cvserve.models.evaluation.coco import evaluate_loaded, stat_names
from cvserve.models.evaluation.coco_io import parse_ground_truth, parse_results
from cvserve.models.evaluation.params import EvalSettings
from tests.fixtures.coco.reference import detectron2_per_category_ap, pycocotools_eval
from tests.fixtures.coco.strategies import datasets, eval_settings

TOL = 1e-9
PROFILE = settings(
    max_examples=int(os.environ.get("CVSERVE_EVAL_EXAMPLES", "60")),
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


def _agree(gt: dict[str, Any], results: list[dict[str, Any]], iou_type: str, s: EvalSettings) -> None:
    truth = parse_ground_truth(gt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        metrics, arrays = evaluate_loaded(truth, parse_results(results, truth, (iou_type,)), (iou_type,), s)
        ref = pycocotools_eval(gt, results, iou_type, s)
    ours = arrays[iou_type]
    names = stat_names(s.params(iou_type))
    assert list(metrics[iou_type]["stats"]) == names
    expected = np.array(ref.stats)
    if iou_type != "keypoints" and s.params(iou_type).max_dets[2] != 100:
        # pycocotools' summarize reads AP at a literal 100 detections; ours at max_dets[2].
        p = ref.eval["precision"][:, :, :, 0, 2]
        expected[0] = p[p > -1].mean() if (p > -1).any() else -1
    np.testing.assert_allclose(list(metrics[iou_type]["stats"].values()), expected, rtol=0, atol=TOL)
    for key in ("precision", "recall", "scores"):
        assert getattr(ours, key).shape == ref.eval[key].shape
        np.testing.assert_allclose(getattr(ours, key), ref.eval[key], rtol=0, atol=TOL)
    if s.use_cats:
        per_cat = [c["AP"] for c in metrics[iou_type]["per_category"]]
        expected = [-1.0 if np.isnan(v) else v for v in detectron2_per_category_ap(ref)]
        np.testing.assert_allclose(per_cat, expected, rtol=0, atol=TOL)


@PROFILE
@given(st.data())
def test_bbox_and_segm_agree_with_pycocotools(data: st.DataObject) -> None:
    gt, results = data.draw(datasets())
    s = data.draw(eval_settings(gt))
    for iou_type in ("bbox", "segm"):
        _agree(gt, results, iou_type, s)


@PROFILE
@given(st.data())
def test_keypoints_agree_with_pycocotools(data: st.DataObject) -> None:
    gt, results = data.draw(datasets(keypoints=True))
    _agree(gt, results, "keypoints", data.draw(eval_settings(gt, keypoints=True)))


@settings(PROFILE, max_examples=max(5, PROFILE.max_examples // 3))
@given(st.data())
@pytest.mark.parametrize("engine", ["pycocotools", "faster-coco-eval"])
def test_reference_engines_agree_with_pycocotools(engine: str, data: st.DataObject) -> None:
    gt, results = data.draw(datasets())
    s = data.draw(eval_settings(gt))
    _agree(gt, results, "bbox", EvalSettings(**{**s.__dict__, "engine": engine}))
    _agree(gt, results, "segm", EvalSettings(**{**s.__dict__, "engine": engine}))


def test_a_match_to_annotation_id_0_is_a_false_positive_unless_renumbered() -> None:
    """pycocotools stores the matched annotation's id and reads 0 as unmatched."""
    gt = {"images": [{"id": 1, "width": 50, "height": 50}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": i, "image_id": 1, "category_id": 1, "bbox": [10.0 * i, 0, 8, 8],
                           "area": 64.0, "iscrowd": 0} for i in range(2)]}  # fmt: skip
    results = [{"image_id": 1, "category_id": 1, "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"]]
    truth = parse_ground_truth(gt)
    dets = parse_results(results, truth)
    as_pycocotools, _ = evaluate_loaded(truth, dets)
    ref = pycocotools_eval(gt, results, "bbox")
    assert as_pycocotools["bbox"]["stats"]["AR100"] == pytest.approx(0.5) == ref.stats[8]
    corrected, _ = evaluate_loaded(truth, dets, settings=EvalSettings(renumber_ids=True))
    assert corrected["bbox"]["stats"]["AP"] == pytest.approx(1.0)
    assert corrected["bbox"]["stats"]["AR100"] == pytest.approx(1.0)


def _corners(d: tuple[dict[str, Any], list[dict[str, Any]]]) -> set[str]:
    gt, results = d
    images = {im["id"] for im in gt["images"]}
    groups = np.unique([(r["image_id"], r["category_id"]) for r in results], axis=0, return_counts=True)[1]
    found = {
        "id 0": any(a["id"] == 0 for a in gt["annotations"]),
        "crowd": any(a["iscrowd"] for a in gt["annotations"]),
        "over 100 detections": max(groups, default=0) > 100,
        "over 20 detections": max(groups, default=0) > 20,  # keypoints' only limit
        "tied scores": len({r["score"] for r in results}) < len(results),
        "image without ground truth": bool(images - {a["image_id"] for a in gt["annotations"]}),
        "image without detections": bool(images - {r["image_id"] for r in results}),
    }
    return {k for k, v in found.items() if v}


@pytest.mark.parametrize("keypoints", [False, True], ids=["bbox-segm", "keypoints"])
def test_strategies_reach_the_corners(keypoints: bool) -> None:
    """Among as many examples as the agreement tests draw, the generator produces every corner."""
    seen: set[str] = set()

    @settings(PROFILE, derandomize=True, database=None, phases=[Phase.generate])
    @given(datasets(keypoints=keypoints))
    def collect(d: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
        seen.update(_corners(d))

    collect()
    # Keypoints are evaluated at pycocotools' fixed 20 detections per image: past 20 is their corner.
    limit = "over 20 detections" if keypoints else "over 100 detections"
    assert seen >= {"id 0", "crowd", limit, "tied scores", "image without ground truth",
                    "image without detections"}  # fmt: skip
