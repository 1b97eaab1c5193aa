"""Two versions of one model served at once (Triton's ``version_policy``), over both APIs.

The repository entry names a folder of numbered versions whose fake "checkpoints" scale
the scores (version 2 scores half of version 1), so which version ran a request shows in
its scores as well as in the response's version field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread
from tests.integration.test_kserve import FAKE, kserve_server, scene, triton_client, uint8_input

tc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("repo")
    for version, scale in (("1", 1.0), ("2", 0.5)):
        (root / "det" / version).mkdir(parents=True)
        (root / "det" / version / "model_final.pth").write_text(json.dumps({"score_scale": scale}))
    entry = {"name": "det", "task": "instance", "config": "fake", "handler": FAKE, "weights": "det",
             "version_policy": {"latest": 2}, "max_wait_ms": 1}  # fmt: skip
    (root / "models.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    with kserve_server(load_repository(root / "models.yaml")) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[tc.InferenceServerClient]:
    with triton_client(server) as triton:
        yield triton


def test_open_inference_protocol_selects_and_reports_versions(client: tc.InferenceServerClient) -> None:
    assert client.get_model_metadata("det").versions == ["1", "2"]
    assert client.is_model_ready("det", "1") and client.is_model_ready("det", "2")
    assert not client.is_model_ready("det", "3")
    first = client.infer("det", [uint8_input(scene())], model_version="1")
    newest = client.infer("det", [uint8_input(scene())])
    assert first.get_response().model_version == "1"
    assert newest.get_response().model_version == "2"  # no version: the newest ready one
    assert newest.as_numpy("scores") == pytest.approx(first.as_numpy("scores") * 0.5, abs=1e-6)
    with pytest.raises(InferenceServerException) as info:
        client.infer("det", [uint8_input(scene())], model_version="3")
    assert info.value.status() == "StatusCode.NOT_FOUND" and "served versions: 1, 2" in info.value.message()

    stats = {s.version: s for s in client.get_inference_statistics("det").model_stats}
    assert set(stats) == {"1", "2"}
    assert stats["1"].inference_count >= 1 and stats["2"].inference_count >= 1
    index = [(m.name, m.version, m.state) for m in client.get_model_repository_index().models]
    assert index == [("det", "1", "READY"), ("det", "2", "READY")]


def test_cvserve_v1_selects_and_reports_versions(server: ServerThread) -> None:
    array = scene()
    image = types_pb.Image(
        raw=types_pb.RawImage(height=array.shape[0], width=array.shape[1], channels=3, data=array.tobytes())
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.VisionServiceStub(channel)
        first = stub.Detect(pb.DetectRequest(model="det", model_version="1", image=image), timeout=10)
        newest = stub.Detect(pb.DetectRequest(model="det", image=image), timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            stub.Detect(pb.DetectRequest(model="det", model_version="3", image=image), timeout=10)
    assert (first.model_version, newest.model_version) == ("1", "2")
    scores = [d.score for d in first.detections]
    assert [d.score for d in newest.detections] == pytest.approx([s * 0.5 for s in scores], abs=1e-6)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "served versions: 1, 2" in (info.value.details() or "")


def test_version_folder_paths_are_the_repository_s(server: ServerThread) -> None:
    # Each version serves its own folder's checkpoint (never a path a client sent).
    statuses = {s.version: s.spec.weights for s in server.dataplane.models()}
    assert set(statuses) == {"1", "2"}
    assert all(Path(w).parent.name == v for v, w in statuses.items())
