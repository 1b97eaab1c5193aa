"""Dataset registration with detectron2 and COCO -> semantic label conversion."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from cvserve.models.data.datasets import (
    coco_category_names,
    coco_to_semantic_labels,
    register_coco_split,
    register_semantic_split,
)
from cvserve.models.data.synthetic import CATEGORIES, IGNORE_LABEL, SplitPaths, generate_dataset


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> SplitPaths:
    root = tmp_path_factory.mktemp("ds")
    return generate_dataset(root, seed=11, splits={"train": 12}, image_size=(80, 96))["train"]


def test_register_coco_split_sets_metadata_and_loads(split: SplitPaths) -> None:
    register_coco_split("test_ds_coco", split)
    register_coco_split("test_ds_coco", split)  # idempotent
    meta = MetadataCatalog.get("test_ds_coco")
    assert meta.thing_classes == list(CATEGORIES)
    assert meta.evaluator_type == "coco"
    records = DatasetCatalog.get("test_ds_coco")
    assert len(records) == 12
    assert all(Path(r["file_name"]).is_file() for r in records)
    assert sum(len(r["annotations"]) for r in records) > 12
    assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(len(CATEGORIES))}


def test_register_coco_split_conflict_raises(split: SplitPaths, tmp_path: Path) -> None:
    register_coco_split("test_ds_conflict", split)
    other = tmp_path / "other.json"
    data = json.loads(split.instances_json.read_text())
    other.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="already registered with different settings"):
        register_coco_split("test_ds_conflict", SplitPaths(split.images, other, split.semantic_labels))


def test_register_semantic_split(split: SplitPaths) -> None:
    names = ("background", *CATEGORIES)
    register_semantic_split("test_ds_sem", split.images, split.semantic_labels, names)
    register_semantic_split("test_ds_sem", split.images, split.semantic_labels, names)  # idempotent
    meta = MetadataCatalog.get("test_ds_sem")
    assert meta.stuff_classes == list(names)
    assert meta.ignore_label == IGNORE_LABEL
    assert meta.evaluator_type == "sem_seg"
    records = DatasetCatalog.get("test_ds_sem")
    assert len(records) == 12
    assert all(Path(r["sem_seg_file_name"]).stem == Path(r["file_name"]).stem for r in records)
    with pytest.raises(ValueError, match="label_dir"):
        register_semantic_split("test_ds_sem_bad", split.images, split.images / "nope", names)


def test_coco_to_semantic_labels_matches_generator(split: SplitPaths, tmp_path: Path) -> None:
    out = coco_to_semantic_labels(split.instances_json, tmp_path / "labels")
    for generated in sorted(split.semantic_labels.glob("*.png")):
        expected = cv2.imread(str(generated), cv2.IMREAD_UNCHANGED)
        converted = cv2.imread(str(out / generated.name), cv2.IMREAD_UNCHANGED)
        assert converted.shape == expected.shape
        # The generator also ignores a band on region borders; everywhere else they agree.
        keep = expected != IGNORE_LABEL
        np.testing.assert_array_equal(converted[keep], expected[keep])


def test_unreadable_json_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        coco_category_names(bad)
    with pytest.raises(ValueError, match="cannot read COCO instances file"):
        coco_category_names(tmp_path / "missing.json")
