"""Every non-OK status of the Open Inference Protocol, seen by the unmodified tritonclient.

The statuses are those of the ``cvserve.v1`` API (INVALID_ARGUMENT, NOT_FOUND,
UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED), plus UNIMPLEMENTED for Triton
extensions cvserve does not offer; the stream reports errors per response and goes on.
"""

from __future__ import annotations

import queue
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread
from tests.integration.test_kserve import (
    bytes_input,
    kserve_server,
    png,
    scene,
    triton_client,
    uint8_input,
    write_repository,
)

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODELS = [
    {"name": "det", "task": "instance", "version": "2"},
    {"name": "seg", "task": "semantic"},
    {"name": "slow", "task": "instance", "max_queue": 1, "options": {"delay_ms": 400}},
    {"name": "broken", "task": "instance", "options": {"load_error": "checkpoint is corrupt"}},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    specs = load_repository(write_repository(tmp_path_factory.mktemp("repo"), MODELS))
    with kserve_server(specs, max_image_pixels=10_000) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    with triton_client(server) as triton:
        yield triton


def status_of(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


@pytest.mark.parametrize(
    ("make_inputs", "params", "message"),
    [
        (lambda: [bytes_input([b"not an image"])], None, "cannot decode image"),
        (lambda: [bytes_input([b"junk", png(scene())], batched=True)], None, "image 0 of the batch"),
        (lambda: [uint8_input(np.zeros((8, 8, 4), np.uint8))], None, r"\[H, W, 3\]"),
        (lambda: [uint8_input(np.zeros((200, 200, 3), np.uint8))], None, "more than the limit of 10000"),
        (lambda: [bytes_input([png(np.zeros((200, 200, 3), np.uint8))])], None, "more than the limit"),
        (lambda: [bytes_input([png(scene())] * 65, batched=True)], None, "more than the limit of 64"),
        (lambda: [uint8_input(np.zeros((65, 4, 4, 3), np.uint8))], None, "batch of 65 images is more"),
        (lambda: [uint8_input(scene())], {"score_threshold": 2.0}, r"must be in \[0, 1\]"),
        (lambda: [uint8_input(scene())], {"colour": "red"}, "unknown request parameter"),
        (lambda: [uint8_input(scene())], {"class_names": "cat"}, "unknown class name 'cat'"),
    ],
)
def test_invalid_argument(client, make_inputs, params, message: str) -> None:
    code, text = status_of(lambda: client.infer("det", make_inputs(), parameters=params))
    assert code == "StatusCode.INVALID_ARGUMENT"
    assert re.search(message, text), text


def test_invalid_tensor_and_outputs(client) -> None:
    wrong_name = tc.InferInput("pixels", [8, 8, 3], "UINT8")
    wrong_name.set_data_from_numpy(np.zeros((8, 8, 3), np.uint8))
    code, text = status_of(lambda: client.infer("det", [wrong_name]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "exactly one input named 'image'" in text
    outputs = [tc.InferRequestedOutput("logits")]
    code, text = status_of(lambda: client.infer("det", [uint8_input(scene())], outputs=outputs))
    assert code == "StatusCode.INVALID_ARGUMENT" and "unknown output 'logits'" in text
    outputs = [tc.InferRequestedOutput("classes", class_count=2)]
    code, text = status_of(lambda: client.infer("det", [uint8_input(scene())], outputs=outputs))
    assert code == "StatusCode.INVALID_ARGUMENT" and "classification" in text
    code, text = status_of(
        lambda: client.infer("seg", [uint8_input(scene())], parameters={"max_detections": 1})
    )
    assert code == "StatusCode.INVALID_ARGUMENT" and "instance models only" in text


def test_not_found(client) -> None:
    for call in (
        lambda: client.infer("nope", [uint8_input(scene())]),
        lambda: client.infer("det", [uint8_input(scene())], model_version="9"),
        lambda: client.get_model_metadata("nope"),
        lambda: client.get_model_config("nope"),
        lambda: client.get_inference_statistics("nope"),
    ):
        code, text = status_of(call)
        assert code == "StatusCode.NOT_FOUND", text
    assert "served models: broken, det, seg, slow" in status_of(lambda: client.get_model_metadata("nope"))[1]


def test_unavailable_when_model_failed_to_load(client) -> None:
    assert not client.is_model_ready("broken")
    code, text = status_of(lambda: client.infer("broken", [uint8_input(scene())]))
    assert code == "StatusCode.UNAVAILABLE" and "checkpoint is corrupt" in text
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["broken"].state == "UNAVAILABLE" and "checkpoint is corrupt" in index["broken"].reason


def test_resource_exhausted_when_queue_full(server: ServerThread) -> None:
    def call() -> str:
        triton = tc.InferenceServerClient(server.address)
        try:
            triton.infer("slow", [uint8_input(scene())], client_timeout=20)
            return "OK"
        except InferenceServerException as e:
            return f"{e.status()} {e.message()}"
        finally:
            triton.close()

    with ThreadPoolExecutor(4) as pool:  # one runs, one waits, the rest find the queue full
        outcomes = list(pool.map(lambda _: call(), range(4)))
    assert "OK" in outcomes
    full = [o for o in outcomes if o.startswith("StatusCode.RESOURCE_EXHAUSTED")]
    assert full and all("queue full" in o for o in full), outcomes


def test_deadline_exceeded_by_timeout_parameter_and_grpc_deadline(client) -> None:
    done: queue.Queue = queue.Queue()
    client.async_infer("slow", [uint8_input(scene())], callback=lambda result, error: done.put(error))
    time.sleep(0.1)  # the first request now occupies the model for 400 ms
    started = time.monotonic()
    code, text = status_of(lambda: client.infer("slow", [uint8_input(scene())], timeout=50_000))
    assert code == "StatusCode.DEADLINE_EXCEEDED", text
    assert time.monotonic() - started < 5
    assert done.get(timeout=20) is None
    client.async_infer("slow", [uint8_input(scene())], callback=lambda result, error: done.put(error))
    time.sleep(0.1)
    code, _ = status_of(lambda: client.infer("slow", [uint8_input(scene())], client_timeout=0.1))
    assert code == "StatusCode.DEADLINE_EXCEEDED"
    assert done.get(timeout=20) is None


def test_unimplemented_extensions(client) -> None:
    for call, what in (
        (client.get_system_shared_memory_status, "system shared memory"),
        (client.get_cuda_shared_memory_status, "CUDA shared memory"),
        (lambda: client.register_system_shared_memory("r", "/key", 16), "system shared memory"),
        (client.get_trace_settings, "trace"),
        (client.get_log_settings, "logging"),
    ):
        code, text = status_of(call)
        assert code == "StatusCode.UNIMPLEMENTED" and what in text and "cvserve does not implement" in text


def test_stream_reports_errors_per_response_and_continues(client) -> None:
    done: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: done.put((result, error)))
    try:
        client.async_stream_infer("det", [uint8_input(scene())], request_id="ok-1")
        client.async_stream_infer("det", [bytes_input([b"junk"])], request_id="bad")
        client.async_stream_infer("nope", [uint8_input(scene())], request_id="missing")
        client.async_stream_infer("det", [uint8_input(scene())], request_id="ok-2")
        results = [done.get(timeout=20) for _ in range(4)]
    finally:
        client.stop_stream()
    ok = sorted(r.get_response().id for r, e in results if e is None)
    errors = sorted(e.message() for _, e in results if e is not None)
    assert ok == ["ok-1", "ok-2"]
    assert len(errors) == 2
    assert errors[0].startswith("INVALID_ARGUMENT: cannot decode image")
    assert errors[1].startswith("NOT_FOUND: unknown model 'nope'")
