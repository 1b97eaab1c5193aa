"""The Open Inference Protocol with the unmodified ``tritonclient.grpc`` against a real server.

Metadata, inference (BYTES and UINT8, single and batched, sync, async, streaming),
statistics, and equality with our own ``Detect``. Error statuses are in
``test_kserve_errors.py``, the model repository in ``test_kserve_repository.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import queue
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image

from cvserve._proto.inference import grpc_service_pb2_grpc as pb_grpc
from cvserve.client.client import Client
from cvserve.config import ServerConfig
from cvserve.kserve.servicer import add_kserve_servicer
from cvserve.models.repository import ModelSpec, load_repository
from cvserve.server.build import ServerThread

tc = pytest.importorskip("tritonclient.grpc")

ROOT = Path(__file__).resolve().parents[2]
FAKE = "tests.fixtures.fake_models:build_fake"
MODELS = [
    {"name": "det", "task": "instance", "max_batch_size": 4, "max_wait_ms": 150, "version": "3"},
    {"name": "seg", "task": "semantic"},
]
INSTANCE_OUTPUTS = ["boxes", "scores", "classes", "masks", "num_detections", "image_size"]


def write_repository(directory: Path, models: list[dict]) -> Path:
    """A repository YAML of fake models (weight-free, deterministic)."""
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"config": "fake", "handler": FAKE, **m} for m in models]}))
    return path


def scene(height: int = 48, width: int = 64, flip: bool = False) -> np.ndarray:
    """Red left part, blue lower right part: the fake detector finds a red and a blue instance."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2 + 4, 0] = 240
    img[height // 4 :, width // 2 :, 2] = 250
    return np.ascontiguousarray(img[:, ::-1]) if flip else img


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def bytes_input(images: list[bytes], batched: bool = False) -> tc.InferInput:
    data = np.array(images, dtype=object).reshape((len(images), 1) if batched else (1,))
    tensor = tc.InferInput("image", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def uint8_input(array: np.ndarray) -> tc.InferInput:
    tensor = tc.InferInput("image", list(array.shape), "UINT8")
    tensor.set_data_from_numpy(array)
    return tensor


@contextlib.contextmanager
def kserve_server(specs: list[ModelSpec], **config: Any) -> Iterator[ServerThread]:
    """A server with both APIs on an ephemeral port, its models loaded (``config``: ServerConfig fields)."""
    if str(ROOT) not in sys.path:  # the fake models' handler is imported from the repository root
        sys.path.insert(0, str(ROOT))
    settings = ServerConfig(**{"port": 0, "metrics_port": None, "worker_threads": 2, **config})
    with ServerThread(settings, specs, servicers=[add_kserve_servicer]).start(wait_loaded=True) as srv:
        yield srv


@contextlib.contextmanager
def triton_client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    """tritonclient's gRPC client on ``server``, closed afterwards."""
    triton = tc.InferenceServerClient(server.address)
    try:
        yield triton
    finally:
        triton.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with kserve_server(load_repository(write_repository(tmp_path_factory.mktemp("repo"), MODELS))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    with triton_client(server) as triton:
        yield triton


def test_live_ready_and_server_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("det") and client.is_model_ready("det", "3")
    assert not client.is_model_ready("det", "1") and not client.is_model_ready("nope")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "cvserve"
    assert {"model_repository", "statistics"} <= set(metadata["extensions"])


def test_model_metadata_and_config(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("det")
    assert meta.name == "det" and list(meta.versions) == ["3"]
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [("image", "BYTES", [-1, 1])]
    assert [o.name for o in meta.outputs] == INSTANCE_OUTPUTS
    assert {o.name: o.datatype for o in meta.outputs}["classes"] == "INT64"
    seg = client.get_model_metadata("seg")
    assert [(o.name, o.datatype) for o in seg.outputs] == [("labels", "UINT8"), ("image_size", "INT32")]
    config = client.get_model_config("det").config
    assert config.max_batch_size == 4 and config.dynamic_batching.max_queue_delay_microseconds == 150_000
    assert config.parameters["class_names"].string_value == '["red", "green", "blue"]'


def test_infer_encoded_image_matches_detect(server: ServerThread, client: tc.InferenceServerClient) -> None:
    data = png(scene())
    result = client.infer("det", [bytes_input([data])], request_id="r-1")
    assert result.get_response().id == "r-1" and result.get_response().model_version == "3"
    with Client(server.address, timeout=10) as ours:
        expected = ours.detect(data, model="det")
    count = int(result.as_numpy("num_detections")[0])
    assert count == len(expected.instances) == 2
    np.testing.assert_allclose(result.as_numpy("boxes"), [i.box for i in expected.instances], rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("scores"), [i.score for i in expected.instances], rtol=1e-6)
    assert result.as_numpy("classes").tolist() == [i.category_id for i in expected.instances]
    assert result.as_numpy("masks").tolist() == [i.mask.counts for i in expected.instances]
    assert result.as_numpy("image_size").tolist() == [48, 64]


def test_uint8_single_and_encoded_agree(client: tc.InferenceServerClient) -> None:
    raw = client.infer("det", [uint8_input(scene())])
    encoded = client.infer("det", [bytes_input([png(scene())])])
    for name in INSTANCE_OUTPUTS:
        np.testing.assert_array_equal(raw.as_numpy(name), encoded.as_numpy(name))


@pytest.mark.parametrize("kind", ["BYTES", "UINT8"])
def test_batch_of_two_is_served_through_the_dynamic_batcher(
    server: ServerThread, client: tc.InferenceServerClient, kind: str
) -> None:
    images = [scene(), scene(flip=True)]
    before = client.get_inference_statistics("det").model_stats[0]
    tensor = (
        bytes_input([png(i) for i in images], batched=True)
        if kind == "BYTES"
        else uint8_input(np.stack(images))
    )
    result = client.infer("det", [tensor])
    after = client.get_inference_statistics("det").model_stats[0]
    assert after.inference_count - before.inference_count == 2
    assert after.execution_count - before.execution_count == 1  # both images in one forward pass
    boxes, counts = result.as_numpy("boxes"), result.as_numpy("num_detections")
    assert boxes.shape == (2, 2, 4) and counts.tolist() == [2, 2]
    single = [client.infer("det", [uint8_input(img)]) for img in images]
    for i, one in enumerate(single):
        np.testing.assert_array_equal(boxes[i], one.as_numpy("boxes"))
        assert result.as_numpy("masks")[i].tolist() == one.as_numpy("masks").tolist()


def test_requested_outputs_parameters_and_typed_contents(
    server: ServerThread, client: tc.InferenceServerClient
) -> None:
    outputs = [tc.InferRequestedOutput("scores"), tc.InferRequestedOutput("classes")]
    result = client.infer(
        "det",
        [uint8_input(scene())],
        outputs=outputs,
        parameters={"max_detections": 1, "score_threshold": 0.1},
    )
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["scores", "classes"]
    assert len(result.as_numpy("scores")) == 1 and result.as_numpy("boxes") is None
    filtered = client.infer("det", [uint8_input(scene())], parameters={"class_names": "blue"})
    assert filtered.as_numpy("classes").tolist() == [2]
    # binary_data=false on every output: typed contents, as a grpc client without raw support reads them.
    typed = tc.service_pb2.ModelInferRequest(model_name="det")
    typed.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png(scene()))
    typed.outputs.add(name="scores").parameters["binary_data"].bool_param = False
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(typed, timeout=10)
    assert not reply.raw_output_contents and len(reply.outputs[0].contents.fp32_contents) == 2


def test_semantic_label_map(client: tc.InferenceServerClient) -> None:
    result = client.infer("seg", [uint8_input(scene())])
    labels = result.as_numpy("labels")
    assert labels.dtype == np.uint8 and labels.shape == (48, 64)
    assert labels[0, 0] == 1 and labels[-1, -1] == 3  # red -> label 1, blue -> label 3
    batch = client.infer("seg", [bytes_input([png(scene()), png(scene(24, 32))], batched=True)])
    assert batch.as_numpy("labels").shape == (2, 48, 64)
    assert batch.as_numpy("image_size").tolist() == [[48, 64], [24, 32]]
    assert (batch.as_numpy("labels")[1, 24:, :] == 255).all()


def test_async_infer(client: tc.InferenceServerClient) -> None:
    done: queue.Queue = queue.Queue()
    for i in range(3):
        client.async_infer(
            "det",
            [uint8_input(scene(flip=bool(i % 2)))],
            callback=lambda result, error: done.put((result, error)),
            request_id=str(i),
        )
    results = [done.get(timeout=20) for _ in range(3)]
    assert all(error is None for _, error in results)
    assert sorted(r.get_response().id for r, _ in results) == ["0", "1", "2"]
    assert all(r.as_numpy("num_detections").tolist() == [2] for r, _ in results)


def test_stream_infer(client: tc.InferenceServerClient) -> None:
    done: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: done.put((result, error)))
    try:
        for i in range(4):
            client.async_stream_infer("det", [uint8_input(scene())], request_id=f"s{i}")
        results = [done.get(timeout=20) for _ in range(4)]
    finally:
        client.stop_stream()
    assert all(error is None for _, error in results)
    assert sorted(r.get_response().id for r, _ in results) == ["s0", "s1", "s2", "s3"]
    assert all(r.as_numpy("boxes").shape == (2, 4) for r, _ in results)


def test_statistics_move_after_inference(client: tc.InferenceServerClient) -> None:
    before = client.get_inference_statistics("seg").model_stats[0]
    client.infer("seg", [uint8_input(scene())])
    after = client.get_inference_statistics("seg").model_stats[0]
    assert after.inference_count == before.inference_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.last_inference > 0 and after.last_inference >= before.last_inference
    every = client.get_inference_statistics()
    assert {s.name for s in every.model_stats} == {"det", "seg"}


def test_asyncio_client(server: ServerThread) -> None:
    aio = pytest.importorskip("tritonclient.grpc.aio")

    async def run() -> list:
        client = aio.InferenceServerClient(server.address)
        try:
            assert await client.is_model_ready("det")
            calls = [client.infer("det", [uint8_input(scene())], request_id=str(i)) for i in range(3)]
            return await asyncio.gather(*calls)
        finally:
            await client.close()

    results = asyncio.run(run())
    assert [r.get_response().id for r in results] == ["0", "1", "2"]
    assert all(r.as_numpy("classes").tolist() == [0, 2] for r in results)


def test_bearer_token_through_headers(tmp_path: Path) -> None:
    specs = load_repository(write_repository(tmp_path, MODELS[:1]))
    config = ServerConfig(port=0, metrics_port=None, worker_threads=2, auth_token="s3cret")
    with ServerThread(config, specs, servicers=[add_kserve_servicer]).start(wait_loaded=True) as srv:
        triton = tc.InferenceServerClient(srv.address)
        try:
            with pytest.raises(tc.InferenceServerException) as info:
                triton.infer("det", [uint8_input(scene())])
            assert info.value.status() == "StatusCode.UNAUTHENTICATED"
            headers = {"authorization": "Bearer s3cret"}
            result = triton.infer("det", [uint8_input(scene())], headers=headers)
            assert result.as_numpy("num_detections").tolist() == [2]
        finally:
            triton.close()
