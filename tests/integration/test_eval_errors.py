"""Malformed inputs to ``cvserve eval`` exit with code 2 and a message naming file, entry and field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
CVSERVE = [sys.executable, "-m", "cvserve"]

GT: dict[str, Any] = {
    "images": [{"id": 1, "width": 40, "height": 30, "file_name": "a.png"}, {"id": 2, "width": 40, "height": 30}],
    "categories": [{"id": 5, "name": "red"}, {"id": 6, "name": "green"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 8], "area": 80, "iscrowd": 0,
         "segmentation": [[1, 2, 11, 2, 11, 10, 1, 10]]},
    ],
}  # fmt: skip
GOOD = {"image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 8], "score": 0.9}


def _cvserve(tmp_path: Path, gt: Any, results: Any, *extra: str) -> subprocess.CompletedProcess[str]:
    def write(name: str, value: Any) -> Path:
        path = tmp_path / name
        if isinstance(value, bytes):
            path.write_bytes(value)
        else:
            path.write_text(value if isinstance(value, str) else json.dumps(value))
        return path

    gt_path, res_path = write("gt.json", gt), write("results.json", results)
    cmd = [*CVSERVE, "eval", "--gt", str(gt_path), "--results", str(res_path),
           "--out", str(tmp_path / "out"), "--no-plots", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def _with(**changes: Any) -> dict[str, Any]:
    entry = {**GOOD, **changes}
    return {k: v for k, v in entry.items() if v is not _DROP}


_DROP = object()

RESULT_CASES = {
    "missing-score": ([_with(score=_DROP)], "entry 0: field 'score': expected a finite number, got None"),
    "unknown-image": ([GOOD, _with(image_id=99)], "entry 1: field 'image_id': 99 (int) is not an image id of"),
    "unknown-category": ([_with(category_id=7)], "entry 0: field 'category_id': 7 (int) is not a category id"),
    "score-wrong-type": ([_with(score="0.9")], "entry 0: field 'score': expected a finite number, got '0.9' (str)"),
    "image-id-wrong-type": ([_with(image_id="1")], "entry 0: field 'image_id': '1' (str) is not an image id"),
    "bbox-wrong-length": ([GOOD, GOOD, _with(bbox=[1, 2, 3])], "entry 2: field 'bbox': expected [x, y, width, height]"),
    "bbox-negative-size": ([_with(bbox=[1, 2, -3, 4])], "entry 0: field 'bbox'"),
    "nan-score": ('[{"image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "score": NaN}]',
                  "entry 0: field 'score': expected a finite number, got nan (float)"),
    "not-a-list": ({"annotations": []}, "expected a JSON list of detections, got {'annotations': []} (dict)"),
    "entry-not-object": ([GOOD, 3], "entry 1: expected an object, got 3 (int)"),
    "empty-file": ("", "results file is empty"),
    "not-json": ("[{'image_id': 1}]", "results file is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 3"),
    "segm-missing": ([GOOD], "entry 0: field 'segmentation' is missing (needed for segm evaluation)"),
    "segm-bad-rle-size": ([_with(segmentation={"size": [10, 10], "counts": "abc"})],
                          "entry 0: field 'segmentation': RLE 'size' must be the image's [height, width] = [30, 40]"),
    "segm-bad-polygon": ([_with(segmentation=[[1, 2, 3]])], "entry 0: field 'segmentation': polygon must be a list of at least 2"),
    "keypoints-wrong-length": ([_with(keypoints=[1, 2, 2])], "entry 0: field 'keypoints': expected 51 finite numbers"),
}  # fmt: skip
EXTRA = {"segm-missing": ["--iou-type", "segm"], "segm-bad-rle-size": ["--iou-type", "segm"],
         "segm-bad-polygon": ["--iou-type", "segm"], "keypoints-wrong-length": ["--iou-type", "keypoints"]}  # fmt: skip


KEYPOINT_GT = {
    **GT,
    "annotations": [{**GT["annotations"][0], "keypoints": [5, 5, 2] * 17, "num_keypoints": 17}],
}


@pytest.mark.parametrize("case", sorted(RESULT_CASES))
def test_malformed_results(tmp_path: Path, case: str) -> None:
    results, message = RESULT_CASES[case]
    proc = _cvserve(tmp_path, KEYPOINT_GT if "keypoints" in case else GT, results, *EXTRA.get(case, []))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cvserve eval: error: {tmp_path / 'results.json'}" in proc.stderr
    assert message in proc.stderr


def _gt_with(**changes: Any) -> dict[str, Any]:
    ann = {**GT["annotations"][0], **changes}
    return {**GT, "annotations": [{k: v for k, v in ann.items() if v is not _DROP}]}


GT_CASES = {
    "missing-images": ({"annotations": [], "categories": []}, "field 'images': expected a list, got None"),
    "annotation-missing-area": (_gt_with(area=_DROP), "annotations[0] (id 1): field 'area': expected a finite number >= 0, got None"),
    "annotation-unknown-image": (_gt_with(image_id=3), "annotations[0] (id 1): field 'image_id': 3 (int) is not an id in 'images'"),
    "annotation-unknown-category": (_gt_with(category_id=1), "annotations[0] (id 1): field 'category_id': 1 (int) is not an id in 'categories'"),
    "annotation-bbox-strings": (_gt_with(bbox=["1", 2, 3, 4]), "annotations[0] (id 1): field 'bbox'"),
    "category-without-name": ({**GT, "categories": [{"id": 5}]}, "categories[0]: field 'name': expected a string, got None"),
    "empty-file": ("", "ground truth file is empty"),
    "not-json": (b"\x89PNG\r\n", "ground truth file is not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(GT_CASES))
def test_malformed_ground_truth(tmp_path: Path, case: str) -> None:
    gt, message = GT_CASES[case]
    proc = _cvserve(tmp_path, gt, [GOOD])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cvserve eval: error: {tmp_path / 'gt.json'}" in proc.stderr
    assert message in proc.stderr


def test_missing_file_is_named(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [*CVSERVE, "eval", "--gt", str(tmp_path / "nope.json"), "--results", "r.json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    assert f"{tmp_path / 'nope.json'}: ground truth file not found" in proc.stderr


def test_argument_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [*CVSERVE, "eval", "--results", "r.json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2
    assert "--results needs --gt" in proc.stderr
