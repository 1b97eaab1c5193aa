"""A dynamic batcher: concurrent requests for one model coalesce into batched forward passes.

Modelled on Ray Serve's ``@serve.batch`` and Triton's dynamic batcher. Each request
gets a future; the queue is flushed into one handler call when ``max_batch_size``
requests wait or the oldest has waited ``max_wait_ms``. The handler runs in the
model's own worker threads, at most ``concurrency`` batches at a time (Triton's model
instances), so the event loop never blocks on a forward pass and requests arriving
while every instance is busy form the next batch.

Failure contract:
    * the handler may return an exception instance in place of a result: only that
      item's future fails (Triton);
    * if the handler raises, every item of that batch fails with the exception (Ray),
      except out-of-memory on a batch of more than one, which is retried as two halves;
    * a handler returning the wrong number of results fails the whole batch;
    * items whose deadline passed while queued fail with ``DeadlineExceededError`` and
      are never run; cancelled requests leave the queue at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from cvserve.errors import DeadlineExceededError, QueueFullError, ServerDrainingError

__all__ = ["BatchHandlerError", "BatchReport", "Batcher", "ItemTiming"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Handler = Callable[[list[T]], Sequence[Any]]


class BatchHandlerError(RuntimeError):
    """The batch handler broke its contract (e.g. returned the wrong number of results)."""


@dataclass
class ItemTiming:
    """Filled in by the batcher for one request.

    Attributes:
        queue_s: time from submission to the start of its forward pass.
        compute_s: duration of that (whole-batch) forward pass.
        batch_size: number of items in that forward pass.
    """

    queue_s: float = 0.0
    compute_s: float = 0.0
    batch_size: int = 0


@dataclass(frozen=True)
class BatchReport:
    """What one executed batch looked like, for metrics and statistics."""

    size: int
    queue_s: tuple[float, ...]
    compute_s: float
    failed: bool


@dataclass(eq=False)
class _Item:
    payload: Any
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float | None
    timing: ItemTiming = field(default_factory=ItemTiming)


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only a model that uses torch can raise its OOM
    return torch is not None and isinstance(error, torch.cuda.OutOfMemoryError)


def _release_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Batcher(Generic[T, R]):
    """Groups submitted items into batches for a synchronous batch handler.

    Args:
        handler: ``handler(list_of_items) -> results``, one result (or exception
            instance) per item, in order. Called in ``executor``, never on the loop.
        max_batch_size: most items per handler call (>= 1).
        max_wait_ms: longest the oldest queued item waits for the batch to fill (>= 0).
        max_queue: most items waiting (in-flight batches not counted); more are
            refused with :class:`~cvserve.errors.QueueFullError`.
        executor: where the handler runs; default private threads, one per
            ``concurrency``. A given executor needs at least that many threads.
        name: used in errors and logs (the model name).
        on_batch: called on the loop after each executed batch.
        concurrency: most batches running at once (>= 1).

    Raises:
        ValueError: invalid limits; TypeError: a non-callable handler.
    """

    def __init__(
        self,
        handler: Handler[T],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        executor: Executor | None = None,
        name: str = "batcher",
        on_batch: Callable[[BatchReport], None] | None = None,
        concurrency: int = 1,
    ) -> None:
        if not callable(handler):
            raise TypeError(f"{name}: handler must be callable, got {type(handler).__name__}")
        limits = (("max_batch_size", max_batch_size), ("max_queue", max_queue), ("concurrency", concurrency))
        for label, value in limits:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {label} must be an integer >= 1, got {value!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, int | float):
            raise ValueError(f"{name}: max_wait_ms must be a number, got {max_wait_ms!r}")
        if not math.isfinite(max_wait_ms) or max_wait_ms < 0:
            raise ValueError(f"{name}: max_wait_ms must be finite and >= 0, got {max_wait_ms!r}")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._handler = handler
        self._own_executor = executor is None
        self.concurrency = concurrency
        self._executor = executor or ThreadPoolExecutor(concurrency, thread_name_prefix=f"batch-{name}")
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False
        self._in_flight = 0

    @property
    def depth(self) -> int:
        """Items waiting in the queue (not counting the batch being run)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Items in the batches being run."""
        return self._in_flight

    async def submit(
        self, payload: T, *, deadline: float | None = None, timing: ItemTiming | None = None
    ) -> R:
        """Queue one item and wait for its result.

        Args:
            payload: the item handed to the handler.
            deadline: ``time.monotonic()`` value after which the item is dropped
                unrun if still queued.
            timing: filled in with queue and compute times once the item ran.

        Raises:
            QueueFullError: ``max_queue`` items already wait.
            ServerDrainingError: the batcher is closing.
            DeadlineExceededError: the deadline passed while queued.
            Exception: whatever the handler raised or returned for this item.
        """
        if self._closing:
            raise ServerDrainingError(f"model {self.name!r} is shutting down")
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(f"model {self.name!r}: queue full ({self.max_queue} requests waiting)")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")
        item = _Item(payload, asyncio.get_running_loop().create_future(), time.monotonic(), deadline)
        if timing is not None:
            item.timing = timing
        self._queue.append(item)
        self._wakeup.set()
        try:
            return await item.future  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            # A cancelled request frees its queue slot at once instead of at flush time.
            with contextlib.suppress(ValueError):
                self._queue.remove(item)
                self._wakeup.set()
            raise

    async def close(self) -> None:
        """Refuse new items, run everything already queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    async def _run(self) -> None:
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # While every instance is busy the queue keeps filling: the next batch is
            # taken when one frees up, as large as what waits by then.
            while len(self._running) >= self.concurrency:
                self._slot_free.clear()
                await self._slot_free.wait()
            await self._wait_for_batch()
            batch = self._take_batch()
            if batch:
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                self._running.add(task)
                task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slot_free.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: batch bookkeeping failed", self.name, exc_info=task.exception())

    async def _wait_for_batch(self) -> None:
        """Return when a full batch waits, the oldest item's wait is over, or we are closing."""
        while self._queue and len(self._queue) < self.max_batch_size and not self._closing:
            remaining = self._queue[0].enqueued + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if item.future.done():  # cancelled by its caller
                continue
            if item.deadline is not None and now >= item.deadline:
                waited_ms = (now - item.enqueued) * 1000
                item.future.set_exception(
                    DeadlineExceededError(
                        f"model {self.name!r}: deadline passed after {waited_ms:.0f} ms in the queue; not run"
                    )
                )
                continue
            batch.append(item)
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        self._in_flight += len(batch)
        failed = False
        try:
            results = await loop.run_in_executor(self._executor, self._call, [it.payload for it in batch])
        except Exception as e:
            failed = True
            results = [e] * len(batch)
        finally:
            self._in_flight -= len(batch)
        compute_s = time.monotonic() - start
        for item, result in zip(batch, results, strict=True):
            item.timing.queue_s = start - item.enqueued
            item.timing.compute_s = compute_s
            item.timing.batch_size = len(batch)
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        if self._on_batch is not None:
            queue_s = tuple(it.timing.queue_s for it in batch)
            self._on_batch(BatchReport(size=len(batch), queue_s=queue_s, compute_s=compute_s, failed=failed))

    def _call(self, payloads: list[T]) -> list[Any]:
        """Run the handler (worker thread); halve and retry a multi-item batch on out-of-memory."""
        try:
            results = list(self._handler(payloads))
        except Exception as e:
            if len(payloads) > 1 and _is_out_of_memory(e):
                half = len(payloads) // 2
                logger.warning(
                    "%s: out of memory on a batch of %d, retrying as %d + %d",
                    self.name,
                    len(payloads),
                    half,
                    len(payloads) - half,
                )
                _release_cuda_cache()
                return self._call(payloads[:half]) + self._call(payloads[half:])
            raise
        if len(results) != len(payloads):
            raise BatchHandlerError(
                f"{self.name}: batch handler returned {len(results)} results for {len(payloads)} items"
            )
        return results
