"""``inference.GRPCInferenceService``: the KServe v2 / Open Inference Protocol, Triton's form.

Existing Triton and KServe clients (``tritonclient.grpc`` unmodified) talk to cvserve
through this servicer, on the same server as ``cvserve.v1``. Like
:class:`~cvserve.vision.servicer.VisionServicer` it only converts and validates: tensors in
(:mod:`cvserve.kserve.codec`, :mod:`cvserve.kserve.tensors`), parameters
(:mod:`cvserve.kserve.parameters`), then the :class:`~cvserve.dataplane.plane.DataPlane` runs each
image through the model's dynamic batcher, and the predictions become output tensors.
Errors are :mod:`cvserve.errors` types mapped to status codes by the interceptor; the
stream reports them per response in ``error_message`` and carries on, as Triton does.

Register it with ``build_server(..., servicers=[add_kserve_servicer])``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import metadata
from typing import NoReturn

import grpc
import numpy as np

from cvserve._proto.inference import grpc_service_pb2 as pb
from cvserve._proto.inference import grpc_service_pb2_grpc as pb_grpc
from cvserve.config import ServerConfig
from cvserve.dataplane.model_state import ModelState, ModelStatus
from cvserve.dataplane.plane import DataPlane
from cvserve.errors import InvalidOptionError, NotSupportedError, ServiceError, status_of
from cvserve.imaging import Needed, decode_scaled, input_size_hint
from cvserve.kserve.codec import read_inputs, write_output
from cvserve.kserve.metadata import model_config, model_index, model_metadata, model_statistics, output_names
from cvserve.kserve.parameters import RequestOptions, parse_request_parameters, parse_requested_outputs
from cvserve.kserve.tensors import ImageBatch, output_tensors, split_images
from cvserve.models.types import Prediction, ScaledImage, Task
from cvserve.streaming import concurrent_responses
from cvserve.vision.codec import apply_options

__all__ = ["SERVICE_NAME", "KServeServicer", "NotSupportedError", "add_kserve_servicer"]

logger = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("model_repository", "model_configuration", "statistics", "parameters")


def _server_version() -> str:
    try:
        return metadata.version("cvserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _deadline(context: grpc.aio.ServicerContext, timeout_s: float | None) -> float | None:
    """The earlier of the gRPC deadline and the request's ``timeout``, as a monotonic time."""
    now = time.monotonic()
    remaining = context.time_remaining()
    candidates = [now + t for t in (remaining, timeout_s) if t is not None]
    return min(candidates) if candidates else None


