"""The client's numpy PNG decoder against Pillow: same arrays, every filter type, clear errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from cvserve.client.png import decode_png
from cvserve.imaging import encode_label_map, encode_png

DTYPES = {1: np.dtype(bool), 8: np.dtype(np.uint8), 16: np.dtype(np.uint16)}
shapes = st.tuples(st.integers(1, 40), st.integers(1, 40))
gray = st.sampled_from([np.dtype(bool), np.dtype(np.uint8), np.dtype(np.uint16)]).flatmap(
    lambda dtype: hnp.arrays(dtype, shapes)
)


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    a, b, c = (v.astype(np.int16) for v in (a, b, c))
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filtered_png(
    array: np.ndarray, kinds: list[int], *, interlace: int = 0, depth: int | None = None
) -> bytes:
    """A grayscale PNG of ``array`` whose row ``y`` uses filter type ``kinds[y]`` (written here,
    independently of the decoder under test, from the PNG specification). A type above 4 is
    written as is, over data filtered as type ``k % 5``: a corrupt file."""
    depth = depth or {np.dtype(bool): 1, np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}[array.dtype]
    if depth == 1:
        rows = np.packbits(array, axis=1)
    else:
        rows = array.astype(">u2").view(np.uint8) if depth == 16 else array
    rows = rows.reshape(array.shape[0], -1).astype(np.int16)
    bpp = max(1, depth // 8)
    left = np.pad(rows, ((0, 0), (bpp, 0)))[:, :-bpp]
    up = np.pad(rows, ((1, 0), (0, 0)))[:-1]
    upleft = np.pad(up, ((0, 0), (bpp, 0)))[:, :-bpp]
    predictors = [np.zeros_like(rows), left, up, (left + up) // 2, paeth(left, up, upleft)]
    out = np.stack([rows[y] - predictors[k % 5][y] for y, k in enumerate(kinds)]) % 256
    raw = np.concatenate([np.asarray(kinds, np.uint8)[:, None], out.astype(np.uint8)], axis=1)
    height, width = array.shape
    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes()))
        + chunk(b"IEND", b"")
    )


def pillow(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    return np.asarray(img, dtype=bool) if img.mode == "1" else np.asarray(img)


def assert_same(decoded: np.ndarray, expected: np.ndarray) -> None:
    assert decoded.dtype == expected.dtype and decoded.shape == expected.shape
    np.testing.assert_array_equal(decoded, expected)


@settings(max_examples=300, deadline=None)
@given(gray)
def test_decodes_what_pillow_encodes(array: np.ndarray) -> None:
    """Pillow chooses a filter per row adaptively: random images get all of them."""
    assert_same(decode_png(encode_png(array)), array)


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.int64, shapes, elements=st.integers(0, 65_535)))
def test_decodes_the_servers_label_maps(labels: np.ndarray) -> None:
    decoded = decode_png(encode_label_map(labels))
    np.testing.assert_array_equal(decoded, labels)
    assert decoded.dtype == (np.uint8 if labels.max() < 256 else np.uint16)


@settings(max_examples=300, deadline=None)
@given(
    gray.flatmap(
        lambda a: st.tuples(st.just(a), st.lists(st.integers(0, 4), min_size=a.shape[0], max_size=a.shape[0]))
    )
)
def test_every_filter_type_equals_pillow(case: tuple[np.ndarray, list[int]]) -> None:
    array, kinds = case
    data = filtered_png(array, kinds)
    assert_same(pillow(data), array)  # the reference reads the test's PNG as written
    assert_same(decode_png(data), array)


def _blocks(
    dtype: np.dtype, shape: tuple[int, int], boxes: list[tuple[int, int, int, int, int]]
) -> np.ndarray:
    array = np.zeros(shape, dtype)
    for y, x, h, w, value in boxes:
        array[y : y + h, x : x + w] = value % 2 if dtype.kind == "b" else value
    return array


label_like = st.tuples(
    st.sampled_from([np.dtype(bool), np.dtype(np.uint8), np.dtype(np.uint16)]),
    st.tuples(st.integers(1, 30), st.integers(1, 300)),
    st.lists(st.tuples(*[st.integers(0, 300)] * 4, st.integers(0, 65_535)), max_size=6),
).map(
    lambda t: _blocks(
        t[0], t[1], [(y, x, h, w, v % (256 if t[0] == np.uint8 else 65_536)) for y, x, h, w, v in t[2]]
    )
)


@settings(max_examples=300, deadline=None)
@given(
    label_like.flatmap(
        lambda a: st.tuples(
            st.just(a), st.lists(st.sampled_from([3, 4]), min_size=a.shape[0], max_size=a.shape[0])
        )
    )
)
def test_average_and_paeth_rows_of_label_like_images(case: tuple[np.ndarray, list[int]]) -> None:
    """Few changes per row: the Paeth rows take the running-sum path (and wide rows, long runs)."""
    array, kinds = case
    data = filtered_png(array, kinds)
    assert_same(pillow(data), array)
    assert_same(decode_png(data), array)


def test_pillow_chooses_several_filters_on_these_images() -> None:
    """The adaptive-filter property above is not vacuous: Pillow writes None, Sub, Up and
    Paeth rows (it does not choose Average; the PNGs written by this test have all five)."""
    rng = np.random.default_rng(0)
    seen: set[int] = set()
    for _ in range(20):
        data = encode_png(rng.integers(0, 256, (30, 30), dtype=np.uint8))
        idat = b"".join(
            data[p + 8 : p + 8 + n] for p, n in _chunk_offsets(data) if data[p + 4 : p + 8] == b"IDAT"
        )
        seen |= set(zlib.decompress(idat)[::31])
    assert {0, 1, 2, 4} <= seen


def _chunk_offsets(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], 8
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((pos, n))
        pos += 12 + n
    return out


def test_large_label_map_with_long_rows() -> None:
    labels = np.zeros((300, 2000), np.int64)
    labels[50:250, 100:1900] = 7
    labels[::37, ::53] = 400
    np.testing.assert_array_equal(decode_png(encode_label_map(labels)), labels)


def encoded(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a PNG"),
        (b"GIF89a....", "not a PNG"),
        (encoded(Image.new("RGB", (3, 2))), "colour type RGB"),
        (encoded(Image.new("P", (3, 2))), "colour type palette"),
        (encoded(Image.new("LA", (3, 2))), "colour type grayscale\\+alpha"),
        (filtered_png(np.zeros((2, 3), np.uint8), [0, 0], interlace=1), "Adam7 interlacing"),
        (filtered_png(np.zeros((2, 3), np.uint8), [0, 0], depth=4), "bit depth 4"),
        (filtered_png(np.zeros((2, 3), np.uint8), [0, 5]), "unknown filter type 5 on row 1"),
        (encode_png(np.zeros((4, 4), np.uint8))[:-20], "truncated PNG"),
    ],
)
def test_unsupported_or_corrupt_png_raises_value_error(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_png(data)


def test_corrupt_crc_and_short_image_data_raise() -> None:
    data = bytearray(encode_png(np.arange(16, dtype=np.uint8).reshape(4, 4)))
    data[20] ^= 0xFF  # inside IHDR
    with pytest.raises(ValueError, match="CRC mismatch in chunk b'IHDR'"):
        decode_png(bytes(data))
    header = struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0)
    short = b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"IDAT", zlib.compress(b"\0" * 9)),
            chunk(b"IEND", b""),
        ]
    )
    with pytest.raises(ValueError, match="inflates to 9 bytes, expected 20"):
        decode_png(short)
