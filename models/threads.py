"""Sharing the CPU's intra-op threads among forward passes that run at the same time.

A server may run several forward passes of a model at once (Triton's model instances,
TorchServe's workers). On a CPU, two passes of the small demo detector on one thread
each measured 11.4 images/s on 2 cores, against 7.0-8.1 for one pass at a time on both:
small convolutions split across threads spend much of their time in synchronisation,
and the Python parts of a detector run on one thread anyway. A lone request still
wants every core. :class:`IntraOpShare` gives each pass ``threads // passes running``
intra-op threads as it starts, so one request runs on all cores and two share them.

This relies on torch's OpenMP backend (its default CPU build), where
``torch.set_num_threads`` sets the calling thread's own OpenMP team size. Under the
native or TBB backends the setting is process-wide, so the share does nothing there and
:func:`cpu_instances` keeps one pass at a time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from types import TracebackType
from typing import Any

import torch

__all__ = [
    "PROCESS_THREADS",
    "IntraOpShare",
    "cpu_cores",
    "cpu_instances",
    "cpu_share",
    "forward_threads",
    "limit_helper_thread",
    "per_thread_intra_op",
]

# Most forward passes at once that ``instances: auto`` runs on a CPU: beyond a few, the
# Python parts of the passes queue on the interpreter lock.
MAX_AUTO_CPU_INSTANCES = 4
# The process's intra-op threads as set up before any server thread runs (torch's default:
# one per core): what the passes share. Read at import, because torch.set_num_threads in
# any thread also changes the count that threads which never set their own start with.
PROCESS_THREADS = torch.get_num_threads()


@functools.cache
def per_thread_intra_op() -> bool:
    """Whether torch's intra-op thread count is per calling thread (the OpenMP backend)."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_instances() -> int:
    """How many forward passes ``instances: auto`` runs at once on this machine's CPU.

    One per core up to :data:`MAX_AUTO_CPU_INSTANCES`, each on an equal share of the
    intra-op threads; 1 where the thread count cannot be set per pass.
    """
    if not per_thread_intra_op():
        return 1
    return max(1, min(cpu_cores(), MAX_AUTO_CPU_INSTANCES))


class IntraOpShare:
    """A context manager dividing ``threads`` intra-op threads among the passes inside it.

    Entering sets the calling thread's torch intra-op threads to ``threads // n`` (at
    least 1), ``n`` counting the passes inside at that moment, this one included. A pass
    keeps its count until it leaves, so a lone pass that another joins keeps all threads
    until it ends (the machine is briefly oversubscribed) and the next one starts with
    its share. The count is only set when it changes, so a steady load sets it once per
    thread.

    Args:
        threads: the threads to share; default :data:`PROCESS_THREADS`.

    Raises:
        ValueError: ``threads`` < 1.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = PROCESS_THREADS if threads is None else threads
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        self._lock = threading.Lock()
        self._running = 0

    @property
    def running(self) -> int:
        """Passes inside the share now."""
        return self._running

    def __enter__(self) -> int:
        with self._lock:
            self._running += 1
            share = max(1, self.threads // self._running)
        if per_thread_intra_op() and torch.get_num_threads() != share:
            torch.set_num_threads(share)
        return share

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._running -= 1


@functools.cache
def cpu_share() -> IntraOpShare:
    """The process's one share of CPU intra-op threads, for every model's CPU passes.

    One share of :data:`PROCESS_THREADS` for all models, so two models busy at once divide
    the cores too.
    """
    return IntraOpShare()


def forward_threads(device: str) -> contextlib.AbstractContextManager[Any]:
    """What a model's forward runs inside: :func:`cpu_share` on a CPU, nothing on a GPU."""
    return cpu_share() if device == "cpu" else contextlib.nullcontext()


def limit_helper_thread() -> None:
    """Run the calling thread's torch operations on one intra-op thread.

    For the threads around the forward passes (decoding, pre- and post-processing): their
    torch work is small, and a team of OpenMP threads of their own would spin on the cores
    the passes need each time it finishes. Every pass sets its own count on entering
    :func:`forward_threads`, so the process-wide side effect of ``torch.set_num_threads``
    (threads that never set a count start with the last one set) does not reach them.
    Does nothing where the count is process-wide (it would throttle the passes).
    """
    if per_thread_intra_op():
        torch.set_num_threads(1)
