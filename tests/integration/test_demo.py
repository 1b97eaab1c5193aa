"""The demo repository pipeline at toy scale: layout, repository file, models that load and predict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cvserve.models.build import build_model
from cvserve.models.checkpoint import read_checkpoint_meta
from cvserve.models.demo.build import build_demo_repository, ensure_demo_repository, toy_scale
from cvserve.models.precision import BF16_LOSS_KEY, cpu_bf16
from cvserve.models.repository import load_repository
from cvserve.models.types import Task

pytestmark = pytest.mark.slow  # trains two models, briefly: about a minute on 2 idle cores


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "repo"
    lines: list[str] = []
    yaml_path = build_demo_repository(out, seed=0, progress=lines.append, scale=toy_scale())
    assert yaml_path == out / "models.yaml"
    assert any("training the instance model" in line for line in lines)
    return out


def test_layout_and_report(repo: Path) -> None:
    for rel in (
        "models.yaml",
        "report.json",
        "instance/config.yaml",
        "instance/model.pth",
        "semantic/config.yaml",
        "semantic/model.pth",
        "data/test/instances.json",
    ):
        assert (repo / rel).is_file(), rel
    assert not (repo / "data" / "train").exists()
    assert not list(repo.parent.glob(".repo.*")), "temporary build directories left behind"
    report = json.loads((repo / "report.json").read_text())
    assert report["dataset"]["images"] == {"train": 6, "val": 2, "test": 2}
    for part in ("instance", "semantic"):
        assert report[part]["stored_precision"] in ("fp16", "fp32")
        assert report[part]["checkpoint_mib"] > 0
        if cpu_bf16().native:  # bf16 measured on the test split and recorded for precision auto
            assert set(report[part]["test_bf16"]) == set(report[part]["test_fp32"])
            assert report[part]["bf16_loss"] >= 0
            meta = read_checkpoint_meta(repo / part / "model.pth")
            assert meta[BF16_LOSS_KEY] == report[part]["bf16_loss"]
    assert "loaded" in report["semantic"]["transfer"]
    assert report["build_seconds"] > 0


def test_repository_models_build_and_predict(repo: Path) -> None:
    specs = {s.name: s for s in load_repository(repo / "models.yaml")}
    assert set(specs) == {"shapes-maskrcnn", "shapes-semseg"}
    assert specs["shapes-maskrcnn"].task is Task.INSTANCE
    assert specs["shapes-semseg"].task is Task.SEMANTIC
    image = np.random.default_rng(0).integers(0, 255, (48, 72, 3), dtype=np.uint8)
    for spec in specs.values():
        assert Path(spec.weights).is_file() and Path(spec.weights).is_relative_to(repo)
        model = build_model(spec)
        model.load()
        (pred,) = model.predict_batch([image])
        assert pred.image_size == (48, 72)
        if spec.task is Task.SEMANTIC:
            assert pred.semantic is not None and pred.semantic.labels.shape == (48, 72)
            assert pred.semantic.class_names[0] == "background"
        else:
            assert len(model.class_names) == 5


def test_existing_repository_is_kept_unless_forced(repo: Path) -> None:
    with pytest.raises(FileExistsError):
        build_demo_repository(repo, scale=toy_scale())
    assert ensure_demo_repository(repo / "models.yaml", progress=lambda _: None) == repo / "models.yaml"


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cvserve.models.demo.stages as demo

    def boom(build: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_train_instance", boom)
    with pytest.raises(KeyboardInterrupt):
        build_demo_repository(tmp_path / "repo", scale=toy_scale(), progress=lambda _: None)
    assert list(tmp_path.iterdir()) == []
