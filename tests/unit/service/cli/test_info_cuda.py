"""``cvserve info`` explains CUDA that is installed but unusable."""

from __future__ import annotations

import argparse
import json

import pytest

from cvserve.cli import info
from cvserve.models import device

OLD_DRIVER = device.CudaStatus(
    available=False,
    device_count=0,
    torch_cuda="13.0",
    driver="535.104.05",
    problem="driver 535.104.05, this torch (CUDA 13.0) needs >= 580.65; install a torch build ...",
)


def test_info_names_the_driver_problem(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(device, "cuda_status", lambda: OLD_DRIVER)
    info.run(argparse.Namespace(models=None, json=False))
    out = capsys.readouterr().out
    assert (
        "CUDA         no: CUDA present but unusable (driver 535.104.05, this torch (CUDA 13.0) needs >= 580.65"
        in out
    )
    info.run(argparse.Namespace(models=None, json=True))
    data = json.loads(capsys.readouterr().out)
    assert data["nvidia_driver"] == "535.104.05" and data["cuda_problem"] == OLD_DRIVER.problem
    assert data["cuda_available"] is False and data["cuda_devices"] == []
