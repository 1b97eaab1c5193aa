"""Input handling of the library API: accepted forms, inferred IoU types and edge cases."""

from __future__ import annotations

import pytest

from cvserve.models.evaluation import EvaluationInputError, evaluate_coco
from cvserve.models.evaluation.coco_io import parse_ground_truth, parse_results

GT = {
    "images": [{"id": 3, "width": 20, "height": 10}, {"id": 1, "width": 20, "height": 10}],
    "categories": [{"id": 9, "name": "b"}, {"id": 2, "name": "a"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4], "area": 16,
         "segmentation": {"size": [10, 20], "counts": [0, 4, 6, 4, 6, 4, 6, 4, 166]}},
    ],
}  # fmt: skip


def test_ids_are_sorted_and_indexed() -> None:
    gt = parse_ground_truth(GT)
    assert gt.image_ids.tolist() == [1, 3] and gt.cat_ids.tolist() == [2, 9]
    assert gt.cat_names == ["a", "b"]
    assert gt.img.tolist() == [0] and gt.cat.tolist() == [0]


def test_types_inferred_from_the_first_entry() -> None:
    gt = parse_ground_truth(GT)
    box = {"image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4], "score": 0.5}
    assert parse_results([box], gt).iou_types == ("bbox",)
    seg = {**box, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}
    assert parse_results([seg], gt).iou_types == ("bbox", "segm")
    kpt = {**box, "keypoints": [1.0, 1.0, 1] * 17}
    assert parse_results([kpt], gt).iou_types == ("keypoints",)
    assert parse_results([], gt).iou_types == ("bbox",)


def test_ground_truth_without_annotations_is_undefined_everywhere() -> None:
    stats = evaluate_coco(
        {**GT, "annotations": []}, [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 1.0}]
    )
    assert set(stats["bbox"]["stats"].values()) == {-1.0}


def test_uncompressed_rle_ground_truth_and_exact_match() -> None:
    det = {"image_id": 1, "category_id": 2, "bbox": [0, 0, 4, 4], "score": 0.5,
           "segmentation": {"size": [10, 20], "counts": [0, 4, 6, 4, 6, 4, 6, 4, 166]}}  # fmt: skip
    res = evaluate_coco(GT, [det])
    assert res["segm"]["stats"]["AP"] == pytest.approx(1.0) and res["bbox"]["stats"]["AP"] == pytest.approx(
        1.0
    )


@pytest.mark.parametrize(
    ("gt", "message"),
    [
        ({**GT, "images": [{"id": 1}, {"id": 1}]}, "images: duplicate image id 1"),
        (
            {**GT, "categories": [{"id": 2, "name": "a"}, {"id": 2, "name": "b"}]},
            "categories[1]: field 'id': duplicate",
        ),
        (
            {**GT, "images": [{"id": 1, "width": 0, "height": 5}]},
            "images[0]: field 'width': expected a positive integer",
        ),
        ([GT], "expected a COCO ground-truth object, got"),
    ],
)
def test_ground_truth_errors(gt: object, message: str) -> None:
    with pytest.raises(EvaluationInputError) as info:
        parse_ground_truth(gt)  # type: ignore[arg-type]
    assert str(info.value).startswith("<ground truth>: ") and message in str(info.value)


def test_segm_needs_image_sizes() -> None:
    gt = {**GT, "images": [{"id": 1}, {"id": 3}]}
    det = {
        "image_id": 1,
        "category_id": 2,
        "bbox": [0, 0, 4, 4],
        "score": 0.5,
        "segmentation": [[0, 0, 4, 0, 4, 4]],
    }
    with pytest.raises(
        EvaluationInputError, match="image 1: fields 'height' and 'width' are needed for segm"
    ):
        evaluate_coco(gt, [det], ["segm"])


def test_unknown_iou_type() -> None:
    with pytest.raises(EvaluationInputError, match="unknown IoU type 'mask'"):
        evaluate_coco(GT, [], ["mask"])
