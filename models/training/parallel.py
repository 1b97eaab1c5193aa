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
import pickle
import queue
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

from cvserve.models import compat
from cvserve.models.training.ranks import check_devices, collective_timeout, rank_device, threads_per_process

__all__ = ["ProcessGroup"]

logger = logging.getLogger(__name__)

_JOIN_SECONDS = 60.0
_WATCH_SECONDS = 0.5


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
        backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=collective_timeout()
    )


def _exit_with_parent(parent: int) -> None:
    """End this rank when the calling process is gone (a rank in NCCL would wait for it)."""
    while os.getppid() == parent:
        time.sleep(_WATCH_SECONDS)
    os._exit(1)


def _abort_collectives() -> None:
    """Break this process's pending collectives (NCCL waits for a dead peer; gloo notices)."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if dist.is_initialized() and dist.get_backend() == "nccl" and abort is not None:
        with contextlib.suppress(Exception):
            abort()


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
    payload: bytes,
    modules: list[str],
    target: str,
    errors: Any,
    parent: int,
) -> None:
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True, name="parent-watch").start()
    code = 0
    try:
        # The target travels as "module:name" and is imported only after the detectron2
        # compatibility layer: unpickling a function would import its module first.
        compat.apply()
        # Dataset dicts and arguments hold detectron2 objects (BoxMode, CfgNode): they are
        # unpickled here, after the layer, not by multiprocessing before _child runs.
        snapshot, args = pickle.loads(payload)
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
        self._watching = threading.Event()
        self.died: tuple[int, int | None] | None = None  # (rank, exit code) of a rank that died

    def __enter__(self) -> ProcessGroup:
        ctx = mp.get_context("spawn")
        self._errors = ctx.Queue()
        self._tmp = Path(tempfile.mkdtemp(prefix="cvserve-ddp-"))
        rendezvous = str(self._tmp / "rendezvous")
        payload = pickle.dumps((_snapshot(self._datasets), self._args))
        modules = _registering_modules()
        for rank in range(1, self.processes):
            common = (self.processes, rendezvous, self.device, self.threads, payload, modules)
            p = ctx.Process(
                target=_child,
                args=(rank, *common, _qualified(self._target), self._errors, os.getpid()),
                daemon=True,
            )
            p.start()
            self._children.append(p)
        logger.info("training on %d processes (%d thread(s) each)", self.processes, self.threads)
        self._watching.set()
        threading.Thread(target=self._watch, daemon=True, name="rank-watch").start()
        try:
            torch.set_num_threads(self.threads)
            _init(rendezvous, 0, self.processes, self.device)
        except BaseException:
            self._stop()
            raise
        return self

    def _watch(self) -> None:
        """Stop every rank as soon as one dies: the others would wait for it in a collective."""
        while self._watching.is_set():
            dead = [
                (rank, p.exitcode) for rank, p in enumerate(self._children, 1) if p.exitcode not in (None, 0)
            ]
            if dead:
                rank, code = dead[0]
                logger.error("training process %d exited with code %s; stopping the others", rank, code)
                self.died = (rank, code)
                for p in self._children:
                    if p.is_alive():
                        p.kill()
                _abort_collectives()
                return
            time.sleep(_WATCH_SECONDS)

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
        if self.died is not None:
            rank, code = self.died
            raise RuntimeError(
                f"training process {rank} died (exit code {code}) without a report; the others were stopped"
            ) from exc
        if exc is None and any(p.exitcode != 0 for p in self._children):
            codes = {i + 1: p.exitcode for i, p in enumerate(self._children)}
            raise RuntimeError(f"a training process did not finish cleanly (exit codes by rank: {codes})")

    def _child_failure(self, wait: float) -> tuple[int, str] | None:
        try:
            return self._errors.get(timeout=wait)
        except queue.Empty:
            return None

    def _stop(self) -> None:
        self._watching.clear()
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
