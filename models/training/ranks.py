"""What a training rank asks of the group: its device and threads, collectives, their timeout.

Shared by both ways ranks start: :class:`cvserve.models.training.parallel.ProcessGroup`
(spawned on one machine) and :mod:`cvserve.models.training.launch` (``torchrun``).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from detectron2.utils import comm

from cvserve.models.device import cuda_status
from cvserve.models.threads import cpu_cores

__all__ = [
    "COLLECTIVE_TIMEOUT",
    "broadcast_object",
    "check_devices",
    "collective_timeout",
    "mean_over_ranks",
    "rank_device",
    "threads_per_process",
]

# A rank that waits longer than this in a collective gives up (another rank hung). A rank
# that dies is noticed sooner: the caller's watchdog stops the group within a second.
# CVSERVE_COLLECTIVE_TIMEOUT_S overrides it (e.g. for evaluations that keep ranks apart).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def collective_timeout() -> timedelta:
    """How long a rank waits in a collective: ``CVSERVE_COLLECTIVE_TIMEOUT_S`` or 10 minutes."""
    value = os.environ.get("CVSERVE_COLLECTIVE_TIMEOUT_S", "")
    if not value:
        return COLLECTIVE_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ValueError(f"CVSERVE_COLLECTIVE_TIMEOUT_S must be a number of seconds > 0, got {value!r}")
    return timedelta(seconds=seconds)


def threads_per_process(processes: int) -> int:
    """Intra-op threads for each of ``processes`` CPU processes: the cores shared out, at least 1."""
    return max(1, cpu_cores() // processes)


def rank_device(device: str, rank: int) -> str:
    """The device of one rank: the CPU for every rank, or GPU ``rank`` when ``device`` is CUDA."""
    return f"cuda:{rank}" if device.startswith("cuda") else device


def check_devices(device: str, processes: int) -> None:
    """Raise ``ValueError`` if ``processes`` ranks cannot each get a device."""
    if processes > 1 and device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(
                f"training on {processes} processes takes device 'cuda' (one GPU per rank), not {device!r}"
            )
        gpus = cuda_status().device_count
        if processes > gpus:
            raise ValueError(
                f"{processes} processes need {processes} GPUs; {gpus} present"
                " (one training process per GPU: pass --processes <= the GPU count)"
            )


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over all ranks (every rank passes the same keys)."""
    gathered = comm.all_gather(values)
    if len(gathered) == 1:
        return values
    return {k: sum(g[k] for g in gathered) / len(gathered) for k in values}


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the argument is ignored elsewhere)."""
    return comm.all_gather(obj)[0]
