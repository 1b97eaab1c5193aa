"""Open Inference Protocol tensors <-> numpy arrays.

A tensor travels either in ``raw_input_contents`` / ``raw_output_contents`` (the
little-endian bytes of the row-major array; BYTES tensors as a sequence of
elements, each a 4-byte little-endian length followed by that many bytes) or in the
typed ``contents`` lists of the tensor message. A request uses one or the other for
all of its inputs; a response puts every output in raw form unless the client asked
for ``binary_data: false`` on all of them, because ``raw_output_contents`` is indexed
by output position and cannot cover only some outputs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import numpy as np

from cvserve._proto.inference import grpc_service_pb2 as pb
from cvserve.errors import ServiceError

__all__ = [
    "DTYPES",
    "InvalidTensorError",
    "decode_bytes_tensor",
    "encode_bytes_tensor",
    "parameter_value",
    "read_inputs",
    "write_output",
]

# Datatype name -> numpy dtype (little-endian, as on the wire); BYTES -> object.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# Datatype name -> the InferTensorContents field holding it (FP16/BF16 exist only raw).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")


class InvalidTensorError(ServiceError):
    """A tensor of the request is malformed: unknown datatype, or shape and data disagree."""

    code = grpc.StatusCode.INVALID_ARGUMENT


def decode_bytes_tensor(raw: bytes, count: int, name: str) -> list[bytes]:
    """Split a raw BYTES tensor into its ``count`` elements.

    Raises:
        InvalidTensorError: a length prefix runs past the end, bytes are left over,
            or the number of elements is not ``count``.
    """
    items: list[bytes] = []
    view = memoryview(raw)
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidTensorError(
                f"input {name!r}: BYTES tensor truncated: {len(view) - offset} byte(s) left where a "
                "4-byte little-endian length prefix was expected"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidTensorError(
                f"input {name!r}: BYTES element {len(items)} declares {length} bytes but only "
                f"{len(view) - offset} remain"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidTensorError(
            f"input {name!r}: shape holds {count} element(s) but the BYTES data holds {len(items)}"
        )
    return items


def encode_bytes_tensor(items: Iterable[bytes]) -> bytes:
    """Serialise BYTES elements, each behind its 4-byte little-endian length."""
    return b"".join(_LENGTH.pack(len(item)) + bytes(item) for item in items)


def _element_count(tensor: pb.ModelInferRequest.InferInputTensor) -> int:
    shape = list(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidTensorError(f"input {tensor.name!r}: shape {shape} has a negative dimension")
    return int(np.prod(shape, dtype=np.int64))


def _read_input(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, max_bytes_elements: int | None
) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    if datatype not in DTYPES:
        raise InvalidTensorError(
            f"input {name!r}: unknown datatype {datatype!r}, expected one of {', '.join(DTYPES)}"
        )
    dtype, count, shape = DTYPES[datatype], _element_count(tensor), tuple(tensor.shape)
    if datatype == "BYTES" and max_bytes_elements is not None and count > max_bytes_elements:
        # Checked before splitting: millions of tiny elements would cost seconds of CPU.
        raise InvalidTensorError(
            f"input {name!r}: {count} BYTES elements, more than the limit of {max_bytes_elements}"
        )
    if raw is not None:
        if datatype == "BYTES":
            array = np.empty(count, dtype=object)
            array[:] = decode_bytes_tensor(raw, count, name)
            return array.reshape(shape)
        if len(raw) != count * dtype.itemsize:
            raise InvalidTensorError(
                f"input {name!r}: {datatype} shape {list(shape)} needs {count * dtype.itemsize} bytes "
                f"of raw_input_contents, got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidTensorError(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidTensorError(
            f"input {name!r}: shape {list(shape)} holds {count} element(s) but contents.{field} has "
            f"{len(values)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    info = np.iinfo(dtype) if dtype.kind in "iu" else None
    if info is not None and count and (min(values) < info.min or max(values) > info.max):
        raise InvalidTensorError(f"input {name!r}: a value in contents.{field} does not fit {datatype}")
    return np.asarray(values, dtype=dtype).reshape(shape)


def read_inputs(
    request: pb.ModelInferRequest, *, max_bytes_elements: int | None = None
) -> dict[str, np.ndarray]:
    """Every input tensor of a request as a numpy array, by name.

    BYTES tensors become object arrays of ``bytes``. Raw inputs are read-only views of
    the request's buffers (no copy).

    Args:
        request: the request.
        max_bytes_elements: most elements a BYTES tensor may declare; None for no limit.

    Raises:
        InvalidTensorError: an unknown datatype, a shape that does not match the data,
            a duplicate input name, ``raw_input_contents`` not matching the inputs, or
            too many BYTES elements.
    """
    raws: Sequence[bytes] = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise InvalidTensorError(
            f"raw_input_contents has {len(raws)} entries for {len(request.inputs)} input(s); "
            "send every input raw or none"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in arrays:
            raise InvalidTensorError(f"input {tensor.name!r} appears more than once")
        if raws and tensor.HasField("contents") and tensor.contents.ByteSize():
            raise InvalidTensorError(f"input {tensor.name!r}: has both typed contents and raw_input_contents")
        arrays[tensor.name] = _read_input(tensor, raws[i] if raws else None, max_bytes_elements)
    return arrays


def write_output(response: pb.ModelInferResponse, name: str, array: np.ndarray, *, raw: bool) -> None:
    """Append one output tensor to ``response``.

    Args:
        response: the response being built.
        name: the output's name.
        array: its data; an object array of ``bytes`` for BYTES, else a numeric array
            whose dtype is in :data:`DTYPES`.
        raw: put the data in ``raw_output_contents`` (else in typed ``contents``).
            Every output of one response must use the same form.
    """
    datatype = _datatype_of(array)
    tensor = response.outputs.add(name=name, datatype=datatype, shape=[int(d) for d in array.shape])
    if datatype == "BYTES":
        items = [bytes(item) for item in array.reshape(-1)]
        if raw:
            response.raw_output_contents.append(encode_bytes_tensor(items))
        else:
            tensor.contents.bytes_contents.extend(items)
    elif raw:
        response.raw_output_contents.append(np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes())
    else:
        getattr(tensor.contents, _CONTENTS_FIELD[datatype]).extend(array.reshape(-1).tolist())


def _datatype_of(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    for datatype, dtype in DTYPES.items():
        if datatype != "BYTES" and array.dtype.newbyteorder("<") == dtype.newbyteorder("<"):
            return datatype
    raise TypeError(f"no Open Inference Protocol datatype for numpy dtype {array.dtype}")


def parameter_value(param: pb.InferParameter) -> bool | int | float | str | None:
    """The Python value of an ``InferParameter`` (None when no choice is set)."""
    choice = param.WhichOneof("parameter_choice")
    return None if choice is None else getattr(param, choice)
