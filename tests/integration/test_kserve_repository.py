"""Model repository over the Open Inference Protocol: index, load and unload at run time.

Readiness follows every change, and only names of the configured repository can be
loaded: Triton's ``config`` / ``file:`` overrides, which would make the server read or
build what a client sends, are refused.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from cvserve._proto.cvserve.v1 import vision_service_pb2 as vision_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as vision_grpc
from cvserve._proto.inference import grpc_service_pb2 as pb
from cvserve._proto.inference import grpc_service_pb2_grpc as pb_grpc
from cvserve.config import ServerConfig
from cvserve.kserve.servicer import add_kserve_servicer
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread
from tests.integration.test_kserve import (
    ROOT,
    kserve_server,
    scene,
    triton_client,
    uint8_input,
    write_repository,
)

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODELS = [
    {"name": "det", "task": "instance"},
    {"name": "seg", "task": "semantic", "options": {"load_delay_ms": 100}},
    {"name": "broken", "task": "instance", "options": {"load_error": "weights missing"}},
]


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    specs = load_repository(write_repository(tmp_path_factory.mktemp("repo"), MODELS))
    with kserve_server(specs) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    with triton_client(server) as triton:
        yield triton


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


# ---- the repository file re-read at run time ---------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[ServerThread, Path]]:
    """A server given its repository file, which the test rewrites."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    path = write_repository(tmp_path, [{"name": "det", "task": "instance", "version": "2"}])
    config = ServerConfig(port=0, metrics_port=None, worker_threads=2)
    specs = load_repository(path)
    with ServerThread(config, specs, servicers=[add_kserve_servicer], repository=path).start(
        wait_loaded=True
    ) as srv:
        yield srv, path


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_load_rereads_the_file_and_index_lists_every_entry(live: tuple[ServerThread, Path]) -> None:
    srv, path = live
    with grpc.insecure_channel(srv.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        write_repository(
            path.parent,
            [{"name": "det", "task": "instance", "version": "2"}, {"name": "seg", "task": "semantic"}],
        )
        index = kserve.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
        assert [(m.name, m.version, m.state, m.reason) for m in index] == [
            ("det", "2", "READY", ""),
            ("seg", "1", "UNAVAILABLE", "not loaded: new in the repository"),
        ]
        kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="seg"), timeout=30)
        assert kserve.ModelReady(pb.ModelReadyRequest(name="seg"), timeout=10).ready

        # A new version of det: served, and the default for requests without a version.
        write_repository(
            path.parent,
            [{"name": "det", "task": "instance", "version": "3"}, {"name": "seg", "task": "semantic"}],
        )
        kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="det"), timeout=30)
        triton = tc.InferenceServerClient(srv.address)
        assert triton.infer("det", [uint8_input(scene())]).get_response().model_version == "3"
        assert triton.get_model_metadata("det").versions == ["3"]
        assert not triton.is_model_ready("det", "2")
        with pytest.raises(InferenceServerException) as info:
            triton.infer("det", [uint8_input(scene())], model_version="2")
        assert info.value.status() == "StatusCode.NOT_FOUND" and "served versions: 3" in info.value.message()
        triton.close()


def test_a_failed_reload_and_an_invalid_file_leave_the_model_serving(live: tuple[ServerThread, Path]) -> None:
    srv, path = live
    with grpc.insecure_channel(srv.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        vision = vision_grpc.VisionServiceStub(channel)
        write_repository(
            path.parent, [{"name": "det", "task": "instance", "options": {"load_error": "bad weights"}}]
        )
        for call in (
            lambda: kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="det"), timeout=30),
            lambda: vision.LoadModel(vision_pb.LoadModelRequest(name="det"), timeout=30),
        ):
            code, message = status_of(call)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "bad weights" in message
        (row,) = kserve.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
        assert row.state == "READY" and "reload failed, the previous load keeps serving" in row.reason
        reload = vision.ReloadRepository(vision_pb.ReloadRepositoryRequest(), timeout=30)
        assert list(reload.changes) == []  # the failed entry is retried once it changes

        path.write_text("models: [{name: det, task: instance, config: fake, max_wait_ms: -1}]")
        for call in (
            lambda: kserve.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="det"), timeout=30),
            lambda: vision.LoadModel(vision_pb.LoadModelRequest(name="det"), timeout=30),
            lambda: vision.ReloadRepository(vision_pb.ReloadRepositoryRequest(), timeout=30),
        ):
            code, message = status_of(call)
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "models.yaml: models[0].max_wait_ms" in message and "nothing changed" in message
        (row,) = kserve.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
        assert row.state == "READY" and "repository not applied" in row.reason
        assert kserve.ModelReady(pb.ModelReadyRequest(name="det"), timeout=10).ready


def test_vision_api_load_unload_and_reload(live: tuple[ServerThread, Path]) -> None:
    srv, path = live
    with grpc.insecure_channel(srv.address) as channel:
        vision = vision_grpc.VisionServiceStub(channel)
        for call in (
            lambda: vision.LoadModel(vision_pb.LoadModelRequest(), timeout=10),
            lambda: vision.UnloadModel(vision_pb.UnloadModelRequest(), timeout=10),
        ):
            assert status_of(call) == (grpc.StatusCode.INVALID_ARGUMENT, "name is required")
        code, message = status_of(
            lambda: vision.LoadModel(vision_pb.LoadModelRequest(name="../x"), timeout=10)
        )
        assert code == grpc.StatusCode.NOT_FOUND and "not in the repository" in message
        code, _ = status_of(lambda: vision.UnloadModel(vision_pb.UnloadModelRequest(name="nope"), timeout=10))
        assert code == grpc.StatusCode.NOT_FOUND

        write_repository(path.parent, [{"name": "seg", "task": "semantic"}])
        changes = vision.ReloadRepository(vision_pb.ReloadRepositoryRequest(), timeout=30).changes
        assert [(c.name, c.action, c.error) for c in changes] == [("seg", "load", ""), ("det", "unload", "")]
        assert [m.name for m in vision.ListModels(vision_pb.ListModelsRequest(), timeout=10).models] == [
            "seg"
        ]
        vision.UnloadModel(vision_pb.UnloadModelRequest(name="seg"), timeout=30)
        (info,) = vision.LoadModel(vision_pb.LoadModelRequest(name="seg"), timeout=30).models
        assert info.ready and info.version == "1"
