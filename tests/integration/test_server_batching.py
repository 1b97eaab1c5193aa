"""Dynamic batching and the bidirectional stream, through a real server."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve.client.client import Client, ClientError
from cvserve.config import ServerConfig
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread

ROOT = Path(__file__).resolve().parents[2]
FAKE = "tests.fixtures.fake_models:build_fake"


def image(height: int, width: int) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = 200
    return img


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    models = [
        # A long max_wait_ms: a batch of 4 can only be formed by coalescing, and a lone
        # request must still be flushed alone once the wait is over.
        {"name": "det", "task": "instance", "max_batch_size": 4, "max_wait_ms": 150},
        {"name": "seg", "task": "semantic", "max_batch_size": 8, "max_wait_ms": 20},
        # Two instances: batches of one, each forward long enough for the next to start.
        {"name": "det2", "task": "instance", "instances": 2, "options": {"delay_ms": 300}},
    ]
    path = tmp_path_factory.mktemp("repo") / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"config": "fake", "handler": FAKE, **m} for m in models]}))
    config = ServerConfig(port=0, metrics_port=None, worker_threads=2)
    with ServerThread(config, load_repository(path)).start(wait_loaded=True) as srv:
        yield srv


def test_concurrent_requests_coalesce_into_one_batch(server: ServerThread) -> None:
    model = server.dataplane.model_object("det")
    before = len(model.batch_sizes)
    with Client(server.address, timeout=10) as client, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.detect_response, image(16 + i, 16), model="det") for i in range(4)]
        responses = [f.result() for f in futures]
    assert model.batch_sizes[before:] == [4]
    assert [r.timing.batch_size for r in responses] == [4, 4, 4, 4]
    assert [r.image_height for r in responses] == [16, 17, 18, 19]  # each got its own result


def test_lone_request_is_flushed_alone_after_max_wait(server: ServerThread) -> None:
    model = server.dataplane.model_object("det")
    before = len(model.batch_sizes)
    with Client(server.address, timeout=10) as client:
        response = client.detect_response(image(16, 16), model="det")
    assert model.batch_sizes[before:] == [1]
    assert response.timing.batch_size == 1


def test_stream_correlates_responses_and_survives_bad_items(server: ServerThread) -> None:
    sizes = {f"req-{i}": (10 + i, 20 + i) for i in range(6)}

    def requests() -> Iterator[pb.StreamRequest]:
        for cid, (h, w) in sizes.items():
            img = image(h, w)
            raw = types_pb.Image(raw=types_pb.RawImage(data=img.tobytes(), height=h, width=w, channels=3))
            if cid == "req-2":
                yield pb.StreamRequest(
                    correlation_id=cid,
                    detect=pb.DetectRequest(model="det", image=types_pb.Image(encoded=b"junk")),
                )
            elif cid == "req-4":
                yield pb.StreamRequest(correlation_id=cid, segment=pb.SegmentRequest(model="seg", image=raw))
            elif cid == "req-5":
                yield pb.StreamRequest(
                    correlation_id=cid, detect=pb.DetectRequest(model="missing", image=raw)
                )
            else:
                yield pb.StreamRequest(correlation_id=cid, detect=pb.DetectRequest(model="det", image=raw))

    with grpc.insecure_channel(server.address) as channel:
        responses = list(pb_grpc.VisionServiceStub(channel).PredictStream(requests(), timeout=10))
    by_id = {r.correlation_id: r for r in responses}
    assert sorted(by_id) == sorted(sizes)
    assert (
        by_id["req-2"].error.code_name == "INVALID_ARGUMENT"
        and "cannot decode" in by_id["req-2"].error.message
    )
    assert by_id["req-2"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_id["req-5"].error.code_name == "NOT_FOUND"
    assert by_id["req-4"].WhichOneof("result") == "segment"
    assert (by_id["req-4"].segment.image_height, by_id["req-4"].segment.image_width) == sizes["req-4"]
    for cid in ("req-0", "req-1", "req-3"):
        detect = by_id[cid].detect
        assert (detect.image_height, detect.image_width) == sizes[cid]
        assert detect.detections[0].class_name == "red"


def test_client_stream_pipelines_many_images(server: ServerThread) -> None:
    images: list[bytes | np.ndarray] = [image(8 + i, 8) for i in range(10)]
    images[3] = b"broken"
    with Client(server.address, timeout=10) as client:
        results = dict(client.predict_stream(images, model="seg"))
    assert sorted(results) == list(range(10))
    assert isinstance(results[3], ClientError) and results[3].code == grpc.StatusCode.INVALID_ARGUMENT
    for i in (0, 5, 9):
        assert results[i].semantic.labels.shape == (8 + i, 8)
    seg = server.dataplane.model_object("seg")
    assert max(seg.batch_sizes) > 1  # pipelined items shared forward passes


def test_async_client_matches_sync_client(server: ServerThread) -> None:
    import asyncio

    from cvserve.client.client import AsyncClient

    async def main() -> tuple[object, list[dict]]:
        async with AsyncClient(server.address, timeout=10) as client:
            buf = io.BytesIO()
            Image.fromarray(image(12, 14)).save(buf, format="PNG")
            return await client.predict(buf.getvalue(), model="det"), await client.list_models()

    prediction, models = asyncio.run(main())
    assert prediction.image_size == (12, 14) and prediction.instances[0].category_id == 0
    assert [m["name"] for m in models] == ["det", "seg", "det2"]


def test_two_instances_run_two_forwards_at_once(server: ServerThread) -> None:
    model = server.dataplane.model_object("det2")
    one = server.dataplane.model_object("det")
    with Client(server.address, timeout=10) as client, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.detect_response, image(16, 16 + i), model="det2") for i in range(4)]
        responses = [f.result() for f in futures]
    assert [r.image_width for r in responses] == [16, 17, 18, 19]
    assert model.batch_sizes[-4:] == [1, 1, 1, 1]
    assert model.max_running == 2  # never more than its instances
    assert one.max_running == 1  # the default: one at a time
