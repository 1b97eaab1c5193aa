"""Dynamic batcher behaviour, in plain asyncio with synchronous fake handlers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from cvserve.dataplane.batcher import Batcher, BatchHandlerError, BatchReport, ItemTiming
from cvserve.errors import DeadlineExceededError, QueueFullError, ServerDrainingError


class Recorder:
    """A batch handler that doubles numbers, records batches, and can be slowed or blocked."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.gate: threading.Event | None = None

    def __call__(self, items: list[int]) -> list[object]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay_s:
            time.sleep(self.delay_s)
        return [ValueError(f"bad item {x}") if x < 0 else x * 2 for x in items]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_flushes_when_batch_is_full_without_waiting_for_timeout() -> None:
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=4, max_wait_ms=10_000, max_queue=16, name="m")
        results = await asyncio.gather(*(b.submit(i) for i in range(4)))
        await b.close()
        return rec, results

    rec, results = run(main())
    assert results == [0, 2, 4, 6]
    assert rec.batches == [[0, 1, 2, 3]]


def test_flushes_partial_batch_on_timeout() -> None:
    async def main():
        rec = Recorder()
        reports: list[BatchReport] = []
        b = Batcher(rec, max_batch_size=8, max_wait_ms=30, max_queue=16, on_batch=reports.append)
        timing = ItemTiming()
        results = await asyncio.gather(b.submit(1, timing=timing), b.submit(2))
        await b.close()
        return rec, results, reports, timing

    rec, results, reports, timing = run(main())
    assert results == [2, 4]
    assert rec.batches == [[1, 2]]
    assert [r.size for r in reports] == [2]
    assert timing.batch_size == 2
    assert timing.queue_s > 0


def test_no_early_flush_before_max_wait() -> None:
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=4, max_wait_ms=300, max_queue=16)
        task = asyncio.ensure_future(asyncio.gather(b.submit(1), b.submit(2)))
        await asyncio.sleep(0.05)
        before = list(rec.batches)
        results = await task
        await b.close()
        return before, rec, results

    before, rec, results = run(main())
    assert before == []
    assert rec.batches == [[1, 2]]
    assert results == [2, 4]


def test_requests_arriving_during_a_forward_form_the_next_batch() -> None:
    async def main():
        rec = Recorder(delay_s=0.1)
        b = Batcher(rec, max_batch_size=8, max_wait_ms=0, max_queue=16)
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.02)  # the first batch (of 1) is running now
        rest = await asyncio.gather(*(b.submit(i) for i in range(2, 6)))
        await first
        await b.close()
        return rec, rest

    rec, rest = run(main())
    assert rec.batches == [[1], [2, 3, 4, 5]]
    assert rest == [4, 6, 8, 10]


def test_handler_runs_off_the_event_loop_thread() -> None:
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=2, max_wait_ms=0, max_queue=4, name="m1")
        await b.submit(1)
        await b.close()
        return rec

    rec = run(main())
    assert rec.threads and threading.current_thread().name not in rec.threads


def test_per_item_error_fails_only_that_item() -> None:
    async def main():
        b = Batcher(Recorder(), max_batch_size=3, max_wait_ms=50, max_queue=8)
        out = await asyncio.gather(b.submit(1), b.submit(-1), b.submit(3), return_exceptions=True)
        await b.close()
        return out

    out = run(main())
    assert out[0] == 2 and out[2] == 6
    assert isinstance(out[1], ValueError) and "bad item -1" in str(out[1])


def test_batch_wide_failure_fails_every_item() -> None:
    def boom(items: list[int]) -> list[int]:
        raise RuntimeError("device lost")

    async def main():
        b = Batcher(boom, max_batch_size=2, max_wait_ms=50, max_queue=8)
        out = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        await b.close()
        return out

    out = run(main())
    assert all(isinstance(e, RuntimeError) and "device lost" in str(e) for e in out)


def test_wrong_number_of_results_raises() -> None:
    async def main():
        b = Batcher(lambda items: items[:1], max_batch_size=2, max_wait_ms=50, max_queue=8)
        out = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        await b.close()
        return out

    out = run(main())
    assert all(isinstance(e, BatchHandlerError) for e in out)
    assert "returned 1 results for 2 items" in str(out[0])


def test_out_of_memory_splits_batch_in_halves() -> None:
    sizes: list[int] = []

    def fits_two(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if len(items) > 2:
            raise MemoryError("out of memory")
        return [x + 100 for x in items]

    async def main():
        b = Batcher(fits_two, max_batch_size=8, max_wait_ms=50, max_queue=16)
        out = await asyncio.gather(*(b.submit(i) for i in range(5)))
        await b.close()
        return out

    assert run(main()) == [100, 101, 102, 103, 104]
    assert sizes == [5, 2, 3, 1, 2]


def test_out_of_memory_on_single_item_fails_it() -> None:
    def oom(items: list[int]) -> list[int]:
        raise MemoryError("out of memory")

    async def main():
        b = Batcher(oom, max_batch_size=1, max_wait_ms=0, max_queue=4)
        with pytest.raises(MemoryError):
            await b.submit(1)
        await b.close()

    run(main())


def test_queue_full_is_refused() -> None:
    async def main():
        rec = Recorder()
        rec.gate = threading.Event()
        b = Batcher(rec, max_batch_size=1, max_wait_ms=0, max_queue=2)
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)  # item 0 is in the (blocked) handler, the queue is empty
        queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError, match="queue full"):
            await b.submit(3)
        rec.gate.set()
        results = await asyncio.gather(running, *queued)
        await b.close()
        return results

    assert run(main()) == [0, 2, 4]


