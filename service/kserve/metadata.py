"""Model metadata, configuration, statistics and repository index as Open Inference Protocol protos."""

from __future__ import annotations

import json

from cvserve._proto.inference import grpc_service_pb2 as pb
from cvserve._proto.inference import model_config_pb2 as mc
from cvserve.dataplane.model_state import Duration, ModelState, ModelStats, ModelStatus
from cvserve.dataplane.repository import IndexEntry
from cvserve.kserve.tensors import TensorSpec, input_spec, output_specs
from cvserve.models.device import device_index
from cvserve.models.types import Task

__all__ = [
    "PLATFORM",
    "model_config",
    "model_index",
    "model_metadata",
    "model_statistics",
    "output_names",
]

PLATFORM = "cvserve"
# Triton's repository-index states; a failed or unloaded model is UNAVAILABLE with a reason.
_INDEX_STATES = {
    ModelState.LOADING: "LOADING",
    ModelState.READY: "READY",
    ModelState.FAILED: "UNAVAILABLE",
    ModelState.UNLOADED: "UNAVAILABLE",
}


def output_names(status: ModelStatus) -> list[str]:
    """Names of a model's outputs, in response order."""
    return [spec.name for spec in output_specs(status.task, len(status.class_names))]


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def model_metadata(status: ModelStatus, versions: list[str]) -> pb.ModelMetadataResponse:
    """``ModelMetadata``: the ``image`` input and the task's outputs, batch dimension first.

    Args:
        status: the version described.
        versions: the versions reported (Triton: the ready versions of the model).
    """
    return pb.ModelMetadataResponse(
        name=status.name,
        versions=versions,
        platform=f"{PLATFORM}_{status.task.value}",
        inputs=[_tensor_metadata(input_spec())],
        outputs=[_tensor_metadata(s) for s in output_specs(status.task, len(status.class_names))],
    )


def _config_tensor_dims(spec: TensorSpec) -> tuple[str, list[int]]:
    datatype = "STRING" if spec.datatype == "BYTES" else spec.datatype
    return f"TYPE_{datatype}", list(spec.shape[1:])  # Triton's config dims omit the batch dimension


def model_config(status: ModelStatus) -> mc.ModelConfig:
    """``ModelConfig`` in Triton's schema, with the task and class names as parameters."""
    spec = status.spec
    image_type, image_dims = _config_tensor_dims(input_spec())
    config = mc.ModelConfig(
        name=status.name,
        platform=f"{PLATFORM}_{status.task.value}",
        max_batch_size=spec.max_batch_size,
        input=[mc.ModelInput(name=input_spec().name, data_type=image_type, dims=image_dims)],
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=round(spec.max_wait_ms * 1000)),
    )
    for out in output_specs(status.task, len(status.class_names)):
        data_type, dims = _config_tensor_dims(out)
        config.output.append(mc.ModelOutput(name=out.name, data_type=data_type, dims=dims))
    config.parameters["task"].string_value = status.task.value
    config.parameters["class_names"].string_value = json.dumps(list(status.class_names))
    config.parameters["device"].string_value = status.device or spec.device
    if isinstance(spec.instances, int):  # resolved once loaded; "auto" before
        on_gpu = (status.device or spec.device).startswith("cuda")
        kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
        # Triton counts instances per listed GPU, as the entry's ``devices`` do.
        gpus = [device_index(d) for d in spec.devices]
        config.instance_group.append(mc.ModelInstanceGroup(count=spec.instances, kind=kind, gpus=gpus))
    if status.task is Task.INSTANCE:
        config.parameters["masks"].string_value = "COCO RLE compressed counts, ASCII, of an image_size mask"
    return config


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=int(duration.total_s * 1e9))


def model_statistics(status: ModelStatus, stats: ModelStats) -> pb.ModelStatistics:
    """One model's cumulative statistics since it was (re)loaded."""
    return pb.ModelStatistics(
        name=status.name,
        version=status.version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.failure),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
        ),
    )


def model_index(entry: IndexEntry) -> pb.RepositoryIndexResponse.ModelIndex:
    """A model version's entry in ``RepositoryIndex``: Triton's state name and the reason."""
    return pb.RepositoryIndexResponse.ModelIndex(
        name=entry.name, version=entry.version, state=_INDEX_STATES[entry.state], reason=entry.reason
    )
