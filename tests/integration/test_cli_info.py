"""``cvserve info`` run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

CVSERVE = [sys.executable, "-m", "cvserve"]
ROOT = Path(__file__).resolve().parents[2]


def test_info_reports_versions_and_devices() -> None:
    out = subprocess.run([*CVSERVE, "info", "--json"], capture_output=True, text=True, check=True, cwd=ROOT)
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__
    assert info["detectron2"] == "0.6" or info["detectron2"].startswith("0.")
    assert isinstance(info["detectron2_native_ops"], bool)
    assert info["cuda_available"] is torch.cuda.is_available()
    assert len(info["cuda_devices"]) == torch.cuda.device_count()
    for key in ("python", "torchvision", "grpcio", "model_repository"):
        assert info[key]
    from cvserve.models.instance import nhwc_roi_align

    assert info["cpu_roi_align"] == nhwc_roi_align.describe()  # the kernel this install built, or why not


def test_info_text_names_the_build() -> None:
    out = subprocess.run([*CVSERVE, "info"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "detectron2" in out
    assert "C++ ops" in out
    assert "CUDA" in out
    assert "RoIAlign     on the CPU: " in out


def test_info_uses_the_given_repository(tmp_path: Path) -> None:
    repo = tmp_path / "models.yaml"
    out = subprocess.run(
        [*CVSERVE, "info", "--json", "--models", str(repo)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert json.loads(out.stdout)["model_repository"] == str(repo)


def test_a_closed_output_pipe_ends_quietly() -> None:
    proc = subprocess.Popen(
        [*CVSERVE, "info", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `cvserve info --json | head -c 0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err
