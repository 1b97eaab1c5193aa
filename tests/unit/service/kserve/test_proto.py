"""The Open Inference Protocol protos compile to exactly the descriptors tritonclient ships.

Byte identity is stronger than wire compatibility and is needed: protobuf keeps one
descriptor pool per process and refuses a second, different definition of
``inference.ModelInferRequest``, so only identical files let the server and
tritonclient live in one process (as in these tests).
"""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pb2

from cvserve._proto.inference import grpc_service_pb2, model_config_pb2

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (grpc_service_pb2, tritonclient_grpc.service_pb2),
        (model_config_pb2, tritonclient_grpc.model_config_pb2),
    ],
    ids=["grpc_service", "model_config"],
)
def test_descriptor_is_byte_identical_to_tritonclient(ours, theirs) -> None:
    mine = descriptor_pb2.FileDescriptorProto.FromString(ours.DESCRIPTOR.serialized_pb)
    ref = descriptor_pb2.FileDescriptorProto.FromString(theirs.DESCRIPTOR.serialized_pb)
    # Field-by-field first, for a readable failure; then the bytes.
    assert (mine.name, mine.package) == (ref.name, ref.package)
    assert [m.name for m in mine.message_type] == [m.name for m in ref.message_type]
    for a, b in zip(mine.message_type, ref.message_type, strict=True):
        assert a == b, f"message {a.name} differs from tritonclient's"
    assert list(mine.service) == list(ref.service)
    assert ours.DESCRIPTOR.serialized_pb == theirs.DESCRIPTOR.serialized_pb


def test_service_name_and_methods() -> None:
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert {"ModelInfer", "RepositoryModelLoad", "LogSettings"} <= set(service.methods_by_name)


def test_messages_are_shared_with_tritonclient() -> None:
    assert grpc_service_pb2.ModelInferRequest is tritonclient_grpc.service_pb2.ModelInferRequest
