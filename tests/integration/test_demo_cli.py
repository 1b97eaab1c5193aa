"""``cvserve demo status`` and ``build`` argument handling through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvserve.cli.main import main

REPORT = {
    "dataset": {"seed": 0, "image_size": 256, "images": {"train": 400, "val": 50, "test": 100}},
    "instance": {"test": {"bbox/AP": 81.234, "segm/AP": 88.5}, "stored_precision": "fp16", "checkpoint_mib": 24.1},
    "semantic": {"test": {"sem_seg/mIoU": 90.12}, "stored_precision": "fp16", "checkpoint_mib": 22.7,
                 "transfer": "loaded 136/136 encoder tensors"},
    "environment": {"device": "cpu", "load_average_start": [1.0], "load_average_end": [2.0]},
    "build_seconds": 600.0,
}  # fmt: skip


def test_status_prints_report_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "report.json").write_text(json.dumps(REPORT))
    assert main(["demo", "status", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "bbox AP 81.23" in out and "segm AP 88.50" in out
    assert "mIoU 90.12" in out
    assert "136/136" in out
    assert "600.00 s" in out


def test_status_without_repository_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "status", "--out", str(tmp_path)]) == 2
    assert "report.json" in capsys.readouterr().err


def test_build_keeps_existing_repository(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "models.yaml").write_text("models: []\n")
    assert main(["demo", "build", "--out", str(tmp_path)]) == 0
    assert "--force" in capsys.readouterr().out
    assert (tmp_path / "models.yaml").read_text() == "models: []\n"


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_build_rejects_bad_iteration_counts(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "build", "--instance-iters", value])
    assert exc.value.code == 2
    assert "--instance-iters" in capsys.readouterr().err


def test_build_iteration_flags_set_the_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cvserve.models.demo.build as demo_build
    from cvserve.models.demo.build import DEMO_SCALE

    seen = {}

    def fake_build(out: Path, **kwargs: object) -> Path:
        seen.update(kwargs)
        (Path(out) / "report.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(out) / "report.json").write_text(json.dumps(REPORT))
        return Path(out) / "models.yaml"

    monkeypatch.setattr(demo_build, "build_demo_repository", fake_build)
    out = tmp_path / "repo"
    assert (
        main(["demo", "build", "--out", str(out), "--instance-iters", "1500", "--semantic-iters", "40"]) == 0
    )
    scale = seen["scale"]
    assert (scale.instance_iters, scale.instance_eval_period) == (1500, 750)
    assert (scale.semantic_iters, scale.semantic_eval_period) == (40, 20)
    assert scale.train_images == DEMO_SCALE.train_images
    assert scale.training_precision == "auto"
    assert main(["demo", "build", "--out", str(tmp_path / "r2"), "--precision", "fp32"]) == 0
    assert seen["scale"].training_precision == "fp32"
