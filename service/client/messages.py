"""Messages of the ``cvserve.v1`` client: requests built from images, responses read back.

:mod:`cvserve.client.client` sends them; the pieces are plain functions of protos so both
:class:`~cvserve.client.client.Client` and :class:`~cvserve.client.client.AsyncClient` share them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve.client import codec as client_codec
from cvserve.models.types import Prediction, Task

__all__ = [
    "ClientError",
    "Image",
    "detect_request",
    "model_to_dict",
    "segment_request",
    "stream_request",
    "stream_result",
]

Image = bytes | np.ndarray
_TASKS = {types_pb.TASK_INSTANCE: Task.INSTANCE, types_pb.TASK_SEMANTIC: Task.SEMANTIC}
_STATES = {
    pb.MODEL_STATE_LOADING: "loading",
    pb.MODEL_STATE_READY: "ready",
    pb.MODEL_STATE_FAILED: "failed",
    pb.MODEL_STATE_UNLOADED: "unloaded",
}


class ClientError(Exception):
    """A failed call.

    Attributes:
        code: the ``grpc.StatusCode``.
        message: the server's message.
        request_id: the server's request id for this call, when it sent one.
    """

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        request_id = dict(trailing or ()).get("x-request-id")
        return cls(code, details or "", request_id)


def model_to_dict(info: pb.ModelInfo) -> dict[str, Any]:
    """A ``ModelInfo`` proto as plain Python values."""
    task = _TASKS.get(info.task)
    return {
        "name": info.name,
        "version": info.version,
        "task": task.value if task else "unspecified",
        "class_names": list(info.class_names),
        "ready": info.ready,
        "state": _STATES.get(info.state, "unspecified"),
        "error": info.error,
        "device": info.device,
        "precision": info.precision,
        "input_limits": {
            "max_image_pixels": info.input_limits.max_image_pixels,
            "max_message_bytes": info.input_limits.max_message_bytes,
            "encodings": list(info.input_limits.encodings),
        },
        "batching": {
            "max_batch_size": info.batching.max_batch_size,
            "max_wait_ms": info.batching.max_wait_ms,
            "max_queue": info.batching.max_queue,
        },
    }


def detect_request(
    image: Image,
    *,
    model: str,
    version: str = "",
    score_threshold: float | None = None,
    max_detections: int | None = None,
    classes: Sequence[str] | None = None,
    mask_format: str = "rle",
) -> pb.DetectRequest:
    """Build a ``DetectRequest``; ``classes`` are class names. Raises ``ValueError`` on bad input."""
    options = pb.DetectOptions(
        class_names=list(classes or ()), mask_format=client_codec.mask_format_to_proto(mask_format)
    )
    if score_threshold is not None:
        options.score_threshold = score_threshold
    if max_detections is not None:
        options.max_detections = max_detections
    return pb.DetectRequest(
        model=model, model_version=version, image=client_codec.image_to_proto(image), options=options
    )


def segment_request(image: Image, *, model: str, version: str = "") -> pb.SegmentRequest:
    """Build a ``SegmentRequest``."""
    return pb.SegmentRequest(model=model, model_version=version, image=client_codec.image_to_proto(image))


def stream_request(
    index: int, image: Image, *, task: Task, model: str, detect_options: dict[str, Any]
) -> pb.StreamRequest:
    """The ``index``-th item of a ``PredictStream``: a detect or segment request by ``task``."""
    cid = str(index)
    if task is Task.INSTANCE:
        return pb.StreamRequest(
            correlation_id=cid, detect=detect_request(image, model=model, **detect_options)
        )
    return pb.StreamRequest(correlation_id=cid, segment=segment_request(image, model=model))


def stream_result(response: pb.StreamResponse) -> Prediction | ClientError:
    """A ``PredictStream`` response as a prediction, or the item's error as a ``ClientError``."""
    kind = response.WhichOneof("result")
    if kind == "detect":
        return client_codec.prediction_from_detect(response.detect)
    if kind == "segment":
        return client_codec.prediction_from_segment(response.segment)
    code = next((c for c in grpc.StatusCode if c.value[0] == response.error.code), grpc.StatusCode.UNKNOWN)
    return ClientError(code, response.error.message)
