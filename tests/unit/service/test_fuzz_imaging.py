"""Fuzzing the decode and option paths: any input gives an RGB array or a typed, explained error.

The property under test is the service's contract for bad input: whatever bytes or
values a client sends, decoding yields an ``(H, W, 3)`` uint8 array within the pixel
limit, or raises :class:`InvalidImageError` / :class:`ImageTooLargeError` (both
INVALID_ARGUMENT) with a message -- never another exception, which would be INTERNAL.
Set ``CVSERVE_FUZZ_EXAMPLES`` to fuzz longer than the default run, ``CVSERVE_FUZZ_RANDOM=1``
for new (not derandomised) examples.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve.errors import ImageTooLargeError, InvalidImageError, InvalidOptionError
from cvserve.imaging import array_from_raw, decode_image
from cvserve.vision.codec import decode_request_image, parse_detect_options

EXAMPLES = int(os.environ.get("CVSERVE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("CVSERVE_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow],
)
MAX_PIXELS = 64 * 64
CLASS_NAMES = ("red", "green", "blue")


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _seeds() -> list[bytes]:
    """Small valid images of every accepted format and several pixel modes, to mutate."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    seeds = [_encode(rgb, fmt) for fmt in ("PNG", "JPEG", "BMP", "TIFF", "WEBP")]
    seeds.append(_encode(rgb.convert("L"), "PNG"))
    seeds.append(_encode(rgb.convert("RGBA"), "PNG"))
    seeds.append(_encode(rgb.convert("P"), "PNG"))
    seeds.append(_encode(rgb.convert("CMYK"), "JPEG"))
    seeds.append(_encode(Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)), "PNG"))
    return seeds


SEEDS = _seeds()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image with bytes flipped, cut, inserted or overwritten."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at : at + len(chunk)] = chunk
    return bytes(data)


def _png_header(width: int, height: int, bit_depth: int, colour: int, payload: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(payload))
        + chunk(b"IEND", b"")
    )


@st.composite
def lying_png_headers(draw: st.DrawFn) -> bytes:
    """PNGs whose header claims any size, depth and colour type over a little data."""
    return _png_header(
        draw(st.integers(0, 2**31 - 1)),
        draw(st.integers(0, 2**31 - 1)),
        draw(st.sampled_from([1, 2, 4, 8, 16, 3])),
        draw(st.sampled_from([0, 2, 3, 4, 6, 5])),
        draw(st.binary(max_size=256)),
    )


def _check_decoded(data: bytes) -> None:
    try:
        out = decode_image(data, max_pixels=MAX_PIXELS)
    except (InvalidImageError, ImageTooLargeError) as e:
        assert e.message and str(e) == e.message
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert 1 <= out.shape[0] * out.shape[1] <= MAX_PIXELS


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    _check_decoded(data)


@FUZZ
@given(mutated_images())
def test_mutated_images_decode_or_fail_cleanly(data: bytes) -> None:
    _check_decoded(data)


@FUZZ
@given(lying_png_headers())
def test_png_headers_that_lie_about_their_size_fail_cleanly(data: bytes) -> None:
    _check_decoded(data)


@FUZZ
@given(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=512),
)
def test_raw_arrays_of_any_shape_fail_cleanly(height: int, width: int, channels: int, data: bytes) -> None:
    try:
        out = array_from_raw(data, height, width, channels, max_pixels=MAX_PIXELS)
    except (InvalidImageError, ImageTooLargeError) as e:
        assert e.message
        return
    assert out.shape == (height, width, 3) and len(data) == height * width * 3


@FUZZ
@given(
    st.one_of(
        st.builds(types_pb.Image, encoded=st.binary(max_size=256)),
        st.builds(
            types_pb.Image,
            raw=st.builds(
                types_pb.RawImage,
                data=st.binary(max_size=256),
                height=st.integers(0, 2**31 - 1),
                width=st.integers(0, 2**31 - 1),
                channels=st.integers(0, 2**31 - 1),
            ),
        ),
        st.just(types_pb.Image()),
    )
)
def test_request_images_fail_cleanly(image: types_pb.Image) -> None:
    try:
        out = decode_request_image(image, max_pixels=MAX_PIXELS)
    except (InvalidImageError, ImageTooLargeError) as e:
        assert e.message
        return
    assert out.dtype == np.uint8 and out.shape[2] == 3


@FUZZ
@given(
    score=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    max_detections=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    class_ids=st.lists(st.integers(0, 2**32 - 1), max_size=4),
    class_names=st.lists(st.one_of(st.sampled_from(CLASS_NAMES), st.text(max_size=8)), max_size=4),
    mask_format=st.integers(-(2**31), 2**31 - 1),
)
def test_detect_options_are_valid_or_explained(
    score: float | None,
    max_detections: int | None,
    class_ids: list[int],
    class_names: list[str],
    mask_format: int,
) -> None:
    options = pb.DetectOptions(class_ids=class_ids, class_names=class_names)
    options.mask_format = mask_format  # open enum: any int32 can arrive on the wire
    if score is not None:
        options.score_threshold = score
    if max_detections is not None:
        options.max_detections = max_detections
    try:
        parsed = parse_detect_options(options, CLASS_NAMES)
    except InvalidOptionError as e:
        assert e.message
        return
    assert parsed.score_threshold is None or 0.0 <= parsed.score_threshold <= 1.0
    assert parsed.class_ids is None or parsed.class_ids <= {0, 1, 2}
    assert parsed.mask_format in {"none", "rle", "polygon", "png"}


@pytest.mark.parametrize(("width", "height"), [(50_000, 50_000), (1, 2**31 - 1), (2**31 - 1, 2**31 - 1)])
def test_huge_headers_are_refused_before_decoding(width: int, height: int) -> None:
    data = _png_header(width, height, 8, 2, b"\0" * 64)
    with pytest.raises(ImageTooLargeError, match="more than the limit"):
        decode_image(data, max_pixels=40_000_000)
