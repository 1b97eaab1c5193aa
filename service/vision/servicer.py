"""``cvserve.v1.VisionService``: protos in, validation, the data plane, protos out.

Nothing here batches or knows about models beyond their metadata: each RPC validates
its request (raising :mod:`cvserve.errors` types, which the interceptor maps to status
codes), decodes the image in the shared CPU pool, hands the array to the
:class:`~cvserve.dataplane.plane.DataPlane` and encodes the prediction, again in the pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve.config import ServerConfig
from cvserve.dataplane.model_state import ModelState, ModelStatus
from cvserve.dataplane.plane import DataPlane
from cvserve.errors import InvalidOptionError, WrongTaskError, status_of
from cvserve.imaging import ENCODINGS, input_size_hint
from cvserve.models.types import Task
from cvserve.streaming import concurrent_responses
from cvserve.vision import codec

__all__ = ["SERVICE_NAME", "VisionServicer", "model_info"]

logger = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["VisionService"].full_name

_TASKS = {Task.INSTANCE: types_pb.TASK_INSTANCE, Task.SEMANTIC: types_pb.TASK_SEMANTIC}
_STATES = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
    ModelState.UNLOADED: pb.MODEL_STATE_UNLOADED,
}


def model_info(status: ModelStatus, config: ServerConfig) -> pb.ModelInfo:
    """The ``ModelInfo`` proto of one model."""
    spec = status.spec
    return pb.ModelInfo(
        name=spec.name,
        version=spec.version,
        task=_TASKS[spec.task],
        class_names=list(status.class_names),
        ready=status.ready,
        state=_STATES[status.state],
        error=status.error,
        input_limits=pb.InputLimits(
            max_image_pixels=config.max_image_pixels,
            max_message_bytes=config.max_message_bytes,
            encodings=list(ENCODINGS),
        ),
        batching=pb.BatchingLimits(
            max_batch_size=spec.max_batch_size, max_wait_ms=spec.max_wait_ms, max_queue=spec.max_queue
        ),
        device=status.device or spec.device,
        precision=status.precision or spec.precision,
    )


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _timing(outcome_timing: Any, started: float) -> types_pb.Timing:
    return types_pb.Timing(
        queue_ms=outcome_timing.queue_s * 1000,
        inference_ms=outcome_timing.compute_s * 1000,
        total_ms=(time.monotonic() - started) * 1000,
        batch_size=outcome_timing.batch_size,
    )


class VisionServicer(pb_grpc.VisionServiceServicer):
    """Implements ``cvserve.v1.VisionService`` on a :class:`DataPlane`."""

    def __init__(self, dataplane: DataPlane, config: ServerConfig) -> None:
        self._dp = dataplane
        self._config = config

    def _model_for(self, name: str, version: str, task: Task, rpc: str) -> ModelStatus:
        if not name:
            raise InvalidOptionError("model is required")
        status = self._dp.require_ready(name, version or None)
        if status.task is not task:
            other = "Segment" if status.task is Task.SEMANTIC else "Detect"
            raise WrongTaskError(f"model {name!r} is a {status.task.value} model; call {other}, not {rpc}")
        return status

    async def _predict(
        self,
        status: ModelStatus,
        version: str,
        image: types_pb.Image,
        deadline: float | None,
        masks: bool = True,
    ) -> Any:
        scaled = self._config.scaled_decode
        needed = input_size_hint(self._dp.model_object(status.name, version or None)) if scaled else None

        def decode() -> Any:
            begun = time.perf_counter()
            array = codec.decode_request_image(image, max_pixels=self._config.max_image_pixels, needed=needed)
            self._dp.observe_stage(status.name, "decode", time.perf_counter() - begun, version or None)
            return array

        array = await self._dp.run_cpu(decode)
        (outcome,) = await self._dp.infer_timed(
            status.name, [array], version=version or None, deadline=deadline, masks=masks
        )
        if outcome.error is not None:
            raise outcome.error
        return outcome

    async def _detect(self, request: pb.DetectRequest, deadline: float | None) -> pb.DetectResponse:
        started = time.monotonic()
        status = self._model_for(request.model, request.model_version, Task.INSTANCE, "Detect")
        options = codec.parse_detect_options(request.options, status.class_names)
        masks = options.mask_format != "none"  # no mask asked: the mask head and pasting are skipped
        outcome = await self._predict(status, request.model_version, request.image, deadline, masks)

        def encode() -> pb.DetectResponse:
            begun = time.perf_counter()
            response = codec.detect_response(
                outcome.prediction,
                model=status.name,
                version=outcome.version,
                class_names=status.class_names,
                options=options,
            )
            self._dp.observe_stage(status.name, "encode", time.perf_counter() - begun, outcome.version)
            return response

        response = await self._dp.run_cpu(encode)
        response.timing.CopyFrom(_timing(outcome.timing, started))
        return response  # type: ignore[no-any-return]

    async def _segment(self, request: pb.SegmentRequest, deadline: float | None) -> pb.SegmentResponse:
        started = time.monotonic()
        status = self._model_for(request.model, request.model_version, Task.SEMANTIC, "Segment")
        outcome = await self._predict(status, request.model_version, request.image, deadline)
        response = await self._dp.run_cpu(
            lambda: codec.segment_response(outcome.prediction, model=status.name, version=outcome.version)
        )
        response.timing.CopyFrom(_timing(outcome.timing, started))
        return response  # type: ignore[no-any-return]

    async def Detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> pb.DetectResponse:
        return await self._detect(request, _deadline(context))

    async def Segment(
        self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SegmentResponse:
        return await self._segment(request, _deadline(context))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_info(s, self._config) for s in self._dp.models()])

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        if not request.name:
            raise InvalidOptionError("name is required")
        return pb.GetModelResponse(
            model=model_info(self._dp.get(request.name, request.version or None), self._config)
        )

    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        """Load or reload a model of the repository file, by name only."""
        if not request.name:
            raise InvalidOptionError("name is required")
        await self._dp.load(request.name)
        statuses = [s for s in self._dp.models() if s.name == request.name]
        return pb.LoadModelResponse(models=[model_info(s, self._config) for s in statuses])

    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        if not request.name:
            raise InvalidOptionError("name is required")
        await self._dp.unload(request.name)
        return pb.UnloadModelResponse()

    async def ReloadRepository(
        self, request: pb.ReloadRepositoryRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadRepositoryResponse:
        changes = await self._dp.reload_repository()
        return pb.ReloadRepositoryResponse(
            changes=[pb.RepositoryChange(name=c.name, action=c.action, error=c.error) for c in changes]
        )

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        """Items run concurrently (up to ``max_stream_inflight``); responses in completion order."""
        deadline = _deadline(context)

        async def handle(request: pb.StreamRequest) -> pb.StreamResponse:
            return await self._stream_item(request, deadline)

        async for response in concurrent_responses(
            request_iterator, handle, self._config.max_stream_inflight
        ):
            yield response

    async def _stream_item(self, request: pb.StreamRequest, deadline: float | None) -> pb.StreamResponse:
        cid = request.correlation_id
        try:
            kind = request.WhichOneof("request")
            if kind == "detect":
                return pb.StreamResponse(
                    correlation_id=cid, detect=await self._detect(request.detect, deadline)
                )
            if kind == "segment":
                return pb.StreamResponse(
                    correlation_id=cid, segment=await self._segment(request.segment, deadline)
                )
            raise InvalidOptionError("stream request has neither detect nor segment set")
        except Exception as e:
            code, message = status_of(e)
            if code is grpc.StatusCode.INTERNAL:
                logger.error("stream item %r failed", cid, exc_info=e)
            error = pb.ItemError(code=code.value[0], code_name=code.name, message=message)
            return pb.StreamResponse(correlation_id=cid, error=error)
