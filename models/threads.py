"""Sharing the CPU's intra-op threads among forward passes that run at the same time.

A server may run several forward passes of a model at once (Triton's model instances,
TorchServe's workers). On a CPU, two passes of the small demo detector on one thread
each ran 17.6-21.8 images/s on 2 cores, against 16.0-17.1 for one pass at a time on both
(in process, bf16): small convolutions split across threads spend much of their time in
synchronisation, and the Python parts of a detector run on one thread anyway. A lone
request still wants every core. :class:`IntraOpShare` gives each pass ``threads // n``
intra-op threads as it starts, ``n`` the most passes at once within the last second, so
one request at a time runs on all cores and concurrent ones share them.

This relies on torch's OpenMP backend (its default CPU build), where
``torch.set_num_threads`` sets the calling thread's own OpenMP team size. Under the
native or TBB backends the setting is process-wide, so the share does nothing there and
:func:`cpu_instances` keeps one pass at a time.

**Idle teams.** Under libgomp (the OpenMP runtime torch's wheels ship) every thread that
runs a parallel region on more than one thread keeps its own team of worker threads until
the thread exits, and once the workers of all teams outnumber the CPUs libgomp stops
letting any of them spin between regions: each of a forward's hundreds of parallel
regions then waits for a woken worker. Measured on 2 cores with the demo detector in
bf16, a forward on a second thread took 1.5-1.6x as long as on the main thread in the same
minute while the main thread's idle team from loading the model existed (72.7 against 48.6
ms, 93.6 against 57.6), and the same once that team was released (62.6 against 62.3;
``benchmarks/README.md``, "Idle OpenMP teams"). So every thread that
may have made a team gives it back when it is done (:func:`release_team`): a pass with
more than one thread on leaving the share, a helper thread when it is limited, a thread
after loading a model or predicting a batch in-process; only passes running now hold
teams.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import threading
import time
import types
from collections.abc import Callable
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
    "gomp_parallel_address",
    "kernel_threads",
    "libgomp",
    "limit_helper_thread",
    "per_thread_intra_op",
    "release_team",
    "shares_team",
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


@functools.cache
def libgomp() -> ctypes.CDLL | None:
    """The libgomp torch runs its intra-op threads on, or None (other runtimes, no OpenMP).

    Only libgomp: there ``omp_pause_resource_all`` frees the calling thread's team alone,
    while LLVM's and Intel's runtimes pause every thread of the process; and its
    ``GOMP_parallel`` is what cvserve's C kernels share a pass's team with
    (:func:`shares_team`).
    """
    if not per_thread_intra_op():
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "/libgomp" in line}
    except OSError:
        return None
    # torch's own copy first, should another package have loaded a second libgomp.
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), p)):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "omp_pause_resource_all") and hasattr(lib, "GOMP_parallel"):
            return lib
    return None


@functools.cache
def gomp_parallel_address() -> int:
    """The address of :func:`libgomp`'s ``GOMP_parallel``, or 0 without libgomp.

    What cvserve's C kernels (RoIAlign, the RPN's NMS) call to run on the calling thread's
    own OpenMP team, the threads torch's parallel work uses, rather than a pool of their own.
    """
    lib = libgomp()
    return (ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value or 0) if lib is not None else 0


@functools.cache
def shares_team(kernel: types.ModuleType) -> bool:
    """Hand :func:`gomp_parallel_address` to a C kernel module once (its ``set_openmp``);
    whether it can now spread its work over the calling thread's team."""
    kernel.set_openmp(gomp_parallel_address())
    return gomp_parallel_address() != 0


def kernel_threads(kernel: types.ModuleType) -> int:
    """The threads a C kernel module may use in the calling thread: its intra-op count
    (``torch.get_num_threads()``, the pass's share) where :func:`shares_team`, else 1."""
    return torch.get_num_threads() if shares_team(kernel) else 1


@functools.cache
def _libgomp_pause() -> Callable[[int], int] | None:
    """``omp_pause_resource_all`` of :func:`libgomp`, or None."""
    lib = libgomp()
    if lib is None:
        return None
    pause = lib.omp_pause_resource_all
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause  # type: ignore[no-any-return]


_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t


def release_team() -> bool:
    """Give back the calling thread's OpenMP worker threads (see "Idle teams" above).

    Its next parallel region starts a new team (tens of microseconds). Returns whether a
    team could be released: False where torch does not use libgomp, or inside a parallel
    region.
    """
    pause = _libgomp_pause()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0


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
    least 1), ``n`` being the most passes inside at once over the last ``window`` seconds,
    this one included. So a lone request gets every thread, while under concurrent load a
    pass that happens to start alone still takes only its share: the next pass is about
    to join it, and a pass keeps its count until it leaves (on 2 cores, a lone pass's team
    that another joins runs three threads on two cores). The count is only set when it
    changes. A pass that ran on more than one thread releases its team on leaving
    (:func:`release_team`), so idle threads hold none.

    Args:
        threads: the threads to share; default :data:`PROCESS_THREADS`.
        window: seconds a moment of ``n`` passes at once keeps later passes at ``threads // n``.
        clock: monotonic seconds (tests pass a fake).

    Raises:
        ValueError: ``threads`` < 1 or ``window`` < 0.
    """

    def __init__(
        self, threads: int | None = None, window: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threads = PROCESS_THREADS if threads is None else threads
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._running = 0
        self._seen: collections.deque[tuple[float, int]] = collections.deque()  # (time, passes at once)
        self._local = threading.local()  # the share the calling thread's pass took

    @property
    def running(self) -> int:
        """Passes inside the share now."""
        return self._running

    def _note(self) -> int:
        """Record the passes running now; the most at once within the window. Under the lock."""
        now = self._clock()
        while self._seen and self._seen[0][0] < now - self.window:
            self._seen.popleft()
        if self._running > 1:
            self._seen.append((now, self._running))
        return max([self._running, *(n for _, n in self._seen)])

    def __enter__(self) -> int:
        with self._lock:
            self._running += 1
            share = max(1, self.threads // self._note())
        if per_thread_intra_op() and torch.get_num_threads() != share:
            torch.set_num_threads(share)
        self._local.share = share
        return share

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            self._note()  # a moment of overlap lasts until the pass that made it leaves
            self._running -= 1
        if getattr(self._local, "share", 1) > 1:
            release_team()
        self._local.share = 1


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
    Releases any team the thread made before (:func:`release_team`). Does nothing where
    the count is process-wide (it would throttle the passes).
    """
    if per_thread_intra_op():
        # torch sets a thread's OpenMP count lazily, at its first parallel work, to the count
        # some thread set last: a pass setting 2 before then would undo the limit (and leave
        # this thread a team idling beside the passes). get_num_threads() does that first
        # setting now, so the 1 below is the one that stays.
        torch.get_num_threads()
        torch.set_num_threads(1)
        release_team()
