"""Request and output parameters of the Open Inference Protocol -> cvserve options."""

from __future__ import annotations

import grpc
import pytest

from cvserve._proto.inference import grpc_service_pb2 as pb
from cvserve.errors import InvalidOptionError
from cvserve.kserve.parameters import parse_request_parameters, parse_requested_outputs
from cvserve.models.types import Task

CLASSES = ("red", "green", "blue")
OUTPUTS = ["boxes", "scores", "classes", "masks", "num_detections", "image_size"]


def _params(**values: object) -> dict[str, pb.InferParameter]:
    out = {}
    for name, value in values.items():
        if isinstance(value, bool):
            out[name] = pb.InferParameter(bool_param=value)
        elif isinstance(value, int):
            out[name] = pb.InferParameter(int64_param=value)
        elif isinstance(value, float):
            out[name] = pb.InferParameter(double_param=value)
        else:
            out[name] = pb.InferParameter(string_param=str(value))
    return out


def test_defaults() -> None:
    options = parse_request_parameters({}, CLASSES, Task.INSTANCE)
    assert options.timeout_s is None
    assert options.detect.score_threshold is None and options.detect.max_detections is None
    assert options.detect.class_ids is None and options.detect.mask_format == "rle"


def test_detection_parameters_map_to_options() -> None:
    options = parse_request_parameters(
        _params(
            score_threshold=0.25,
            max_detections=5,
            class_names="red, blue",
            class_ids="1",
            mask_format="none",
            timeout=250_000,
            priority=1,
        ),
        CLASSES,
        Task.INSTANCE,
    )
    assert options.detect.score_threshold == pytest.approx(0.25)
    assert options.detect.max_detections == 5
    assert options.detect.class_ids == frozenset({0, 1, 2})
    assert options.detect.mask_format == "none"
    assert options.timeout_s == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"score_threshold": 1.5}, r"score_threshold must be in \[0, 1\]"),
        ({"score_threshold": "high"}, "'score_threshold' must be a number"),
        ({"max_detections": -1}, "'max_detections' must be an integer >= 0"),
        ({"class_names": "cat"}, "unknown class name 'cat'"),
        ({"class_ids": "7"}, "unknown class id 7"),
        ({"class_ids": "x"}, "'class_ids' must list integers"),
        ({"mask_format": "png"}, "'mask_format' must be one of rle, none"),
        ({"timeout": 0}, "'timeout' must be > 0 microseconds"),
        ({"sequence_id": 3}, "not sequence models"),
        ({"score_treshold": 0.5}, "unknown request parameter.*score_treshold"),
    ],
)
def test_bad_parameters_are_invalid_argument(values: dict, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message) as info:
        parse_request_parameters(_params(**values), CLASSES, Task.INSTANCE)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_detection_parameters_refused_for_semantic_models() -> None:
    with pytest.raises(InvalidOptionError, match="score_threshold apply to instance models only"):
        parse_request_parameters(_params(score_threshold=0.5), CLASSES, Task.SEMANTIC)
    assert parse_request_parameters(_params(timeout=10), CLASSES, Task.SEMANTIC).timeout_s == pytest.approx(
        1e-5
    )


def _output(name: str, **values: object) -> pb.ModelInferRequest.InferRequestedOutputTensor:
    return pb.ModelInferRequest.InferRequestedOutputTensor(name=name, parameters=_params(**values))


def test_no_requested_output_means_all_raw() -> None:
    assert parse_requested_outputs([], OUTPUTS) == (OUTPUTS, True)


def test_requested_outputs_keep_order_and_binary_data() -> None:
    assert parse_requested_outputs([_output("scores"), _output("boxes")], OUTPUTS) == (
        ["scores", "boxes"],
        True,
    )
    typed = [_output("scores", binary_data=False), _output("masks", binary_data=False)]
    assert parse_requested_outputs(typed, OUTPUTS) == (["scores", "masks"], False)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([_output("logits")], "unknown output 'logits'"),
        ([_output("boxes"), _output("boxes")], "requested more than once"),
        ([_output("classes", classification=3)], "classification extension is not supported"),
        ([_output("boxes", binary_data=False), _output("scores")], "binary_data must be the same"),
        ([_output("boxes", shm_region="r")], "unknown parameter.*shm_region"),
    ],
)
def test_bad_requested_outputs(outputs: list, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        parse_requested_outputs(outputs, OUTPUTS)
