"""Demo repository helpers that need no training: repository file, fp16 decision, safety checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cvserve.models.demo import build as demo
from cvserve.models.demo import stages as demo_stages
from cvserve.models.repository import load_repository
from cvserve.models.types import Task


def test_repository_file_loads_with_relative_paths(tmp_path: Path) -> None:
    for part in ("instance", "semantic"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "model.pth").write_bytes(b"")
        (tmp_path / part / "config.yaml").write_text("")
    demo._write_repository_file(tmp_path)
    text = (tmp_path / "models.yaml").read_text()
    assert str(tmp_path) not in text  # relative: the directory can move
    specs = {s.name: s for s in load_repository(tmp_path / "models.yaml")}
    assert specs["shapes-maskrcnn"].task is Task.INSTANCE
    assert specs["shapes-semseg"].task is Task.SEMANTIC
    for spec in specs.values():
        assert spec.device == "auto"
        assert Path(spec.weights).parent.parent == tmp_path.resolve()


@pytest.mark.parametrize(
    ("fp32", "fp16", "same"),
    [
        ({"bbox/AP": 80.0, "segm/AP": 85.0}, {"bbox/AP": 80.05, "segm/AP": 85.0}, True),
        ({"bbox/AP": 80.0, "segm/AP": 85.0}, {"bbox/AP": 79.5, "segm/AP": 85.0}, False),
        ({"bbox/AP": 80.0}, {}, False),
        ({}, {}, True),
    ],
)
def test_fp16_kept_only_within_tolerance(fp32: dict, fp16: dict, same: bool) -> None:
    assert demo_stages._same_metrics(fp32, fp16, ("bbox/AP", "segm/AP")) is same


@pytest.mark.parametrize(
    ("iters", "steps"),
    [(900, (765, 882)), (1000, (850, 980)), (40, (34, 39)), (2, ())],  # a 2-step toy run has no room
)
def test_training_steps_the_rate_at_the_scale_fractions(tmp_path: Path, iters: int, steps: tuple) -> None:
    build = demo_stages.DemoBuild(tmp_path, 0, demo.DEMO_SCALE, lambda _: None, {}, {})
    options = demo_stages._options(build, iters, 450)
    assert options.lr_steps == steps
    assert options.max_iter == iters and options.eval_period == min(450, iters)


def test_ensure_returns_existing_without_building(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("models: []\n")
    lines: list[str] = []
    assert (
        demo.ensure_demo_repository(tmp_path / "models.yaml", progress=lines.append)
        == tmp_path / "models.yaml"
    )
    assert lines == []


def test_ensure_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match=r"without models\.yaml"):
        demo.ensure_demo_repository(tmp_path / "models.yaml", progress=lambda _: None)
    assert (tmp_path / "notes.txt").is_file()


def test_build_refuses_existing_directory_without_force(tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="force"):
        demo.build_demo_repository(tmp_path, progress=lambda _: None)


def test_stale_build_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(finished.stdout)
    stale = tmp_path / f".repo.building-{dead_pid}"
    live = tmp_path / f".repo.building-{os.getppid()}"
    unrelated = tmp_path / ".other.building-1"
    for d in (stale, live, unrelated):
        d.mkdir()
    demo._remove_stale_builds(tmp_path / "repo")
    assert not stale.exists()
    assert live.exists() and unrelated.exists()


def test_read_report(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="demo build"):
        demo.read_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"build_seconds": 1.5}))
    assert demo.read_report(tmp_path) == {"build_seconds": 1.5}


def test_bf16_loss_is_the_largest_drop_in_points() -> None:
    fp32 = {"bbox/AP": 80.0, "segm/AP": 85.0}
    assert demo_stages._bf16_loss(fp32, {"bbox/AP": 79.8, "segm/AP": 85.1}, ("bbox/AP", "segm/AP")) == 0.2
    assert demo_stages._bf16_loss(fp32, {"bbox/AP": 80.5, "segm/AP": 85.5}, ("bbox/AP", "segm/AP")) == 0.0
