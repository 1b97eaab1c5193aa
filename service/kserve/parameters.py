"""Open Inference Protocol request and output parameters -> cvserve options.

Request parameters (``parameters`` of ``ModelInferRequest``; tritonclient's
``infer(..., parameters={...})``, ``timeout=`` and ``priority=``):

======================  ==========================================================
``score_threshold``     double in [0, 1]: drop detections scoring below it
``max_detections``      int >= 0: keep the top N by score (0: no limit)
``class_names``         string, comma-separated: keep only these classes
``class_ids``           string, comma-separated ids: keep only these classes
``mask_format``         ``rle`` (default) or ``none`` (skip mask encoding)
``timeout``             int, microseconds (Triton's): the request fails with
                        DEADLINE_EXCEEDED when it waits longer for its batch
``priority``            accepted and ignored: every request has the same priority
======================  ==========================================================

Requested outputs (``outputs``; tritonclient's ``InferRequestedOutput``) take
``binary_data`` (bool): ``false`` on every requested output returns typed
``contents`` instead of ``raw_output_contents``. Anything else is refused with
INVALID_ARGUMENT naming it, so a misspelt option never silently does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cvserve._proto.cvserve.v1 import vision_service_pb2 as cv_pb
from cvserve._proto.inference import grpc_service_pb2 as pb
from cvserve.errors import InvalidOptionError
from cvserve.kserve.codec import parameter_value
from cvserve.models.types import Task
from cvserve.vision.codec import MASK_FORMATS, DetectOptions, parse_detect_options

__all__ = ["RequestOptions", "parse_request_parameters", "parse_requested_outputs"]

_MASK_FORMATS = ("rle", "none")
_SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
_DETECTION = ("score_threshold", "max_detections", "class_names", "class_ids", "mask_format")
_KNOWN = (*_DETECTION, "timeout", "priority")


@dataclass(frozen=True)
class RequestOptions:
    """What a request's parameters ask for.

    Attributes:
        detect: filters for instance models (ignored by semantic models).
        timeout_s: the ``timeout`` parameter in seconds, or None.
    """

    detect: DetectOptions
    timeout_s: float | None


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidOptionError(f"parameter {name!r} must be a number, got {value!r}")
    return float(value)


def _csv(name: str, value: object) -> list[str]:
    if not isinstance(value, str):
        raise InvalidOptionError(f"parameter {name!r} must be a comma-separated string, got {value!r}")
    return [item.strip() for item in value.split(",") if item.strip()]


def _detect_options(values: Mapping[str, object], class_names: Sequence[str]) -> DetectOptions:
    options = cv_pb.DetectOptions()
    if "score_threshold" in values:
        options.score_threshold = _number("score_threshold", values["score_threshold"])
    if "max_detections" in values:
        count = _number("max_detections", values["max_detections"])
        if count < 0 or count != int(count) or count >= 2**32:
            raise InvalidOptionError(f"parameter 'max_detections' must be an integer >= 0, got {count:g}")
        options.max_detections = int(count)
    if "class_names" in values:
        options.class_names.extend(_csv("class_names", values["class_names"]))
    if "class_ids" in values:
        ids = _csv("class_ids", values["class_ids"])
        if not all(i.isdigit() for i in ids):
            raise InvalidOptionError(
                f"parameter 'class_ids' must list integers >= 0, got {values['class_ids']!r}"
            )
        options.class_ids.extend(int(i) for i in ids)
    mask_format = values.get("mask_format", "rle")
    if mask_format not in _MASK_FORMATS:
        raise InvalidOptionError(
            f"parameter 'mask_format' must be one of {', '.join(_MASK_FORMATS)}, got {mask_format!r}"
        )
    options.mask_format = MASK_FORMATS[str(mask_format)]
    return parse_detect_options(options, class_names)


def parse_request_parameters(
    parameters: Mapping[str, pb.InferParameter], class_names: Sequence[str], task: Task
) -> RequestOptions:
    """Validate a request's parameters against the model's task and classes.

    Raises:
        InvalidOptionError: an unknown parameter, a sequence-batching parameter, a
            detection option sent to a semantic model, or a bad value, naming the parameter.
    """
    values = {name: parameter_value(param) for name, param in parameters.items()}
    sequence = sorted(set(values) & set(_SEQUENCE_PARAMETERS))
    if sequence:
        raise InvalidOptionError(
            f"parameter(s) {', '.join(sequence)}: cvserve models are not sequence models"
        )
    unknown = sorted(set(values) - set(_KNOWN))
    if unknown:
        raise InvalidOptionError(
            f"unknown request parameter(s) {', '.join(unknown)}; accepted: {', '.join(_KNOWN)}"
        )
    if task is Task.SEMANTIC:
        detection = sorted(set(values) & set(_DETECTION))
        if detection:
            raise InvalidOptionError(
                f"parameter(s) {', '.join(detection)} apply to instance models only, not semantic ones"
            )
    timeout_s = None
    if "timeout" in values:
        micros = _number("timeout", values["timeout"])
        if micros <= 0:
            raise InvalidOptionError(f"parameter 'timeout' must be > 0 microseconds, got {micros:g}")
        timeout_s = micros / 1e6
    return RequestOptions(detect=_detect_options(values, class_names), timeout_s=timeout_s)


def parse_requested_outputs(
    outputs: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor], available: Sequence[str]
) -> tuple[list[str], bool]:
    """The outputs to return, in response order, and whether to send them raw.

    No requested output means every output, raw (Triton's default).

    Raises:
        InvalidOptionError: an unknown or repeated output, an unsupported output
            parameter (e.g. ``classification``), or ``binary_data`` set on only some outputs.
    """
    if not outputs:
        return list(available), True
    names: list[str] = []
    binary: list[bool] = []
    for output in outputs:
        if output.name not in available:
            raise InvalidOptionError(
                f"unknown output {output.name!r}; the model's outputs: {', '.join(available)}"
            )
        if output.name in names:
            raise InvalidOptionError(f"output {output.name!r} is requested more than once")
        values = {name: parameter_value(param) for name, param in output.parameters.items()}
        if "classification" in values:
            raise InvalidOptionError(
                f"output {output.name!r}: the classification extension is not supported by cvserve"
            )
        extra = sorted(set(values) - {"binary_data"})
        if extra:
            raise InvalidOptionError(f"output {output.name!r}: unknown parameter(s) {', '.join(extra)}")
        flag = values.get("binary_data", True)
        if not isinstance(flag, bool):
            raise InvalidOptionError(f"output {output.name!r}: binary_data must be a bool, got {flag!r}")
        names.append(output.name)
        binary.append(flag)
    if len(set(binary)) > 1:
        raise InvalidOptionError(
            "binary_data must be the same for every requested output: raw_output_contents is indexed "
            "by output position, so it holds every output or none"
        )
    return names, binary[0]