def test_deadline_passed_in_queue_is_dropped_before_forward() -> None:
    async def main():
        rec = Recorder(delay_s=0.15)
        b = Batcher(rec, max_batch_size=1, max_wait_ms=0, max_queue=8)
        first = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.02)
        late = b.submit(2, deadline=time.monotonic() + 0.05)
        ok = b.submit(3, deadline=time.monotonic() + 5)
        out = await asyncio.gather(first, late, ok, return_exceptions=True)
        await b.close()
        return rec, out

    rec, out = run(main())
    assert out[0] == 2 and out[2] == 6
    assert isinstance(out[1], DeadlineExceededError)
    assert [2] not in rec.batches


def test_cancelled_request_leaves_the_queue() -> None:
    async def main():
        rec = Recorder()
        rec.gate = threading.Event()
        b = Batcher(rec, max_batch_size=1, max_wait_ms=0, max_queue=1)
        running = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0)
        assert b.depth == 1
        queued.cancel()
        await asyncio.sleep(0)
        depth_after_cancel = b.depth
        replacement = asyncio.ensure_future(b.submit(2))  # the freed slot is usable
        rec.gate.set()
        out = await asyncio.gather(running, replacement)
        await b.close()
        return rec, depth_after_cancel, out

    rec, depth, out = run(main())
    assert depth == 0
    assert out == [0, 4]
    assert [1] not in rec.batches


def test_close_runs_queued_items_then_refuses_new_ones() -> None:
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch_size=4, max_wait_ms=10_000, max_queue=8)
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(2)]
        await asyncio.sleep(0)
        await b.close()  # flushes without waiting max_wait_ms
        with pytest.raises(ServerDrainingError):
            await b.submit(5)
        return await asyncio.gather(*pending)

    assert run(main()) == [0, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 2.5}, "max_batch_size"),
        ({"max_queue": 0}, "max_queue"),
        ({"max_wait_ms": -1}, "max_wait_ms"),
        ({"max_wait_ms": float("inf")}, "max_wait_ms"),
        ({"max_wait_ms": "5"}, "max_wait_ms"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict, message: str) -> None:
    args = {"max_batch_size": 2, "max_wait_ms": 1, "max_queue": 4} | kwargs
    with pytest.raises(ValueError, match=message):
        Batcher(Recorder(), **args)


def test_non_callable_handler_fails_at_construction() -> None:
    with pytest.raises(TypeError, match="callable"):
        Batcher(42, max_batch_size=1, max_wait_ms=0, max_queue=1)  # type: ignore[arg-type]


class Meeting:
    """A handler whose calls wait for each other: it records the most calls inside at once."""

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties)
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        with contextlib.suppress(threading.BrokenBarrierError):  # the others never came
            self.barrier.wait(2)
        with self.lock:
            self.inside -= 1
        return [x * 2 for x in items]


@pytest.mark.parametrize("concurrency", [1, 2, 3])
def test_concurrency_runs_that_many_batches_at_once(concurrency: int) -> None:
    async def main():
        meet = Meeting(concurrency)
        b = Batcher(meet, max_batch_size=1, max_wait_ms=0, max_queue=16, concurrency=concurrency)
        results = await asyncio.gather(*(b.submit(i) for i in range(6)))
        in_flight_after = b.in_flight
        await b.close()
        return meet, results, in_flight_after

    meet, results, in_flight_after = run(main())
    assert results == [0, 2, 4, 6, 8, 10]
    assert meet.most == concurrency
    assert in_flight_after == 0


def test_queue_fills_while_every_instance_is_busy() -> None:
    # Two instances busy: the four requests that arrive meanwhile form one batch.
    async def main():
        rec = Recorder()
        rec.gate = threading.Event()
        b = Batcher(rec, max_batch_size=4, max_wait_ms=0, max_queue=16, concurrency=2)
        first = []
        for i in (0, 1):  # one at a time: each becomes a batch of its own
            first.append(asyncio.ensure_future(b.submit(i)))
            while b.in_flight < i + 1:
                await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(2, 6)]
        await asyncio.sleep(0.05)
        assert b.depth == 4
        rec.gate.set()
        results = await asyncio.gather(*first, *rest)
        await b.close()
        return rec, results

    rec, results = run(main())
    assert results == [0, 2, 4, 6, 8, 10]
    assert sorted(map(sorted, rec.batches)) == [[0], [1], [2, 3, 4, 5]]


def test_close_waits_for_every_running_batch() -> None:
    async def main():
        rec = Recorder(delay_s=0.1)
        b = Batcher(rec, max_batch_size=1, max_wait_ms=0, max_queue=16, concurrency=2)
        futures = [asyncio.ensure_future(b.submit(i)) for i in range(4)]
        await asyncio.sleep(0.02)
        await b.close()
        return [f.done() for f in futures], [f.result() for f in futures]

    done, results = run(main())
    assert done == [True] * 4
    assert results == [0, 2, 4, 6]


def test_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError, match="concurrency must be an integer >= 1"):
        Batcher(Recorder(), max_batch_size=1, max_wait_ms=0, max_queue=1, concurrency=0)
