"""``cvserve eval --model``: in-process (``--models``) and against a real server (``--server``).

The fake models' predictions are a known function of the image, so the ground truth is
built to match them exactly (AP 1.0), and semantic labels are built with known errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_util

from cvserve.cli.main import main
from cvserve.models.evaluation import evaluate_coco
from cvserve.models.evaluation.semantic import evaluate_semantic
from cvserve.models.repository import load_repository

FAKE = "tests.fixtures.fake_models:build_fake"
MODELS = [
    {"name": "det", "task": "instance", "max_batch_size": 2, "max_wait_ms": 5},
    {"name": "seg", "task": "semantic", "max_batch_size": 2, "max_wait_ms": 5},
]
# Non-contiguous ids in another order than the model's class names: mapping is by name.
CATEGORIES = [{"id": 11, "name": "green"}, {"id": 12, "name": "red"}, {"id": 13, "name": "blue"}]

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _image(i: int) -> np.ndarray:
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[: 20 + i, :, 0] = 250  # red band, always more than a quarter of the image
    if i % 2 == 0:
        rgb[26:, : 40 + i, 1] = 240  # green band on every other image
    return rgb


def _gt_objects(rgb: np.ndarray, image_id: int, first_id: int) -> list[dict]:
    anns = []
    for c, name in enumerate(("red", "green", "blue")):
        mask = (np.argmax(rgb, axis=2) == c) & (rgb[..., c] > 0)
        if rgb[..., c].mean() <= 64 or not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        anns.append({
            "id": first_id + len(anns), "image_id": image_id, "iscrowd": 0, "area": float(mask.sum()),
            "category_id": next(cat["id"] for cat in CATEGORIES if cat["name"] == name),
            "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)],
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
        })  # fmt: skip
    return anns


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    images, anns = [], []
    for i in range(6):
        rgb = _image(i)
        Image.fromarray(rgb).save(root / "images" / f"{i:02d}.png")
        images.append({"id": 100 + i, "file_name": f"{i:02d}.png", "height": 48, "width": 64})
        anns += _gt_objects(rgb, 100 + i, len(anns) + 1)
        labels = (np.argmax(rgb, axis=2) + 1).astype(np.uint8)
        labels[rgb.max(axis=2) == 0] = 0
        labels[:4, :4] = 255  # ignored
        labels[40:, 50:] = 3  # wrong on purpose: "blue" where the model sees background or green
        Image.fromarray(labels).save(root / "labels" / f"{i:02d}.png")
    gt = {"images": images, "categories": CATEGORIES, "annotations": anns}
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "models.yaml").write_text(
        yaml.safe_dump({"models": [{"config": "fake", "handler": FAKE, **m} for m in MODELS]})
    )
    return root


@pytest.fixture(scope="module")
def address(dataset: Path) -> Iterator[str]:
    server_module = pytest.importorskip("cvserve.server.build")
    from cvserve.config import ServerConfig

    config = ServerConfig(port=0, metrics_port=None, worker_threads=2, warmup=False)
    with server_module.ServerThread(config, load_repository(dataset / "models.yaml")).start(
        wait_loaded=True
    ) as srv:
        yield srv.address


def _where(mode: str, dataset: Path, address: str | None) -> list[str]:
    return ["--models", str(dataset / "models.yaml")] if mode == "in-process" else ["--server", str(address)]


@pytest.fixture(params=["in-process", "server"])
def mode(request: pytest.FixtureRequest, dataset: Path) -> Iterator[tuple[str, str | None]]:
    if request.param == "server":
        yield request.param, request.getfixturevalue("address")
    else:
        yield request.param, None


def test_instance_model_perfect_ap(dataset: Path, tmp_path: Path, mode: tuple[str, str | None]) -> None:
    out = tmp_path / "report"
    args = ["eval", "--model", "det", *_where(mode[0], dataset, mode[1]), "--gt", str(dataset / "gt.json"),
            "--images", str(dataset / "images"), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    for iou_type in ("bbox", "segm"):
        assert report["metrics"][iou_type]["stats"]["AP"] == 1.0
        assert report["metrics"][iou_type]["stats"]["AR100"] == 1.0
    results = json.loads((out / "results.json").read_text())
    assert {r["category_id"] for r in results} == {11, 12}  # red -> 12, green -> 11 by name
    assert report["metrics"] == evaluate_coco(dataset / "gt.json", out / "results.json")
    assert (out / "pr_segm_categories_1.png").stat().st_size > 0


def test_semantic_model_matches_library(dataset: Path, tmp_path: Path, mode: tuple[str, str | None]) -> None:
    out = tmp_path / "report"
    args = ["eval", "--model", "seg", *_where(mode[0], dataset, mode[1]), "--task", "semantic",
            "--images", str(dataset / "images"), "--labels", str(dataset / "labels"), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    preds, labels = [], []
    for i in range(6):
        rgb = _image(i)
        pred = (np.argmax(rgb, axis=2) + 1).astype(np.uint8)
        pred[rgb.max(axis=2) == 0] = 0
        preds.append(pred)
        labels.append(np.array(Image.open(dataset / "labels" / f"{i:02d}.png")))
    expected = evaluate_semantic(preds, labels, ("background", "red", "green", "blue"))
    assert 0 < report["metrics"]["mIoU"] < 100
    assert report["metrics"]["confusion_matrix"] == expected["confusion_matrix"]
    assert report["metrics"]["mIoU"] == expected["mIoU"]
    assert (out / "confusion_matrix.png").stat().st_size > 0


def test_category_name_mismatch_is_a_clear_error(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gt = json.loads((dataset / "gt.json").read_text())
    gt["categories"][0]["name"] = "grass"
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    args = ["eval", "--model", "det", "--models", str(dataset / "models.yaml"), "--gt", str(tmp_path / "gt.json"),
            "--images", str(dataset / "images"), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert (
        f"{tmp_path / 'gt.json'}: categories: the model's class(es) 'green' have no category of that name"
        in err
    )


def test_wrong_task_and_missing_images(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["eval", "--models", str(dataset / "models.yaml"), "--out", str(tmp_path / "out")]
    assert main([*base, "--model", "det", "--task", "semantic", "--images", str(dataset / "images")]) == 2
    assert "model 'det' is a instance model, not semantic" in capsys.readouterr().err
    gt = json.loads((dataset / "gt.json").read_text())
    gt["images"][0]["file_name"] = "missing.png"
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    assert (
        main(
            [*base, "--model", "det", "--gt", str(tmp_path / "gt.json"), "--images", str(dataset / "images")]
        )
        == 2
    )
    assert f"{dataset / 'images' / 'missing.png'}: image file of image 100" in capsys.readouterr().err
