"""``cvserve annotate`` argument handling and user-facing errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvserve.cli.main import main

REPO = """\
models:
  - name: det
    task: instance
    config: unused
    handler: tests.fixtures.fake_models:build_fake
    max_batch_size: 2
  - name: seg
    task: semantic
    config: unused
    handler: tests.fixtures.fake_models:build_fake
  - name: broken
    task: instance
    config: unused
    handler: tests.fixtures.fake_models:build_fake
    options: {load_error: checkpoint is corrupt}
"""


@pytest.fixture
def setup(tmp_path: Path) -> Path:
    (tmp_path / "models.yaml").write_text(REPO)
    (tmp_path / "in").mkdir()
    for i in range(3):
        image = np.zeros((12, 12, 3), np.uint8)
        image[:, :, i] = 200
        cv2.imwrite(str(tmp_path / "in" / f"{i}.png"), image)
    return tmp_path


def _run(tmp: Path, *extra: str, model: str = "det") -> int:
    repo, out = str(tmp / "models.yaml"), str(tmp / "out" / "r.json")
    return main(["annotate", str(tmp / "in"), "--model", model, "--models", repo, "--out", out, *extra])


def test_run_writes_outputs_and_prints_a_summary(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(setup) == 0
    err = capsys.readouterr().err
    assert "annotated 3 of 3 images (0 skipped as already done, 0 failed)" in err
    results = json.loads((setup / "out" / "r.json").read_text())
    assert {r["image_id"] for r in results} == {1, 2, 3}
    assert _run(setup, "--quiet") == 0
    assert "annotated" not in capsys.readouterr().err


def test_rerun_with_another_model_is_refused_with_the_restart_hint(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(setup, "--quiet") == 0
    assert _run(setup, model="seg") == 2
    err = capsys.readouterr().err
    assert "cvserve annotate: error:" in err and "r.journal.jsonl" in err and "--restart" in err
    assert _run(setup, "--restart", model="seg") == 0
    assert (setup / "out" / "r.labels" / "0.png").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be > 0"),
        (["--gpus-per-actor", "-1"], "--gpus-per-actor must be >= 0"),
        (["--server", "localhost:1", "--engine", "ray"], "exclude each other"),
    ],
)
def test_bad_options_are_cli_errors(
    setup: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert _run(setup, *extra) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_and_missing_input_name_what_is_wrong(
    setup: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(setup, model="nope") == 2
    assert "models.yaml: no model named 'nope' (available: broken, det, seg)" in capsys.readouterr().err
    argv = ["annotate", str(setup / "missing"), "--model", "det", "--models", str(setup / "models.yaml")]
    assert main([*argv, "--out", str(setup / "r.json")]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err


def test_ray_engine_without_ray_gives_the_install_hint(
    setup: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # makes ``import ray`` fail as if not installed
    assert _run(setup, "--engine", "ray") == 2
    assert "pip install 'cvserve[ray]'" in capsys.readouterr().err


def test_model_that_fails_to_load_is_a_cli_error(setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(setup, model="broken") == 2
    assert "model 'broken' failed to load: checkpoint is corrupt" in capsys.readouterr().err
