"""scripts/bootstrap.sh: the torch build a user picks for an older NVIDIA driver.

The environment it would create is faked: a venv whose ``python`` only records its
arguments, so the test sees the pip commands without installing anything.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE_PYTHON = '#!/usr/bin/env bash\necho "$*" >> "$(dirname "$0")/../calls.log"\n'


def _bootstrap(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    for name in ("python", "cvserve"):
        (venv / "bin" / name).write_text(FAKE_PYTHON)
        (venv / "bin" / name).chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CVSERVE_TORCH")}
    environment.update(CVSERVE_VENV=str(venv), **env)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/bootstrap.sh")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = venv / "calls.log"
    return proc, log.read_text().splitlines() if log.exists() else []


def _torch_call(calls: list[str]) -> str:
    (line,) = [c for c in calls if "torch" in c and " install " in c and "-e " not in c]
    return line


def test_the_default_is_the_registry_build(tmp_path: Path) -> None:
    proc, calls = _bootstrap(tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = _torch_call(calls)
    assert "requirements/torch.txt" in line and "--index-url" not in line


def test_a_cuda_12_variant_installs_from_its_pytorch_index(tmp_path: Path) -> None:
    proc, calls = _bootstrap(tmp_path, CVSERVE_TORCH_VARIANT="cu126")
    assert proc.returncode == 0, proc.stderr
    assert "--index-url https://download.pytorch.org/whl/cu126" in _torch_call(calls)
    assert "==> torch from https://download.pytorch.org/whl/cu126" in proc.stdout
    # A different choice is a different environment: the stamp makes the install run again.
    first = len(calls)
    proc, calls = _bootstrap(tmp_path, CVSERVE_TORCH_VARIANT="cu128")
    again = calls[first:]
    assert "--index-url https://download.pytorch.org/whl/cu128" in _torch_call(again)
    # Same version number, another build: pip would keep the cu126 one unless it is removed first.
    (uninstall,) = [c for c in again if " uninstall " in f" {c} "]
    assert uninstall.endswith("uninstall -q -y torch torchvision")
    assert again.index(uninstall) < again.index(_torch_call(again))
    assert "another torch build was chosen" in proc.stdout


def test_the_same_build_is_not_reinstalled(tmp_path: Path) -> None:
    _bootstrap(tmp_path)
    (tmp_path / "venv" / ".cvserve-installed").unlink()  # e.g. pyproject.toml changed
    proc, calls = _bootstrap(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in calls if "uninstall" in c]


def test_hash_pinned_requirements(tmp_path: Path) -> None:
    pins = tmp_path / "torch-cu126.txt"
    pins.write_text("torch==2.14.1+cu126 --hash=sha256:" + "0" * 64 + "\n")
    proc, calls = _bootstrap(
        tmp_path, CVSERVE_TORCH_INDEX="https://mirror.example/whl/cu126", CVSERVE_TORCH_REQUIREMENTS=str(pins)
    )
    assert proc.returncode == 0, proc.stderr
    line = _torch_call(calls)
    assert f"--require-hashes -r {pins}" in line and "--index-url https://mirror.example/whl/cu126" in line


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CVSERVE_TORCH_VARIANT": "cuda12"}, "CVSERVE_TORCH_VARIANT must look like cu126"),
        ({"CVSERVE_TORCH_INDEX": "http://mirror.example/whl"}, "must be an https:// URL"),
        ({"CVSERVE_TORCH_VARIANT": "cu126", "CVSERVE_TORCH_INDEX": "https://x"}, "not both"),
        ({"CVSERVE_TORCH_REQUIREMENTS": "/nonexistent/pins.txt"}, "no such file: /nonexistent/pins.txt"),
    ],
)
def test_bad_choices_stop_before_installing(tmp_path: Path, env: dict[str, str], message: str) -> None:
    proc, calls = _bootstrap(tmp_path, **env)
    assert proc.returncode == 1 and message in proc.stderr and calls == []
