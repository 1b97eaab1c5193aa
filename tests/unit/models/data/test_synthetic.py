"""The synthetic dataset: determinism, COCO validity and agreement with the label PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from cvserve.models.data.synthetic import CATEGORIES, IGNORE_LABEL, generate_dataset, main, render_image

SPLITS = {"train": 24, "val": 4}
SIZE = (96, 128)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return generate_dataset(tmp_path_factory.mktemp("shapes"), seed=3, splits=SPLITS, image_size=SIZE)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode(ann: dict, coco: COCO) -> np.ndarray:
    return coco.annToMask(ann).astype(bool)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    splits = {"train": 5, "val": 2}
    generate_dataset(tmp_path / "a", seed=1, splits=splits, image_size=(64, 80))
    generate_dataset(tmp_path / "b", seed=1, splits=splits, image_size=(64, 80))
    generate_dataset(tmp_path / "c", seed=2, splits=splits, image_size=(64, 80))
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 2 * (5 + 2) + 2
    assert a == b
    assert a["train/images/000000.png"] != c["train/images/000000.png"]


def test_layout_and_coco_loads_unchanged(dataset: dict) -> None:
    for split, count in SPLITS.items():
        paths = dataset[split]
        assert len(list(paths.images.glob("*.png"))) == count
        assert sorted(p.name for p in paths.semantic_labels.glob("*.png")) == sorted(
            p.name for p in paths.images.glob("*.png")
        )
        coco = COCO(str(paths.instances_json))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
        assert coco.getCatIds() == list(range(1, len(CATEGORIES) + 1))
        assert len(coco.getImgIds()) == count
        img = coco.loadImgs(coco.getImgIds()[0])[0]
        assert (img["height"], img["width"]) == SIZE
        assert cv2.imread(str(paths.images / img["file_name"])).shape == (*SIZE, 3)


def test_annotation_fields_agree_with_masks(dataset: dict) -> None:
    coco = COCO(str(dataset["train"].instances_json))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 24
    assert {a["category_id"] for a in anns} == set(range(1, len(CATEGORIES) + 1))
    for ann in anns:
        mask = _decode(ann, coco)
        assert ann["area"] == int(mask.sum()) > 0
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]


def test_crowd_regions_and_touching_objects_present(dataset: dict) -> None:
    coco = COCO(str(dataset["train"].instances_json))
    anns = coco.loadAnns(coco.getAnnIds())
    crowds = [a for a in anns if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
    # Occlusion: later objects cover parts of earlier ones, so some visible masks touch.
    touching = [
        (a, b)
        for img in coco.getImgIds()
        for a in coco.loadAnns(coco.getAnnIds(imgIds=img, iscrowd=False))
        for b in coco.loadAnns(coco.getAnnIds(imgIds=img, iscrowd=False))
        if a["id"] < b["id"]
        and (cv2.dilate(_decode(a, coco).astype(np.uint8), np.ones((3, 3))) & _decode(b, coco)).any()
    ]
    assert touching, "no two objects touch: occlusion never happens"


def test_label_pngs_agree_with_annotations(dataset: dict) -> None:
    paths = dataset["train"]
    coco = COCO(str(paths.instances_json))
    for img in coco.loadImgs(coco.getImgIds()):
        labels = cv2.imread(str(paths.semantic_labels / img["file_name"]), cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint8 and labels.shape == SIZE
        covered = np.zeros(SIZE, bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            mask = _decode(ann, coco)
            covered |= mask
            if ann["iscrowd"]:
                assert (labels[mask] == IGNORE_LABEL).all()
            else:
                assert np.isin(labels[mask], [ann["category_id"], IGNORE_LABEL]).all()
                # Only the border band is ignored: pixels whose 3x3 neighbourhood is all this object keep its label.
                interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
                assert (labels[interior] == ann["category_id"]).all()
        assert (labels[~covered] != IGNORE_LABEL).sum() == (labels[~covered] == 0).sum()
        assert set(np.unique(labels[covered])) <= set(range(1, len(CATEGORIES) + 1)) | {IGNORE_LABEL}


def test_render_image_is_rgb_uint8_of_requested_size() -> None:
    image, objects, labels = render_image(np.random.default_rng(0), (70, 90))
    assert image.shape == (70, 90, 3) and image.dtype == np.uint8
    assert labels.shape == (70, 90)
    assert all(o.mask.shape == (70, 90) for o in objects)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": (32, 256)}, "image_size"),
        ({"splits": {"train": -1}}, "must be >= 0"),
        ({"splits": {"../x": 1}}, "invalid split name"),
    ],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_dataset(tmp_path, **kwargs)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [str(tmp_path), "--seed", "4", "--train", "2", "--val", "1", "--test", "0", "--size", "64", "64"]
        )
        == 0
    )
    data = json.loads((tmp_path / "train" / "instances.json").read_text())
    assert len(data["images"]) == 2
    assert (tmp_path / "test" / "instances.json").exists()
    assert "instances.json" in capsys.readouterr().out
