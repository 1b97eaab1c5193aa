"""Where models run and train: device strings, what CUDA offers here, and why it may not.

A device is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. ``auto`` is ``cuda`` when a usable
CUDA device is present, else ``cpu``. CUDA that is installed but unusable (a driver older
than the one this torch build needs, the usual case for registry wheels on older hosts)
makes ``auto`` fall back to the CPU with a warning that names both versions, once per
process; ``cvserve info`` shows the same diagnosis.
"""

from __future__ import annotations

import functools
import gc
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEVICE_HELP",
    "CudaStatus",
    "auto_device",
    "cuda_status",
    "data_parallel_processes",
    "device_index",
    "is_device",
    "is_out_of_memory",
    "release_device_memory",
    "resolve_device",
    "warn_if_cuda_unusable",
]

logger = logging.getLogger(__name__)

DEVICE_HELP = "auto, cpu, cuda or cuda:N"

# The oldest Linux driver each CUDA major version runs on (NVIDIA's CUDA compatibility
# tables: 11.x from 450.80.02, 12.x from 525.60.13, 13.x from 580.65.06).
MIN_DRIVER = {11: (450, 80), 12: (525, 60), 13: (580, 65)}
_DRIVER_FILE = Path("/proc/driver/nvidia/version")


def is_device(device: str) -> bool:
    """Whether ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N a non-negative integer)."""
    return device in ("auto", "cpu", "cuda") or bool(re.fullmatch(r"cuda:\d+", device))


def device_index(device: str) -> int:
    """The GPU index of a CUDA device string (``cuda`` is GPU 0); ``ValueError`` for others."""
    if device == "cuda":
        return 0
    if re.fullmatch(r"cuda:\d+", device):
        return int(device[5:])
    raise ValueError(f"not a CUDA device: {device!r}")


@dataclass(frozen=True)
class CudaStatus:
    """What CUDA offers this process.

    Attributes:
        available: torch can use at least one GPU.
        device_count: GPUs torch sees (0 when not available).
        torch_cuda: the CUDA version torch was built for, None for a CPU-only build.
        driver: the NVIDIA kernel driver version, None when no driver is loaded.
        problem: why an installed driver cannot be used, empty when it can (or none is there).
    """

    available: bool
    device_count: int
    torch_cuda: str | None
    driver: str | None
    problem: str = ""


def _driver_version() -> str | None:
    try:
        text = _DRIVER_FILE.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def _required_driver(torch_cuda: str | None) -> tuple[int, int] | None:
    if not torch_cuda:
        return None
    return MIN_DRIVER.get(int(torch_cuda.split(".")[0]))


def _diagnose(torch_cuda: str | None, driver: str | None, note: str) -> str:
    """Why a present driver is unusable with this torch build."""
    if torch_cuda is None:
        return f"driver {driver}, but this torch is a CPU-only build"
    need = _required_driver(torch_cuda)
    have = tuple(int(p) for p in driver.split(".")[:2]) if driver else None
    if need is not None and have is not None and have < need:
        return (
            f"driver {driver}, this torch (CUDA {torch_cuda}) needs >= {need[0]}.{need[1]}; "
            "install a torch build for an older CUDA (CVSERVE_TORCH_VARIANT=cu126 make serve, see README) "
            "or update the driver"
        )
    return f"driver {driver}, torch built for CUDA {torch_cuda}: {note or 'no usable device'}"


def cuda_status() -> CudaStatus:
    """CUDA as this process sees it."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = bool(torch.cuda.is_available())
    count = int(torch.cuda.device_count()) if available else 0
    driver = _driver_version()
    problem = ""
    if not available and driver is not None:
        note = " ".join(str(caught[-1].message).split()) if caught else ""
        problem = _diagnose(torch.version.cuda, driver, note)
    elif unsupported := _unsupported_gpus(torch, count):
        # torch reports such a GPU available, then fails its first kernel ("no kernel image").
        archs = ", ".join(torch.cuda.get_arch_list())
        problem = (
            f"{', '.join(unsupported)} not among this torch build's GPU architectures ({archs}; CUDA "
            f"{torch.version.cuda}); install a build for an older CUDA (CVSERVE_TORCH_VARIANT=cu126 "
            "make serve, see README)"
        )
        available, count = False, 0
    return CudaStatus(available, count, torch.version.cuda, driver, problem)


def _unsupported_gpus(torch: Any, count: int) -> list[str]:
    """The visible GPUs this torch build has no kernels for (``cuda:N (sm_XY)``)."""
    archs = torch.cuda.get_arch_list() if count else []
    if not archs:
        return []
    sass = [int(a[3:]) for a in archs if re.fullmatch(r"sm_\d+", a)]
    ptx = [int(a[8:]) for a in archs if re.fullmatch(r"compute_\d+", a)]
    unsupported = []
    for index in range(count):
        major, minor = torch.cuda.get_device_capability(index)
        capability = major * 10 + minor
        # A binary for sm_XY runs on the same major version at Y or above; PTX JIT-compiles upwards.
        if any(s // 10 == major and s <= capability for s in sass) or any(p <= capability for p in ptx):
            continue
        unsupported.append(f"cuda:{index} (sm_{capability})")
    return unsupported


def warn_if_cuda_unusable() -> str:
    """Log (once per process) and return why an installed NVIDIA driver is not used, or ``""``."""
    problem = cuda_status().problem
    if problem:
        _warn_once(problem)
    return problem


@functools.cache
def _warn_once(problem: str) -> None:
    logger.warning("CUDA present but unusable: %s; running on the CPU", problem)


def auto_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a usable CUDA device is present, else ``cpu``; others unchanged."""
    if device != "auto":
        return device
    if cuda_status().available:
        return "cuda"
    warn_if_cuda_unusable()
    return "cpu"


def resolve_device(device: str) -> str:
    """``device`` checked against this machine, ``auto`` resolved.

    Raises:
        ValueError: a malformed device string, CUDA requested where none is usable, or
            ``cuda:N`` with N beyond the GPUs present.
    """
    if not is_device(device):
        raise ValueError(f"device must be {DEVICE_HELP}, got {device!r}")
    if device in ("auto", "cpu"):
        return auto_device(device)
    status = cuda_status()
    if not status.available:
        why = f" (CUDA present but unusable: {status.problem})" if status.problem else ""
        raise ValueError(f"device {device!r} requested but no CUDA device is available{why}")
    index = device_index(device)
    if index >= status.device_count:
        raise ValueError(
            f"device {device!r} requested but only {status.device_count} CUDA device(s) are visible"
            f" (cuda:0..cuda:{status.device_count - 1})"
        )
    return device


def data_parallel_processes(device: str, cpu_processes: int, batch_size: int) -> int:
    """How many data-parallel training processes suit a resolved ``device``.

    On the CPU, ``cpu_processes`` (single-thread processes sharing the cores). On CUDA, one
    process per visible GPU (``cuda``) or one (``cuda:N``, a single chosen GPU), reduced to
    the largest count that divides ``batch_size`` so every rank takes the same share.
    """
    if not device.startswith("cuda"):
        return cpu_processes
    gpus = cuda_status().device_count if device == "cuda" else 1
    return max(n for n in range(1, max(1, gpus) + 1) if batch_size % n == 0)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the host or a CUDA device running out of memory."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only code that uses torch can raise its OOM
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def release_device_memory() -> None:
    """Collect garbage (a failed pass's frames may sit in cycles), then return CUDA's cached blocks.

    Call it outside any ``except`` block: while one is open its traceback keeps the failed
    pass's tensors alive.
    """
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
