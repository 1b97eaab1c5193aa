"""Python client of the ``cvserve.v1`` API: :class:`Client` (sync, thread-safe) and :class:`AsyncClient`.

Images are encoded bytes (JPEG, PNG, WebP, BMP, TIFF), sent as they are, or RGB uint8
``(H, W, 3)`` numpy arrays, sent raw. Results are :class:`cvserve.models.types.Prediction`;
failures raise :class:`ClientError` with the gRPC status code and the server's message::

    with Client("localhost:8001", timeout=10) as client:
        prediction = client.detect(Path("cat.jpg").read_bytes(), model="shapes-maskrcnn")
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, Self

import grpc

from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve.client import codec as client_codec
from cvserve.client.connection import Connection
from cvserve.client.messages import (
    ClientError,
    Image,
    detect_request,
    model_to_dict,
    segment_request,
    stream_request,
    stream_result,
)
from cvserve.models.types import Prediction, Task

__all__ = ["AsyncClient", "Client", "ClientError", "model_to_dict"]


def _channel_args(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


class _ClientBase:
    """Channel, stub, deadline and credentials shared by :class:`Client` and :class:`AsyncClient`."""

    _api: Any = grpc  # the module whose channels this client opens: ``grpc`` or ``grpc.aio``

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
        token: str | None = None,
        tls: bool = False,
        max_message_bytes: int = 64 << 20,
    ) -> None:
        self.connection = Connection(address, timeout, tls, root_certificates, client_certificate, token)
        args = _channel_args(max_message_bytes)
        creds = self.connection.credentials()
        if creds is not None:
            self._channel = self._api.secure_channel(address, creds, options=args)
        else:
            self._channel = self._api.insecure_channel(address, options=args)
        self._stub = pb_grpc.VisionServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = self.connection.metadata
        self._tasks: dict[str, Task] = {}
        self._lock = threading.Lock()  # guards _tasks for the thread-safe sync client

    @classmethod
    def connect(cls, connection: Connection, **kwargs: Any) -> Self:
        """A client for ``connection`` (``kwargs``, e.g. ``max_message_bytes``, go to the constructor)."""
        return cls(
            connection.address,
            timeout=connection.timeout,
            tls=connection.tls,
            root_certificates=connection.root_certificates,
            client_certificate=connection.client_certificate,
            token=connection.token,
            **kwargs,
        )


class Client(_ClientBase):
    """Synchronous client; one instance may be shared by threads.

    Args:
        address: ``host:port`` of the server.
        timeout: deadline of each call in seconds; None for none.
        root_certificates: PEM roots to verify a TLS server (turns TLS on).
        client_certificate: ``(certificate_chain, private_key)`` PEM bytes presented to a
            server that requires mutual TLS (turns TLS on).
        token: bearer token sent as ``authorization`` metadata.
        tls: use TLS verified against gRPC's default roots when no ``root_certificates``
            are given (without any of the three: plaintext).
        max_message_bytes: largest message sent or received.
    """

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e) from None

    def detect_response(self, image: Image, *, model: str, **options: Any) -> pb.DetectResponse:
        """``detect`` returning the raw ``DetectResponse`` (class names, timing, masks as sent)."""
        return self._call(self._stub.Detect, detect_request(image, model=model, **options))

    def segment_response(self, image: Image, *, model: str, version: str = "") -> pb.SegmentResponse:
        """``segment`` returning the raw ``SegmentResponse``."""
        return self._call(self._stub.Segment, segment_request(image, model=model, version=version))

    def detect(
        self,
        image: Image,
        *,
        model: str,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        classes: Sequence[str] | None = None,
        mask_format: str = "rle",
    ) -> Prediction:
        """Detect instances in one image with an instance model.

        Raises:
            ClientError: the call failed (e.g. ``INVALID_ARGUMENT``, ``NOT_FOUND``).
            ValueError: a local argument is malformed (array shape, mask format).
        """
        response = self.detect_response(
            image,
            model=model,
            score_threshold=score_threshold,
            max_detections=max_detections,
            classes=classes,
            mask_format=mask_format,
        )
        return client_codec.prediction_from_detect(response)

    def segment(self, image: Image, *, model: str) -> Prediction:
        """Segment one image with a semantic model; the label map is in ``prediction.semantic``."""
        return client_codec.prediction_from_segment(self.segment_response(image, model=model))

    def _task(self, model: str) -> Task:
        with self._lock:
            task = self._tasks.get(model)
        if task is None:
            task = Task(self.get_model(model)["task"])
            with self._lock:
                self._tasks[model] = task
        return task

    def predict(self, image: Image, *, model: str) -> Prediction:
        """``detect`` or ``segment``, whichever the model's task calls for."""
        return (
            self.detect(image, model=model)
            if self._task(model) is Task.INSTANCE
            else self.segment(image, model=model)
        )

    def predict_stream(
        self, images: Iterable[Image], *, model: str, **detect_options: Any
    ) -> Iterator[tuple[int, Prediction | ClientError]]:
        """Pipeline many images over one stream.

        Yields:
            ``(index, prediction or ClientError)`` in completion order; a failed image
            does not stop the others.
        """
        task = self._task(model)
        requests = (
            stream_request(i, image, task=task, model=model, detect_options=detect_options)
            for i, image in enumerate(images)
        )
        try:
            for response in self._stub.PredictStream(
                requests, timeout=self._timeout, metadata=self._metadata
            ):
                yield int(response.correlation_id), stream_result(response)
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e) from None

    def list_models(self) -> list[dict[str, Any]]:
        """Every model the server knows, ready or not."""
        return [model_to_dict(m) for m in self._call(self._stub.ListModels, pb.ListModelsRequest()).models]

    def get_model(self, name: str) -> dict[str, Any]:
        """One model's metadata (task, class names, limits, state)."""
        return model_to_dict(self._call(self._stub.GetModel, pb.GetModelRequest(name=name)).model)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """The same API as :class:`Client`, as coroutines on a ``grpc.aio`` channel."""

    _api = grpc.aio

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e) from None

    async def detect(self, image: Image, *, model: str, **options: Any) -> Prediction:
        """See :meth:`Client.detect`."""
        response = await self._call(self._stub.Detect, detect_request(image, model=model, **options))
        return client_codec.prediction_from_detect(response)

    async def segment(self, image: Image, *, model: str) -> Prediction:
        """See :meth:`Client.segment`."""
        response = await self._call(self._stub.Segment, segment_request(image, model=model))
        return client_codec.prediction_from_segment(response)

    async def _task(self, model: str) -> Task:
        if model not in self._tasks:
            self._tasks[model] = Task((await self.get_model(model))["task"])
        return self._tasks[model]

    async def predict(self, image: Image, *, model: str) -> Prediction:
        """See :meth:`Client.predict`."""
        if await self._task(model) is Task.INSTANCE:
            return await self.detect(image, model=model)
        return await self.segment(image, model=model)

    async def predict_stream(
        self, images: Iterable[Image], *, model: str, **detect_options: Any
    ) -> AsyncIterator[tuple[int, Prediction | ClientError]]:
        """See :meth:`Client.predict_stream`."""
        task = await self._task(model)
        requests = [
            stream_request(i, img, task=task, model=model, detect_options=detect_options)
            for i, img in enumerate(images)
        ]
        call = self._stub.PredictStream(iter(requests), timeout=self._timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield int(response.correlation_id), stream_result(response)
        except grpc.RpcError as e:
            raise ClientError.from_rpc_error(e) from None

    async def list_models(self) -> list[dict[str, Any]]:
        """See :meth:`Client.list_models`."""
        return [
            model_to_dict(m) for m in (await self._call(self._stub.ListModels, pb.ListModelsRequest())).models
        ]

    async def get_model(self, name: str) -> dict[str, Any]:
        """See :meth:`Client.get_model`."""
        return model_to_dict((await self._call(self._stub.GetModel, pb.GetModelRequest(name=name))).model)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
