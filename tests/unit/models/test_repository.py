"""Model repository files: valid specs load, every invalid field is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvserve.models.repository import ModelSpec, RepositoryError, load_repository
from cvserve.models.types import Task


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


def test_loads_specs_and_resolves_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "w.pth").write_bytes(b"")
    path = write(
        tmp_path,
        """
models:
  - name: det
    task: instance
    config: COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml
    weights: w.pth
    max_batch_size: 4
    max_wait_ms: 2.5
    options: {score_threshold: 0.3}
  - name: seg
    task: semantic
    config: seg.yaml
    device: cuda:1
    precision: fp16
""",
    )
    det, seg = load_repository(path)
    assert isinstance(det, ModelSpec) and det.task is Task.INSTANCE
    assert det.config == "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"  # model-zoo name kept
    assert det.weights == str(tmp_path / "w.pth")
    assert (det.max_batch_size, det.max_wait_ms, det.options["score_threshold"]) == (4, 2.5, 0.3)
    assert (seg.device, seg.precision, seg.max_batch_size) == ("cuda:1", "fp16", 1)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{task: instance, config: c.yaml}", r"models\[0\]\.name: required"),
        (
            "{name: a, task: panoptic, config: c.yaml}",
            r"models\[0\]\.task: must be one of instance, semantic",
        ),
        ("{name: a, task: instance}", r"models\[0\]\.config: required"),
        ("{name: a, task: instance, config: c, device: gpu}", r"models\[0\]\.device: must be auto, cpu"),
        ("{name: a, task: instance, config: c, precision: int8}", r"models\[0\]\.precision"),
        ("{name: a, task: instance, config: c, max_batch_size: 0}", r"models\[0\]\.max_batch_size: must be"),
        ("{name: a, task: instance, config: c, max_wait_ms: -1}", r"models\[0\]\.max_wait_ms"),
        ("{name: a, task: instance, config: c, max_queue: x}", r"models\[0\]\.max_queue"),
        ("{name: a, task: instance, config: c, colour: red}", r"unknown field\(s\) colour"),
        ("{name: a/b, task: instance, config: c}", r"models\[0\]\.name: may contain only"),
        ("{name: a, task: instance, config: c, handler: nocolon}", r"models\[0\]\.handler"),
        (
            "{name: a, task: instance, config: c, instances: 0}",
            r"models\[0\]\.instances: must be an integer > 0",
        ),
        ("{name: a, task: instance, config: c, instances: many}", r"models\[0\]\.instances: .* or auto"),
        ("{name: a, task: instance, config: c, instances: true}", r"models\[0\]\.instances"),
    ],
)
def test_invalid_fields_are_named(tmp_path: Path, entry: str, message: str) -> None:
    path = write(tmp_path, f"models:\n  - {entry}\n")
    with pytest.raises(RepositoryError, match=message) as info:
        load_repository(path)
    assert str(path) in str(info.value)


def test_duplicate_names_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "models:\n  - {name: a, task: instance, config: c}\n  - {name: a, task: semantic, config: d}\n",
    )
    with pytest.raises(RepositoryError, match=r"models\[1\]\.name: duplicate model name 'a'"):
        load_repository(path)


@pytest.mark.parametrize("text", ["", "models: []", "models: 3", ": : :"])
def test_empty_or_malformed_files(tmp_path: Path, text: str) -> None:
    with pytest.raises(RepositoryError, match=r"models\.yaml"):
        load_repository(write(tmp_path, text))


def test_missing_file_named(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match=r"nope\.yaml: cannot read"):
        load_repository(tmp_path / "nope.yaml")


def test_instances_default_fixed_and_auto(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "models:\n  - {name: a, task: instance, config: c}\n"
        "  - {name: b, task: instance, config: c, instances: 3}\n"
        "  - {name: d, task: instance, config: c, instances: auto}\n",
    )
    assert [s.instances for s in load_repository(path)] == [1, 3, "auto"]
