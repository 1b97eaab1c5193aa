"""Device resolution and training process counts, with CUDA availability simulated."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cvserve.models import device as dev
from cvserve.models.training.ranks import check_devices

Simulate = Callable[..., None]
DRIVER_TEXT = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {v}  Release Build  (dvs-builder@U16)\n"
)


@pytest.fixture
def simulate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Simulate:
    """``simulate(gpus, driver=None, torch_cuda="13.0")``: torch sees ``gpus`` devices."""

    def apply(
        gpus: int, driver: str | None = None, torch_cuda: str | None = "13.0", capability: tuple = (8, 0)
    ) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        # The architectures of the registry's CUDA 13 wheels: Turing (sm_75) and newer.
        monkeypatch.setattr(
            torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_86", "sm_90", "sm_120"]
        )
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
        monkeypatch.setattr(torch.version, "cuda", torch_cuda)
        driver_file = tmp_path / "nvidia-version"
        if driver is not None:
            driver_file.write_text(DRIVER_TEXT.format(v=driver))
        monkeypatch.setattr(dev, "_DRIVER_FILE", driver_file)
        dev._warn_once.cache_clear()

    return apply


@pytest.mark.parametrize("text", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_device_strings(text: str) -> None:
    assert dev.is_device(text)


@pytest.mark.parametrize("text", ["", "gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA", "cuda:0 ", "mps"])
def test_invalid_device_strings(text: str) -> None:
    assert not dev.is_device(text)
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        dev.resolve_device(text)


def test_auto_is_cpu_without_cuda(simulate: Simulate) -> None:
    simulate(0)
    assert dev.resolve_device("auto") == "cpu" and dev.resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="no CUDA device is available"):
        dev.resolve_device("cuda")


def test_auto_is_cuda_with_a_gpu(simulate: Simulate) -> None:
    simulate(1, driver="580.95.05")
    assert dev.resolve_device("auto") == "cuda"
    assert dev.resolve_device("cuda:0") == "cuda:0"
    assert dev.cuda_status().problem == ""


def test_an_index_beyond_the_gpus_is_refused(simulate: Simulate) -> None:
    simulate(2, driver="580.95.05")
    assert dev.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"'cuda:2' requested but only 2 CUDA device\(s\)"):
        dev.resolve_device("cuda:2")


def test_an_old_driver_is_named_in_a_warning_and_auto_falls_back(
    simulate: Simulate, caplog: pytest.LogCaptureFixture
) -> None:
    simulate(0, driver="535.104.05", torch_cuda="13.0")
    with caplog.at_level(logging.WARNING, logger="cvserve.models.device"):
        assert dev.resolve_device("auto") == "cpu"
        assert dev.resolve_device("auto") == "cpu"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1  # once per process
    assert (
        "CUDA present but unusable: driver 535.104.05, this torch (CUDA 13.0) needs >= 580.65" in warnings[0]
    )
    with pytest.raises(ValueError, match=r"CUDA present but unusable: driver 535\.104\.05"):
        dev.resolve_device("cuda")


def test_a_driver_new_enough_but_no_device_is_explained_with_torchs_words(
    simulate: Simulate, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulate(0, driver="590.10", torch_cuda="13.0")
    assert dev.cuda_status().problem == "driver 590.10, torch built for CUDA 13.0: no usable device"

    def unavailable() -> bool:
        warnings.warn(
            "CUDA initialization: Unexpected error from cudaGetDeviceCount().\n Error 802", stacklevel=1
        )
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    assert dev.cuda_status().problem == (
        "driver 590.10, torch built for CUDA 13.0: "
        "CUDA initialization: Unexpected error from cudaGetDeviceCount(). Error 802"
    )


@pytest.mark.parametrize(
    ("capability", "usable"), [((7, 0), False), ((6, 0), False), ((7, 5), True), ((8, 9), True)]
)
def test_a_gpu_older_than_the_build_s_architectures_is_unusable(
    simulate: Simulate, capability: tuple[int, int], usable: bool
) -> None:
    # V100 (sm_70) and P100 (sm_60) under CUDA 13 wheels: torch sees them, no kernel runs on them.
    simulate(1, driver="580.95.05", capability=capability)
    status = dev.cuda_status()
    assert status.available is usable and (dev.resolve_device("auto") == "cuda") is usable
    if not usable:
        sm = f"sm_{capability[0]}{capability[1]}"
        assert status.problem.startswith(f"cuda:0 ({sm}) not among this torch build's GPU architectures")
        assert "CVSERVE_TORCH_VARIANT=cu126" in status.problem
        with pytest.raises(ValueError, match=f"CUDA present but unusable: cuda:0 \\({sm}\\)"):
            dev.resolve_device("cuda")


def test_a_cpu_only_torch_with_a_driver(simulate: Simulate) -> None:
    simulate(0, driver="550.54.14", torch_cuda=None)
    assert dev.cuda_status().problem == "driver 550.54.14, but this torch is a CPU-only build"


def test_no_driver_no_problem(simulate: Simulate, caplog: pytest.LogCaptureFixture) -> None:
    simulate(0)
    with caplog.at_level(logging.WARNING, logger="cvserve.models.device"):
        assert dev.warn_if_cuda_unusable() == ""
    assert not caplog.records


@pytest.mark.parametrize(
    ("gpus", "device", "batch", "expected"),
    [
        (0, "cpu", 8, 2),  # the CPU keeps the recipe's count
        (1, "cuda", 8, 1),  # one GPU: one process (the first run of `make serve`)
        (2, "cuda", 8, 2),
        (3, "cuda", 8, 2),  # 3 does not divide 8 images
        (4, "cuda", 8, 4),
        (8, "cuda", 8, 8),
        (16, "cuda", 8, 8),
        (4, "cuda:2", 8, 1),  # one chosen GPU
    ],
)
def test_data_parallel_processes_follow_the_gpus(
    simulate: Simulate, gpus: int, device: str, batch: int, expected: int
) -> None:
    simulate(gpus, driver="580.95.05")
    processes = dev.data_parallel_processes(device, 2, batch)
    assert processes == expected and batch % processes == 0
    if device == "cuda" and processes > 1:
        check_devices(device, processes)  # the process group accepts what was chosen


def test_check_devices_counts_the_gpus(simulate: Simulate) -> None:
    simulate(1, driver="580.95.05")
    with pytest.raises(ValueError, match="2 processes need 2 GPUs; 1 present"):
        check_devices("cuda", 2)
    check_devices("cuda", 1)
    check_devices("cpu", 2)


@pytest.mark.parametrize(("gpus", "processes", "device"), [(0, 2, "cpu"), (1, 1, "cuda"), (2, 2, "cuda")])
def test_the_demo_trains_on_as_many_processes_as_gpus(
    simulate: Simulate,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    gpus: int,
    processes: int,
    device: str,
) -> None:
    import cvserve.models.training.engine as engine
    from cvserve.models.demo.build import DEMO_SCALE
    from cvserve.models.demo.stages import DemoBuild, _train_instance

    simulate(gpus, driver="580.95.05" if gpus else None)
    seen = []
    monkeypatch.setattr(engine, "train", lambda cfg, options, **kw: seen.append(options) or _Result())
    build = DemoBuild(tmp_path, 0, DEMO_SCALE, lambda line: None, {"train": "t", "val": "v"}, {})
    _train_instance(build)
    (options,) = seen
    assert (options.processes, options.device) == (processes, device)
    assert options.batch_size == DEMO_SCALE.instance_batch_size
    assert build.report["instance"]["processes"] == processes


class _Result:
    best_metric = 0.5
