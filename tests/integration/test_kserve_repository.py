"""Model repository over the Open Inference Protocol: index, load and unload at run time.

Readiness follows every change, and only names of the configured repository can be
loaded: Triton's ``config`` / ``file:`` overrides, which would make the server read or
build what a client sends, are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import grpc
import pytest

from cvserve._proto.inference import grpc_service_pb2 as pb
from cvserve._proto.inference import grpc_service_pb2_grpc as pb_grpc
from cvserve.config import ServerConfig
from cvserve.kserve.servicer import add_kserve_servicer
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread
from tests.integration.test_kserve import ROOT, scene, uint8_input, write_repository

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODELS = [
    {"name": "det", "task": "instance"},
    {"name": "seg", "task": "semantic", "options": {"load_delay_ms": 100}},
    {"name": "broken", "task": "instance", "options": {"load_error": "weights missing"}},
]


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    specs = load_repository(write_repository(tmp_path_factory.mktemp("repo"), MODELS))
    config = ServerConfig(port=0, metrics_port=None, worker_threads=2)
    with ServerThread(config, specs, servicers=[add_kserve_servicer]).start(wait_loaded=True) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    triton = tc.InferenceServerClient(server.address)
    yield triton
    triton.close()


def states(client: tc.InferenceServerClient) -> dict[str, str]:
    return {m.name: m.state for m in client.get_model_repository_index().models}


def test_index_lists_the_repository(server: ServerThread, client: tc.InferenceServerClient) -> None:
    assert states(client) == {"det": "READY", "seg": "READY", "broken": "UNAVAILABLE"}
    # tritonclient does not expose the request's `ready` filter; call the service directly.
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10)
    assert [m.name for m in ready.models] == ["det", "seg"]


def test_unload_then_load_with_readiness_following(client: tc.InferenceServerClient) -> None:
    client.unload_model("seg")
    assert not client.is_model_ready("seg")
    assert states(client)["seg"] == "UNAVAILABLE"
    assert {m.name: m.reason for m in client.get_model_repository_index().models}["seg"] == "unloaded"
    with pytest.raises(InferenceServerException) as info:
        client.infer("seg", [uint8_input(scene())])
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert client.is_model_ready("det") and client.is_server_ready()

    client.load_model("seg")
    assert client.is_model_ready("seg") and states(client)["seg"] == "READY"
    assert client.infer("seg", [uint8_input(scene())]).as_numpy("labels").shape == (48, 64)


def test_unload_everything_makes_the_server_unready(client: tc.InferenceServerClient) -> None:
    client.unload_model("det")
    client.unload_model("seg")
    assert client.is_server_live() and not client.is_server_ready()
    client.load_model("det")
    assert client.is_server_ready()


def test_load_failure_unknown_name_and_path_overrides(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.load_model("broken")
    assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert "weights missing" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.load_model("../etc/passwd")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    for kwargs in (
        {"config": '{"backend": "python"}'},
        {"files": {"file:1/model.py": b"import os"}},
    ):
        with pytest.raises(InferenceServerException) as info:
            client.load_model("det", **kwargs)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "configured repository by name only" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert client.is_model_ready("det")
