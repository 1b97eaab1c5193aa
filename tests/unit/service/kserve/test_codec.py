"""Open Inference Protocol tensor codec: BYTES framing, raw vs typed contents, outputs."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cvserve._proto.inference import grpc_service_pb2 as pb
from cvserve.kserve.codec import (
    InvalidTensorError,
    decode_bytes_tensor,
    encode_bytes_tensor,
    parameter_value,
    read_inputs,
    write_output,
)


def _request(name: str, datatype: str, shape: list[int], raw: bytes | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_bytes_tensor_round_trip(items: list[bytes]) -> None:
    encoded = encode_bytes_tensor(items)
    assert len(encoded) == sum(4 + len(i) for i in items)
    assert decode_bytes_tensor(encoded, len(items), "x") == items


def test_bytes_tensor_prefix_is_little_endian_length() -> None:
    assert encode_bytes_tensor([b"abc"]) == b"\x03\x00\x00\x00abc"


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (b"\x03\x00", 1, "truncated"),
        (struct.pack("<I", 10) + b"abc", 1, "declares 10 bytes but only 3 remain"),
        (encode_bytes_tensor([b"a", b"b"]), 1, r"holds 1 element\(s\) but the BYTES data holds 2"),
    ],
)
def test_bytes_tensor_malformed_is_invalid_argument(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(InvalidTensorError, match=message) as info:
        decode_bytes_tensor(raw, count, "image")
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "'image'" in info.value.message


def test_raw_uint8_input_is_a_zero_copy_view() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    arrays = read_inputs(_request("image", "UINT8", [2, 3, 3], image.tobytes()))
    np.testing.assert_array_equal(arrays["image"], image)
    assert not arrays["image"].flags.writeable


def test_raw_bytes_input_becomes_object_array() -> None:
    arrays = read_inputs(_request("image", "BYTES", [2, 1], encode_bytes_tensor([b"jpeg", b"png"])))
    assert arrays["image"].shape == (2, 1)
    assert arrays["image"][:, 0].tolist() == [b"jpeg", b"png"]


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("UINT8", "uint_contents", [0, 7, 255], np.uint8),
        ("INT32", "int_contents", [-5, 0, 9], np.int32),
        ("INT64", "int64_contents", [-(2**40), 1, 2], np.int64),
        ("FP32", "fp32_contents", [0.5, -1.25, 3.0], np.float32),
        ("BOOL", "bool_contents", [True, False, True], np.bool_),
    ],
)
def test_typed_contents_input(datatype: str, field: str, values: list, dtype: type) -> None:
    request = _request("x", datatype, [3])
    getattr(request.inputs[0].contents, field).extend(values)
    array = read_inputs(request)["x"]
    assert array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(array, np.asarray(values, dtype))


def test_typed_bytes_contents_input() -> None:
    request = _request("image", "BYTES", [1])
    request.inputs[0].contents.bytes_contents.append(b"encoded")
    assert read_inputs(request)["image"].tolist() == [b"encoded"]


@pytest.mark.parametrize(
    ("request_factory", "message"),
    [
        (lambda: _request("x", "COMPLEX", [1], b"\x00"), "unknown datatype 'COMPLEX'"),
        (lambda: _request("x", "UINT8", [2, 2], b"\x00" * 3), "needs 4 bytes of raw_input_contents, got 3"),
        (lambda: _request("x", "UINT8", [-1, 2], b""), "negative dimension"),
        (lambda: _request("x", "FP32", [2]), r"holds 2 element\(s\) but contents.fp32_contents has 0"),
        (lambda: _request("x", "FP16", [1]), "FP16 data must be sent in raw_input_contents"),
    ],
)
def test_bad_inputs_are_invalid_argument(request_factory, message: str) -> None:
    with pytest.raises(InvalidTensorError, match=message):
        read_inputs(request_factory())


def test_typed_value_out_of_range_is_refused() -> None:
    request = _request("x", "UINT8", [1])
    request.inputs[0].contents.uint_contents.append(300)
    with pytest.raises(InvalidTensorError, match="does not fit UINT8"):
        read_inputs(request)


def test_raw_contents_must_cover_every_input() -> None:
    request = _request("a", "UINT8", [1], b"\x01")
    request.inputs.add(name="b", datatype="UINT8", shape=[1])
    with pytest.raises(InvalidTensorError, match="1 entries for 2 input"):
        read_inputs(request)


def test_duplicate_input_and_mixed_forms_are_refused() -> None:
    dup = _request("a", "UINT8", [1])
    dup.inputs[0].contents.uint_contents.append(1)
    dup.inputs.add(name="a", datatype="UINT8", shape=[1]).contents.uint_contents.append(2)
    with pytest.raises(InvalidTensorError, match="more than once"):
        read_inputs(dup)
    mixed = _request("a", "UINT8", [1], b"\x01")
    mixed.inputs[0].contents.uint_contents.append(1)
    with pytest.raises(InvalidTensorError, match="both typed contents and raw_input_contents"):
        read_inputs(mixed)


def test_write_raw_outputs_little_endian() -> None:
    response = pb.ModelInferResponse()
    boxes = np.array([[1.5, 2.0, 3.0, 4.0]], np.float32)
    write_output(response, "boxes", boxes, raw=True)
    write_output(response, "classes", np.array([2], np.int64), raw=True)
    write_output(response, "masks", np.array([b"RLE"], dtype=object), raw=True)
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("boxes", "FP32", [1, 4]),
        ("classes", "INT64", [1]),
        ("masks", "BYTES", [1]),
    ]
    assert response.raw_output_contents[0] == struct.pack("<4f", 1.5, 2.0, 3.0, 4.0)
    assert response.raw_output_contents[1] == struct.pack("<q", 2)
    assert response.raw_output_contents[2] == b"\x03\x00\x00\x00RLE"


def test_write_typed_outputs() -> None:
    response = pb.ModelInferResponse()
    write_output(response, "scores", np.array([0.5, 0.25], np.float32), raw=False)
    write_output(response, "masks", np.array([b"a", b""], dtype=object), raw=False)
    assert not response.raw_output_contents
    assert list(response.outputs[0].contents.fp32_contents) == [0.5, 0.25]
    assert list(response.outputs[1].contents.bytes_contents) == [b"a", b""]


def test_parameter_value() -> None:
    assert parameter_value(pb.InferParameter(double_param=0.5)) == 0.5
    assert parameter_value(pb.InferParameter(int64_param=3)) == 3
    assert parameter_value(pb.InferParameter(bool_param=False)) is False
    assert parameter_value(pb.InferParameter(string_param="a")) == "a"
    assert parameter_value(pb.InferParameter()) is None


def test_bytes_element_limit_is_checked_before_splitting() -> None:
    # 100k empty elements: refused from the shape, without walking the data.
    request = _request("image", "BYTES", [100_000, 1], b"\x00\x00\x00\x00" * 100_000)
    with pytest.raises(InvalidTensorError, match="100000 BYTES elements, more than the limit of 64"):
        read_inputs(request, max_bytes_elements=64)
    assert read_inputs(request)["image"].shape == (100_000, 1)
