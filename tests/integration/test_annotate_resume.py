"""Kill ``cvserve annotate`` with SIGKILL mid-run, rerun it, and check nothing was lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
N_IMAGES = 300
REPO = """\
models:
  - name: slow-det
    task: instance
    config: unused
    handler: tests.fixtures.fake_models:build_fake
    max_batch_size: 4
    options: {delay_ms: 25}
"""

pytestmark = pytest.mark.slow


def _make_images(folder: Path) -> None:
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        rgb = np.zeros((16, 16, 3), np.uint8)
        rgb[:, : rng.integers(4, 16), i % 3] = 255
        rgb[rng.integers(0, 8) :, 8:, (i + 1) % 3] = 200
        path = folder / f"d{i % 4}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rgb[..., ::-1])
    (folder / "d0" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def _command(tmp: Path, out: Path) -> list[str]:
    args = ["annotate", str(tmp / "images"), "--model", "slow-det", "--models", str(tmp / "models.yaml")]
    return [sys.executable, "-m", "cvserve", *args, "--out", str(out), "--batch-size", "4"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _image_records(journal: Path) -> list[str]:
    lines = journal.read_bytes().split(b"\n")[1:-1]  # skip header and any torn tail
    return [json.loads(line)["path"] for line in lines if b'"type":"image"' in line]


def _run_and_kill(tmp: Path, out: Path, at_least: int) -> int:
    """Start the CLI, SIGKILL it once the journal holds ``at_least`` images; returns how many it held."""
    journal = out.with_name("r.journal.jsonl")
    proc = subprocess.Popen(_command(tmp, out), env=_env(), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and len(_image_records(journal)) >= at_least:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return len(_image_records(journal))


def test_sigkill_and_rerun_annotates_every_image_exactly_once(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(REPO)
    _make_images(tmp_path / "images")
    reference = tmp_path / "ref" / "r.json"
    subprocess.run(_command(tmp_path, reference), env=_env(), check=True, capture_output=True)

    out = tmp_path / "resumed" / "r.json"
    first = _run_and_kill(tmp_path, out, at_least=60)
    second = _run_and_kill(tmp_path, out, at_least=first + 80)
    assert 60 <= first < second < N_IMAGES
    assert not out.exists()
    done = subprocess.run(_command(tmp_path, out), env=_env(), check=True, capture_output=True, text=True)
    assert f"({second} skipped as already done, 1 failed)" in done.stderr
    assert f"annotated {N_IMAGES - second} of {N_IMAGES + 1} images" in done.stderr

    annotated = _image_records(out.with_name("r.journal.jsonl"))
    assert len(annotated) == len(set(annotated)) == N_IMAGES  # each image journaled exactly once
    images = json.loads(out.with_name("r.images.json").read_text())["images"]
    assert len({img["id"] for img in images}) == len(images) == N_IMAGES
    assert out.read_bytes() == reference.read_bytes()
    assert out.with_name("r.images.json").read_bytes() == reference.with_name("r.images.json").read_bytes()
    [error] = json.loads(out.with_name("r.errors.json").read_text())
    assert error["path"].endswith("corrupt.png")
