"""Load: bursts far above capacity are refused quickly, deadlines and cancellation are honoured.

Assertions are on status codes, counts and the queue-depth gauge -- never on timings.
The fake model records the size of every batch it ran, which tells exactly which
requests reached it.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve.config import ServerConfig
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread
from tests.integration.test_server_ops import ROOT, red, write_repository

MAX_QUEUE, MAX_BATCH = 8, 4
MODELS = [
    {"name": "burst", "task": "instance", "max_batch_size": MAX_BATCH, "max_wait_ms": 20,
     "max_queue": MAX_QUEUE, "options": {"delay_ms": 200}},
    {"name": "single", "task": "instance", "max_batch_size": 1, "max_queue": 16, "options": {"delay_ms": 400}},
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    specs = load_repository(write_repository(tmp_path_factory.mktemp("repo"), MODELS))
    config = ServerConfig(port=0, metrics_port=None, worker_threads=2)
    with ServerThread(config, specs).start(wait_loaded=True) as srv:
        yield srv


def request(model: str) -> pb.DetectRequest:
    img = np.ascontiguousarray(red(16, 16))
    raw = types_pb.RawImage(data=img.tobytes(), height=16, width=16, channels=3)
    return pb.DetectRequest(model=model, image=types_pb.Image(raw=raw))


class DepthSampler:
    """Reads a model's queue-depth gauge in a thread until stopped; keeps the largest value."""

    def __init__(self, server: ServerThread, model: str) -> None:
        assert server.server is not None
        self._registry = server.server.metrics.registry
        self._labels = {"model": model}
        self._stop = threading.Event()
        self.samples = 0
        self.max_depth = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def depth(self) -> float:
        value = self._registry.get_sample_value("cvserve_queue_depth", self._labels)
        assert value is not None
        return value

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.max_depth = max(self.max_depth, self.depth())
            self.samples += 1

    def __enter__(self) -> DepthSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def burst(address: str, model: str, count: int) -> collections.Counter[str]:
    """Send ``count`` requests at once on one channel; count the status codes."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.VisionServiceStub(channel)

        async def one() -> str:
            try:
                await stub.Detect(request(model), timeout=30)
                return "OK"
            except grpc.aio.AioRpcError as e:
                assert e.details(), f"{e.code().name} without a message"
                return e.code().name

        return collections.Counter(await asyncio.gather(*(one() for _ in range(count))))


class TestBurst:
    def test_a_burst_far_above_capacity_is_refused_and_the_queue_stays_bounded(
        self, server: ServerThread
    ) -> None:
        model = server.dataplane.model_object("burst")
        ran_before = sum(model.batch_sizes)
        count = 25 * (MAX_QUEUE + MAX_BATCH)
        with DepthSampler(server, "burst") as sampler:
            codes = asyncio.run(burst(server.address, "burst", count))
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert codes["OK"] + codes["RESOURCE_EXHAUSTED"] == count
        assert codes["RESOURCE_EXHAUSTED"] > count // 2, codes  # refused, not queued without bound
        assert sum(model.batch_sizes) - ran_before == codes["OK"], (
            model.batch_sizes
        )  # every accepted one ran, once
        assert max(model.batch_sizes) <= MAX_BATCH
        assert sampler.samples > 0 and sampler.max_depth == MAX_QUEUE  # filled, never beyond
        assert sampler.depth() == 0
        assert asyncio.run(burst(server.address, "burst", 1)) == {"OK": 1}  # serving afterwards


class TestDeadlinesAndCancellation:
    def test_requests_whose_deadline_passes_in_the_queue_never_reach_the_model(
        self, server: ServerThread
    ) -> None:
        model = server.dataplane.model_object("single")
        before = len(model.batch_sizes)

        async def scenario() -> list[str]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.VisionServiceStub(channel)
                first = asyncio.ensure_future(stub.Detect(request("single"), timeout=30))
                await asyncio.sleep(0.1)  # the first is in its 400 ms forward pass
                hasty = [stub.Detect(request("single"), timeout=0.2) for _ in range(5)]
                outcomes = await asyncio.gather(*hasty, return_exceptions=True)
                await first
                await asyncio.sleep(0.5)  # time enough for a wrongly queued item to run
                codes = [o.code().name if isinstance(o, grpc.aio.AioRpcError) else "OK" for o in outcomes]
                return codes

        assert asyncio.run(scenario()) == ["DEADLINE_EXCEEDED"] * 5
        assert model.batch_sizes[before:] == [1]

    def test_cancelled_queued_requests_leave_the_queue_and_never_reach_the_model(
        self, server: ServerThread
    ) -> None:
        model = server.dataplane.model_object("single")
        before = len(model.batch_sizes)
        sampler = DepthSampler(server, "single")

        async def scenario() -> tuple[list[float], list[bool]]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.VisionServiceStub(channel)
                first = stub.Detect(request("single"), timeout=30)
                await asyncio.sleep(0.1)  # the first is in its forward pass
                queued = [stub.Detect(request("single"), timeout=30) for _ in range(6)]
                await asyncio.sleep(0.1)
                depths = [sampler.depth()]
                for call in queued:
                    call.cancel()
                await asyncio.sleep(0.05)
                depths.append(sampler.depth())
                await first
                await asyncio.sleep(0.6)  # time enough for a wrongly kept item to run
                return depths, [call.cancelled() for call in queued]

        depths, cancelled = asyncio.run(scenario())
        assert depths == [6, 0]  # queued, then freed at once
        assert all(cancelled)
        assert model.batch_sizes[before:] == [1]  # only the first request ran
