"""Data-parallel training in several processes on one machine.

The calling process is rank 0; :class:`ProcessGroup` spawns ranks 1..N-1, joins them
into one ``torch.distributed`` group (gloo on CPUs, NCCL on GPUs) and runs a
module-level function in each. Datasets registered in the caller are handed to the
spawned processes as their loaded dicts, so names registered at run time (from a
command line, a temporary build) resolve there too.

On a CPU, N single-thread processes use the cores better than one process running
N intra-op threads: a training step of the demo detector is many small operators,
and each process keeps its core busy between them instead of meeting at a barrier
after every one (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import queue
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from cvserve.models import compat
from cvserve.models.threads import cpu_cores

__all__ = ["ProcessGroup", "broadcast_object", "mean_over_ranks", "rank_device", "threads_per_process"]

logger = logging.getLogger(__name__)

# A rank that waits longer than this in a collective gives up (another rank hung or died).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
_JOIN_SECONDS = 60.0


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
        if processes > torch.cuda.device_count():
            raise ValueError(
                f"{processes} processes need {processes} GPUs; {torch.cuda.device_count()} present"
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


def _snapshot(names: Iterable[str]) -> list[tuple[str, list[dict[str, Any]], dict[str, Any]]]:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    out = []
    for name in names:
        meta = MetadataCatalog.get(name).as_dict()
        meta.pop("name", None)
        out.append((name, DatasetCatalog.get(name), meta))
    return out


def _registering_modules() -> list[str]:
    """Modules outside detectron2 that put components into its model registries.

    A spawned process imports them so that a config naming a project's own backbone
    or META_ARCH builds there as it did here.
    """
    import detectron2.modeling as modeling

    registries = [v for k, v in vars(modeling).items() if k.endswith("_REGISTRY")]
    names = {getattr(obj, "__module__", "") for registry in registries for _, obj in registry}
    return sorted(n for n in names if n and n != "__main__" and not n.startswith("detectron2."))


def _dicts(dicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return dicts


def _register(snapshot: Sequence[tuple[str, list[dict[str, Any]], dict[str, Any]]]) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name, dicts, meta in snapshot:
        if name not in DatasetCatalog.list():  # the main module may have registered it again
            DatasetCatalog.register(name, functools.partial(_dicts, dicts))
            MetadataCatalog.get(name).set(**meta)


def _init(rendezvous: str, rank: int, world: int, device: str) -> None:
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(rank_device(device, rank))
    dist.init_process_group(
        backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )


def _qualified(fn: Callable[..., Any]) -> str:
    if "<" in fn.__qualname__ or fn.__module__ == "__main__":
        raise ValueError(f"{fn!r}: a spawned rank runs a module-level function of an importable module")
    return f"{fn.__module__}:{fn.__qualname__}"


def _child(
    rank: int,
    world: int,
    rendezvous: str,
    device: str,
    threads: int,
    snapshot: list[tuple[str, list[dict[str, Any]], dict[str, Any]]],
    modules: list[str],
    target: str,
    args: tuple[Any, ...],
    errors: Any,
) -> None:
    torch.set_num_threads(threads)
    code = 0
    try:
        # The target travels as "module:name" and is imported only after the detectron2
        # compatibility layer: unpickling a function would import its module first.
        compat.apply()
        module_name, _, name = target.partition(":")
        run = getattr(importlib.import_module(module_name), name)
        for module in modules:
            with contextlib.suppress(ImportError):  # e.g. a test file pytest imported by path
                importlib.import_module(module)
        _register(snapshot)
        _init(rendezvous, rank, world, device)
        run(rank, *args)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    errors.close()
    errors.join_thread()  # the report is in the pipe before the process ends
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: destroying torch's C++ worker threads at exit
    # sometimes aborted the process ("terminate called without an active exception")
    # after its work was done.
    os._exit(code)


class ProcessGroup:
    """Rank 0 in the calling process, ranks 1..N-1 spawned, all in one process group.

    Inside the ``with`` block the caller runs its own share of the work; the spawned
    ranks run ``target(rank, *args)``. Leaving the block joins them; if the caller's
    block raised, or a rank failed, the others are stopped and the first failure is
    raised (a spawned rank's traceback becomes the message of a ``RuntimeError``).

    Args:
        processes: number of ranks, >= 2.
        device: ``cpu`` or ``cuda`` (rank r on GPU r).
        datasets: names of registered datasets the ranks read.
        target: module-level function each spawned rank runs as ``target(rank, *args)``.
        args: its arguments (picklable).
    """

    def __init__(
        self,
        processes: int,
        device: str,
        datasets: Iterable[str],
        target: Callable[..., Any],
        args: tuple[Any, ...],
    ) -> None:
        if processes < 2:
            raise ValueError(f"a process group needs at least 2 processes, got {processes}")
        check_devices(device, processes)
        self.processes, self.device = processes, device
        self.threads = (
            threads_per_process(processes) if not device.startswith("cuda") else torch.get_num_threads()
        )
        self._datasets, self._target, self._args = list(dict.fromkeys(datasets)), target, args
        self._children: list[Any] = []
        self._errors: Any = None
        self._tmp: Path | None = None
        self._threads_before = torch.get_num_threads()

    def __enter__(self) -> ProcessGroup:
        ctx = mp.get_context("spawn")
        self._errors = ctx.Queue()
        self._tmp = Path(tempfile.mkdtemp(prefix="cvserve-ddp-"))
        rendezvous = str(self._tmp / "rendezvous")
        snapshot, modules = _snapshot(self._datasets), _registering_modules()
        for rank in range(1, self.processes):
            common = (self.processes, rendezvous, self.device, self.threads, snapshot, modules)
            p = ctx.Process(
                target=_child,
                args=(rank, *common, _qualified(self._target), self._args, self._errors),
                daemon=True,
            )
            p.start()
            self._children.append(p)
        logger.info("training on %d processes (%d thread(s) each)", self.processes, self.threads)
        try:
            torch.set_num_threads(self.threads)
            _init(rendezvous, 0, self.processes, self.device)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            for p in self._children:
                p.join(_JOIN_SECONDS)
        # A rank that died broke the caller's collective: give its report a moment to arrive.
        failure = self._child_failure(wait=2.0 if exc is not None else 0.01)
        self._stop()
        if failure is not None:
            rank, trace = failure
            raise RuntimeError(f"training process {rank} failed:\n{trace}") from exc
        if exc is None and any(p.exitcode != 0 for p in self._children):
            codes = {i + 1: p.exitcode for i, p in enumerate(self._children)}
            raise RuntimeError(f"a training process did not finish cleanly (exit codes by rank: {codes})")

    def _child_failure(self, wait: float) -> tuple[int, str] | None:
        try:
            return self._errors.get(timeout=wait)
        except queue.Empty:
            return None

    def _stop(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        comm._get_global_gloo_group.cache_clear()  # detectron2 caches the group of a destroyed world
        for p in self._children:
            if p.is_alive():
                p.terminate()
            p.join(_JOIN_SECONDS)
        torch.set_num_threads(self._threads_before)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
