"""Training under an external launcher: ``torchrun`` and anything else using env:// rendezvous.

``torchrun --nnodes N --nproc-per-node P ... cvserve train ...`` starts ``N * P`` copies of
the command and tells each who it is through environment variables (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`launcher_environment`
reads them; :func:`joined_process_group` joins the process group they describe with
``init_method="env://"``, the rendezvous of multi-machine training. The training loop is
the one :class:`~cvserve.models.training.parallel.ProcessGroup` runs on one machine; only
who starts the processes differs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from detectron2.utils import comm

from cvserve.models.training.ranks import collective_timeout

__all__ = ["LauncherEnvironment", "joined_process_group", "launcher_environment"]

logger = logging.getLogger(__name__)

_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LauncherEnvironment:
    """Where this process stands in a launched job.

    Attributes:
        rank: global rank, 0..world_size-1 (rank 0 writes checkpoints and metrics).
        world_size: processes in the job, over every machine.
        local_rank: rank on this machine (the GPU it takes).
        master_addr: host of rank 0's rendezvous store.
        master_port: its port.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def check(self, processes: int, batch_size: int) -> None:
        """Raise ``ValueError`` for training options a launched run cannot take."""
        if processes != 1:
            raise ValueError(
                f"processes={processes} spawns processes on this machine; under a launcher "
                f"(WORLD_SIZE={self.world_size}) the launcher starts them: leave processes at 1"
            )
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of the launched world size "
                f"(WORLD_SIZE={self.world_size}): each process takes an equal share of a batch"
            )

    def device(self, device: str) -> str:
        """This process's device: the CPU, or the GPU of its local rank when ``device`` is CUDA."""
        return f"cuda:{self.local_rank}" if device.startswith("cuda") else device


def _integer(env: Mapping[str, str], name: str, low: int, high: int | None = None) -> int:
    value = env[name]
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: not an integer") from None
    if number < low or (high is not None and number > high):
        bound = f" and <= {high}" if high is not None else ""
        raise ValueError(f"environment variable {name}={number}: must be >= {low}{bound}")
    return number


def launcher_environment(env: Mapping[str, str] | None = None) -> LauncherEnvironment | None:
    """The launcher's description of this process, or None when no launcher started it.

    A launcher is recognised by ``WORLD_SIZE`` in the environment; a world of one
    process is no launch (it trains as a plain single process).

    Raises:
        ValueError: some of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
            ``MASTER_PORT`` are missing or malformed (each named).
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return None
    missing = [name for name in _REQUIRED if not env.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is set, so this is a launched run, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not (start it with torchrun)"
        )
    world = _integer(env, "WORLD_SIZE", 1)
    if world == 1:
        return None
    return LauncherEnvironment(
        rank=_integer(env, "RANK", 0, world - 1),
        world_size=world,
        local_rank=_integer(env, "LOCAL_RANK", 0, world - 1),
        master_addr=env["MASTER_ADDR"],
        master_port=_integer(env, "MASTER_PORT", 1, 65535),
    )


@contextlib.contextmanager
def joined_process_group(launch: LauncherEnvironment, device: str) -> Iterator[str]:
    """Join the launched job's process group (gloo on CPUs, NCCL on GPUs) for the block.

    Yields:
        This process's device.

    Raises:
        ValueError: a CUDA device without a GPU for this process's local rank.
    """
    own = launch.device(device)
    if own.startswith("cuda"):
        if launch.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={launch.local_rank} needs GPU {launch.local_rank}; "
                f"{torch.cuda.device_count()} present on this machine"
            )
        torch.cuda.set_device(own)
    backend = "nccl" if own.startswith("cuda") else "gloo"
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=collective_timeout(),
    )
    logger.info(
        "rank %d of %d (local rank %d) joined %s:%d with %s",
        launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port, backend,
    )  # fmt: skip
    try:
        yield own
    finally:
        dist.destroy_process_group()
        comm._get_global_gloo_group.cache_clear()  # detectron2 caches the group of a destroyed world
