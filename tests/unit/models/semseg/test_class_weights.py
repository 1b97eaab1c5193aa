"""Class weights for the segmenter's loss: pixel frequencies, ENet weights, parsing."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvserve.models.semseg.class_weights import (
    BALANCED,
    balanced_class_weights,
    label_frequencies,
    parse_class_weights,
)


def _labels(tmp_path: Path, *maps: np.ndarray) -> list[dict[str, str]]:
    records = []
    for i, m in enumerate(maps):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), m.astype(np.uint8))
        records.append({"sem_seg_file_name": str(path)})
    return records


def test_frequencies_count_labelled_pixels_only(tmp_path: Path) -> None:
    a = np.zeros((4, 4))
    a[0, :2] = 1
    a[3, 3] = 255  # ignored: not in the denominator
    b = np.full((2, 2), 2)
    freq = label_frequencies(_labels(tmp_path, a, b), num_classes=3)
    assert freq.tolist() == pytest.approx([13 / 19, 2 / 19, 4 / 19])


def test_stray_label_and_unreadable_file_name_the_file(tmp_path: Path) -> None:
    records = _labels(tmp_path, np.full((2, 2), 7))
    with pytest.raises(ValueError, match=r"0.png: label value 7 is neither a class \(0..2\) nor the ignore"):
        label_frequencies(records, num_classes=3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"bad\.png: not a single-channel label PNG"):
        label_frequencies([{"sem_seg_file_name": str(bad)}], num_classes=3)


def test_only_ignored_pixels_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no labelled pixel"):
        label_frequencies(_labels(tmp_path, np.full((2, 2), 255)), num_classes=2)


def test_balanced_weights_are_enets() -> None:
    weights = balanced_class_weights([0.9, 0.08, 0.02, 0.0])
    assert weights == pytest.approx([1 / math.log(1.02 + p) for p in (0.9, 0.08, 0.02, 0.0)], abs=1e-4)
    assert weights[0] < weights[1] < weights[2] < weights[3] < 51  # rarer weighs more, capped
    with pytest.raises(ValueError, match="c must be > 1"):
        balanced_class_weights([0.5], c=1.0)


def test_parse() -> None:
    assert parse_class_weights(" balanced ") == BALANCED
    assert parse_class_weights("1,2.5", num_classes=2) == [1.0, 2.5]
    for text, message in [
        ("1,x", "comma-separated numbers"),
        ("1,0", "positive"),
        ("1,nan", "positive"),
        ("1,2,3", "3 class weights for 2 classes"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_class_weights(text, num_classes=2)
