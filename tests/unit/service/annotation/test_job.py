"""The annotation library with the in-process predictor and the weight-free fake models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from cvserve.annotation.job import FAIL_FAST_AFTER, AnnotateJob, JournalError, PredictorError, annotate
from cvserve.annotation.predictors import LocalPredictor
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Task
from tests.fixtures.fake_models import build_fake

# pycocotools' mask.decode trips a numpy 2 deprecation warning inside its C extension.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _predictor(task: Task = Task.INSTANCE, **options: Any) -> LocalPredictor:
    model = build_fake(ModelSpec(name=f"fake-{task.value}", task=task, config="-", options=options))
    model.load()
    return LocalPredictor(model)


def _write_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    """Images with a bright band in channel i % 3 and a square in channel (i + 1) % 3."""
    paths = []
    for i in range(start, start + n):
        rgb = np.zeros((40, 56, 3), np.uint8)
        rgb[:, : 20 + i % 7, i % 3] = 230
        rgb[8:36, 24:50, (i + 1) % 3] = 250
        path = folder / ("odd" if i % 2 else "") / f"im{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rgb[..., ::-1])
        paths.append(path)
    return paths


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def _expected_instances(path: Path, predictor: LocalPredictor) -> list[tuple[int, list[float], float]]:
    rgb = cv2.imread(str(path))[..., ::-1]
    pred = predictor.model.predict_batch([np.ascontiguousarray(rgb)])[0]
    return [
        (i.category_id + 1, [i.box[0], i.box[1], i.box[2] - i.box[0], i.box[3] - i.box[1]], i.score)
        for i in pred.instances
    ]


def test_results_are_coco_results_for_every_image(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "in", 7)
    predictor = _predictor()
    out = tmp_path / "out" / "results.json"
    summary = annotate(AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(out), batch_size=3), predictor)

    assert (summary.total, summary.done, summary.skipped, summary.failed) == (7, 7, 0, 0)
    results, doc = _load(out), _load(tmp_path / "out" / "results.images.json")
    assert summary.instances == len(results) > 0
    assert doc["categories"] == [
        {"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(("red", "green", "blue"))
    ]
    by_name = {img["file_name"]: img for img in doc["images"]}
    assert sorted(by_name) == sorted(str(p.relative_to(tmp_path / "in")) for p in paths)
    assert sorted(img["id"] for img in doc["images"]) == list(range(1, 8))
    for path in paths:
        image = by_name[str(path.relative_to(tmp_path / "in"))]
        assert (image["height"], image["width"]) == (40, 56)
        got = [(r["category_id"], r["bbox"], r["score"]) for r in results if r["image_id"] == image["id"]]
        assert got == _expected_instances(path, predictor)
    assert all(isinstance(r["segmentation"]["counts"], str) for r in results)
    # pycocotools takes the files unchanged: the images file as ground-truth images, the results as results.
    gt = COCO()
    gt.dataset = {**doc, "annotations": []}
    gt.createIndex()
    assert len(gt.loadRes(str(out)).getAnnIds()) == len(results)
    assert _load(tmp_path / "out" / "results.errors.json") == []


def test_corrupt_and_missing_images_are_listed_and_the_run_continues(tmp_path: Path) -> None:
    _write_images(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "in" / "empty.png").write_bytes(b"")
    listing = tmp_path / "list.txt"
    listing.write_text("in/im000.png\nin/broken.jpg\nin/empty.png\nin/gone.png\nin/odd/im001.png\n")
    out = tmp_path / "r.json"
    summary = annotate(AnnotateJob(inputs=(str(listing),), out=str(out)), _predictor())
    assert (summary.done, summary.failed) == (2, 3)
    errors = {Path(e["path"]).name: e["reason"] for e in _load(tmp_path / "r.errors.json")}
    assert set(errors) == {"broken.jpg", "empty.png", "gone.png"}
    assert errors["broken.jpg"].startswith("cannot decode image")
    assert errors["empty.png"] == "empty file"
    assert "cannot read" in errors["gone.png"]
    assert [img["file_name"] for img in _load(tmp_path / "r.images.json")["images"]] == [
        "im000.png",
        "odd/im001.png",
    ]


def test_a_failing_image_fails_alone_in_its_batch(tmp_path: Path) -> None:
    _write_images(tmp_path / "in", 4)
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 2] = 255  # BGR on disk: pure red, which the fake model refuses in forward
    cv2.imwrite(str(tmp_path / "in" / "red.png"), red)
    out = tmp_path / "r.json"
    job = AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(out), batch_size=5)
    summary = annotate(job, _predictor(fail_forward_on_red=True))
    assert (summary.done, summary.failed) == (4, 1)
    [error] = _load(tmp_path / "r.errors.json")
    assert error["path"].endswith("red.png") and "fake batch failure" in error["reason"]


def test_rerun_after_a_partial_run_skips_done_images_and_matches_a_full_run(tmp_path: Path) -> None:
    _write_images(tmp_path / "in", 9)
    full = tmp_path / "full" / "r.json"
    annotate(AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(full), batch_size=2), _predictor())

    out = tmp_path / "part" / "r.json"
    job = AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(out), batch_size=2)
    annotate(job, _predictor())
    journal = tmp_path / "part" / "r.journal.jsonl"
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][:10])  # header + 4 images + torn line
    out.unlink()

    predictor = _predictor()
    summary = annotate(job, predictor)
    assert (summary.done, summary.skipped, summary.failed) == (5, 4, 0)
    assert sum(predictor.model.batch_sizes) == 5  # only the missing images ran
    assert out.read_bytes() == full.read_bytes()
    assert (tmp_path / "part" / "r.images.json").read_bytes() == (
        tmp_path / "full" / "r.images.json"
    ).read_bytes()

    again = annotate(job, _predictor())  # complete journal: nothing left to do
    assert (again.done, again.skipped) == (0, 9)
    assert out.read_bytes() == full.read_bytes()


def test_rerun_with_another_model_is_refused_unless_restart(tmp_path: Path) -> None:
    _write_images(tmp_path / "in", 2)
    job = AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "r.json"))
    annotate(job, _predictor())
    with pytest.raises(JournalError, match="model: 'fake-instance' -> 'fake-semantic'"):
        annotate(job, _predictor(Task.SEMANTIC))
    restarted = AnnotateJob(inputs=job.inputs, out=job.out, restart=True)
    assert annotate(restarted, _predictor(Task.SEMANTIC)).done == 2


def test_coco_json_input_keeps_its_ids_and_maps_categories_by_name(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "imgs", 3)
    coco = {
        "images": [
            {"id": 100 + i, "file_name": p.name if i % 2 == 0 else f"odd/{p.name}"}
            for i, p in enumerate(paths)
        ],
        "categories": [{"id": 17, "name": "Green"}, {"id": 5, "name": "red"}, {"id": 9, "name": "cat"}],
    }
    ann = tmp_path / "gt.json"
    ann.write_text(json.dumps(coco))
    out = tmp_path / "r.json"
    job = AnnotateJob(inputs=(str(ann),), out=str(out), image_root=str(tmp_path / "imgs"))
    annotate(job, _predictor())
    results, doc = _load(out), _load(tmp_path / "r.images.json")
    assert [img["id"] for img in doc["images"]] == [100, 101, 102]
    assert doc["categories"] == coco["categories"]
    assert {r["category_id"] for r in results} == {5, 17}  # "blue" has no COCO category: left out
    assert {r["image_id"] for r in results} == {100, 101, 102}


def test_semantic_model_writes_label_pngs_and_per_class_regions(tmp_path: Path) -> None:
    [path] = _write_images(tmp_path / "in", 1)
    out = tmp_path / "seg.json"
    annotate(AnnotateJob(inputs=(str(path),), out=str(out)), _predictor(Task.SEMANTIC))
    labels = cv2.imread(str(tmp_path / "seg.labels" / "im000.png"), cv2.IMREAD_UNCHANGED)
    rgb = cv2.imread(str(path))[..., ::-1]
    expected = np.where(rgb.max(axis=2) == 0, 0, rgb.argmax(axis=2) + 1)
    np.testing.assert_array_equal(labels, expected)
    results = _load(out)
    doc = _load(tmp_path / "seg.images.json")
    assert doc["images"][0]["labels_file"] == "im000.png"
    from pycocotools import mask as mask_util

    for r in results:  # category id = label + 1, region = the pixels with that label
        region = mask_util.decode({**r["segmentation"], "counts": r["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(region.astype(bool), labels == r["category_id"] - 1)
    assert {r["category_id"] for r in results} == {int(v) + 1 for v in np.unique(labels)}


def test_overlays_are_written_per_image(tmp_path: Path) -> None:
    paths = _write_images(tmp_path / "in", 2)
    job = AnnotateJob(
        inputs=(str(tmp_path / "in"),), out=str(tmp_path / "r.json"), overlays_dir=str(tmp_path / "ov")
    )
    annotate(job, _predictor())
    for path in paths:
        overlay = cv2.imread(str(tmp_path / "ov" / path.relative_to(tmp_path / "in").with_suffix(".jpg")))
        assert overlay.shape == (40, 56, 3)
        assert not np.array_equal(overlay, cv2.imread(str(path)))  # something was drawn


def test_summary_text_reports_the_counts(tmp_path: Path) -> None:
    _write_images(tmp_path / "in", 2)
    (tmp_path / "in" / "bad.png").write_bytes(b"nope")
    summary = annotate(
        AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "r.json")), _predictor()
    )
    text = summary.format()
    assert "annotated 2 of 3 images (0 skipped as already done, 1 failed)" in text
    assert f"{summary.instances} instances" in text and "images/s" in text and "r.errors.json" in text


def test_a_model_failing_on_every_image_stops_the_run(tmp_path: Path) -> None:
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 2] = 255  # BGR: pure red, refused by the fake model's forward
    (tmp_path / "in").mkdir()
    for i in range(FAIL_FAST_AFTER + 8):
        cv2.imwrite(str(tmp_path / "in" / f"{i:03d}.png"), red)
    job = AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "r.json"), batch_size=8)
    with pytest.raises(
        PredictorError, match=f"failed on the first {FAIL_FAST_AFTER} images.*fake batch failure"
    ):
        annotate(job, _predictor(fail_forward_on_red=True))
    assert not (tmp_path / "r.json").exists()


def test_forward_passes_never_exceed_the_models_max_batch_size(tmp_path: Path) -> None:
    _write_images(tmp_path / "in", 7)
    model = build_fake(ModelSpec(name="m", task=Task.INSTANCE, config="-"))
    job = AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "r.json"), batch_size=5)
    annotate(job, LocalPredictor(model, max_batch_size=2))
    assert sorted(model.batch_sizes) == [1, 2, 2, 2]  # batches of 5 and 2 -> passes of 2, 2, 1 and 2


def test_progress_bar_goes_to_stderr_only_when_asked_or_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_images(tmp_path / "in", 5)
    (tmp_path / "in" / "bad.png").write_bytes(b"nope")
    job = AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "r.json"), batch_size=2)
    annotate(job, _predictor(), progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "annotate: 100%" in captured.err and "6/6" in captured.err and "img/s" in captured.err
    assert "failed=1" in captured.err
    restarted = AnnotateJob(inputs=job.inputs, out=job.out, restart=True)
    annotate(restarted, _predictor())  # default: only on a terminal, and captured stderr is not one
    assert capsys.readouterr().err == ""