def _unsupported(what: str, hint: str) -> Callable[..., Awaitable[NoReturn]]:
    """An RPC answering UNIMPLEMENTED with a message naming the extension."""

    async def rpc(self: object, request: object, context: object) -> NoReturn:
        raise NotSupportedError(f"cvserve does not implement Triton's {what}; {hint}")

    return rpc


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Implements ``inference.GRPCInferenceService`` on a :class:`DataPlane`."""

    def __init__(self, dataplane: DataPlane, config: ServerConfig) -> None:
        self._dp = dataplane
        self._config = config
        self._version = _server_version()

    # ---- health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: object) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: object) -> pb.ServerReadyResponse:
        """Ready once no model is loading, at least one serves, and the server is not draining."""
        return pb.ServerReadyResponse(ready=self._dp.server_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: object) -> pb.ModelReadyResponse:
        """False for unknown models and versions too, so probes need no error handling."""
        return pb.ModelReadyResponse(ready=self._dp.is_ready(request.name, request.version or None))

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: object
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="cvserve", version=self._version, extensions=EXTENSIONS)

    def _ready_model(self, name: str, version: str) -> ModelStatus:
        if not name:
            raise InvalidOptionError("model name is required")
        return self._dp.require_ready(name, version or None)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: object
    ) -> pb.ModelMetadataResponse:
        """The model's inputs and outputs; ``versions``: the one asked for, else every ready one."""
        status = self._ready_model(request.name, request.version)
        versions = [status.version] if request.version else self._dp.versions(status.name)
        return model_metadata(status, versions)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: object) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=model_config(self._ready_model(request.name, request.version)))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: object
    ) -> pb.ModelStatisticsResponse:
        """Per served version: of one version, of every version of one model, or of every model."""
        if request.name and request.version:
            statuses = [self._dp.get(request.name, request.version)]
        elif request.name:
            self._dp.get(request.name)  # NOT_FOUND for an unknown model
            statuses = [s for s in self._dp.models() if s.name == request.name]
        else:
            statuses = self._dp.models()
        return pb.ModelStatisticsResponse(
            model_stats=[model_statistics(s, self._dp.stats(s.name, s.version)) for s in statuses]
        )

    # ---- model repository ----------------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: object
    ) -> pb.RepositoryIndexResponse:
        """Every entry of the repository file (re-read now) per version, with its state and reason."""
        entries = [e for e in self._dp.repository_index() if not request.ready or e.state == ModelState.READY]
        return pb.RepositoryIndexResponse(models=[model_index(e) for e in entries])

    @staticmethod
    def _repository_request(
        request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest, allowed: Sequence[str]
    ) -> str:
        # Triton accepts "config" and "file:<path>" overrides here; cvserve never builds
        # a model from anything a client sends, only from its own repository file.
        refused = sorted(set(request.parameters) - set(allowed))
        if refused:
            raise InvalidOptionError(
                f"parameter(s) {', '.join(refused)} not accepted: cvserve loads and unloads models of "
                "its configured repository by name only"
            )
        if not request.model_name:
            raise InvalidOptionError("model_name is required")
        return request.model_name

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: object
    ) -> pb.RepositoryModelLoadResponse:
        """Load or reload a model of the repository file, re-read now; returns once it serves.

        A changed model loads beside the version serving, which keeps serving until the new
        one is ready (and when the new one fails: FAILED_PRECONDITION, nothing changes).
        """
        await self._dp.load(self._repository_request(request, ()))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: object
    ) -> pb.RepositoryModelUnloadResponse:
        """Unload every version of a model: new requests fail UNAVAILABLE, accepted ones finish first."""
        await self._dp.unload(self._repository_request(request, ("unload_dependents",)))
        return pb.RepositoryModelUnloadResponse()

    # ---- inference -----------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently (up to ``max_stream_inflight``); responses in completion order."""

        async def handle(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            return await self._stream_item(request, context)

        async for response in concurrent_responses(
            request_iterator, handle, self._config.max_stream_inflight
        ):
            yield response

    async def _stream_item(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStreamInferResponse:
        try:
            return pb.ModelStreamInferResponse(infer_response=await self._infer(request, context))
        except Exception as e:
            code, message = status_of(e)
            if code is grpc.StatusCode.INTERNAL:
                logger.error("stream request %r failed", request.id, exc_info=e)
            return pb.ModelStreamInferResponse(
                error_message=f"{code.name}: {message}",
                infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                ),
            )

    async def _infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        status = self._ready_model(request.model_name, request.model_version)
        options = parse_request_parameters(request.parameters, status.class_names, status.task)
        names, raw = parse_requested_outputs(request.outputs, output_names(status))
        batch = await self._dp.run_cpu(self._images, request, status.spec.max_queue)
        scaled = self._config.scaled_decode  # the hint holds the model weakly: a reload may free it
        needed = (
            input_size_hint(self._dp.model_object(status.name, request.model_version or None))
            if scaled
            else None
        )
        images = await self._decode(batch.images, needed)
        # Masks not asked for (mask_format none, or outputs without "masks") are not computed.
        masks = options.detect.mask_format != "none" and "masks" in names
        outcomes = await self._dp.infer_timed(
            status.name,
            images,
            version=request.model_version or None,
            deadline=_deadline(context, options.timeout_s),
            masks=masks,
        )
        # One failed image fails the request: a Triton response has no per-image status.
        failure = next((o.error for o in outcomes if o.error is not None), None)
        if failure is not None:
            raise failure
        predictions = [o.prediction for o in outcomes if o.prediction is not None]
        # The version that ran the images: a reload may have swapped it in since the lookup.
        status = dataclasses.replace(
            status, spec=dataclasses.replace(status.spec, version=outcomes[0].version)
        )
        return await self._dp.run_cpu(
            self._response, request, status, predictions, options, names, raw, batch.batched
        )

    def _images(self, request: pb.ModelInferRequest, max_images: int) -> ImageBatch:
        """The request's images; a batch may not exceed what the model's queue can ever hold."""
        inputs = read_inputs(request, max_bytes_elements=max_images)
        return split_images(inputs, max_pixels=self._config.max_image_pixels, max_images=max_images)

    async def _decode(
        self, images: Sequence[bytes | np.ndarray], needed: Needed | None
    ) -> list[np.ndarray | ScaledImage]:
        """Decode encoded images in the shared CPU pool, concurrently; raw arrays pass through.

        With ``needed`` (the model's ``input_size``) a large JPEG is decoded at a reduced
        scale (:func:`cvserve.imaging.decode_scaled`).
        """
        max_pixels = self._config.max_image_pixels

        def decode(image: bytes) -> np.ndarray | ScaledImage:
            return decode_scaled(image, max_pixels=max_pixels, needed=needed)

        async def one(i: int, image: bytes | np.ndarray) -> np.ndarray | ScaledImage:
            if isinstance(image, np.ndarray):
                return image
            try:
                return await self._dp.run_cpu(decode, image)
            except ServiceError as e:
                if len(images) == 1:
                    raise
                raise type(e)(f"image {i} of the batch: {e.message}") from e

        return list(await asyncio.gather(*(one(i, img) for i, img in enumerate(images))))

    @staticmethod
    def _response(
        request: pb.ModelInferRequest,
        status: ModelStatus,
        predictions: list[Prediction],
        options: RequestOptions,
        names: list[str],
        raw: bool,
        batched: bool,
    ) -> pb.ModelInferResponse:
        if status.task is Task.INSTANCE:
            predictions = [
                dataclasses.replace(p, instances=tuple(apply_options(p.instances, options.detect)))
                for p in predictions
            ]
        arrays = output_tensors(
            predictions,
            task=status.task,
            num_classes=len(status.class_names),
            batched=batched,
            names=names,
            with_masks=options.detect.mask_format != "none",
        )
        response = pb.ModelInferResponse(model_name=status.name, model_version=status.version, id=request.id)
        for name, array in arrays:
            write_output(response, name, array, raw=raw)
        return response

    # ---- Triton extensions cvserve does not implement ------------------------------------------

    _SHM = ("system shared memory extension", "send tensors in the request")
    _CUDA_SHM = ("CUDA shared memory extension", "send tensors in the request")
    SystemSharedMemoryStatus = _unsupported(*_SHM)
    SystemSharedMemoryRegister = _unsupported(*_SHM)
    SystemSharedMemoryUnregister = _unsupported(*_SHM)
    CudaSharedMemoryStatus = _unsupported(*_CUDA_SHM)
    CudaSharedMemoryRegister = _unsupported(*_CUDA_SHM)
    CudaSharedMemoryUnregister = _unsupported(*_CUDA_SHM)
    TraceSetting = _unsupported("trace extension", "use x-request-id metadata and the server's access log")
    LogSettings = _unsupported("logging extension", "set the log level with cvserve --log-level")


def add_kserve_servicer(server: grpc.aio.Server, dataplane: DataPlane) -> list[str]:
    """``build_server`` hook: register the Open Inference Protocol servicer.

    Returns:
        The full service name, for health checks and reflection.
    """
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(dataplane, dataplane.config), server)
    return [SERVICE_NAME]
