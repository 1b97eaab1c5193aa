"""Image decoding limits and formats, raw arrays, PNG round trips and overlays."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cvserve.errors import ImageTooLargeError, InvalidImageError
from cvserve.imaging import array_from_raw, decode_image, decode_png_array, draw_overlay, encode_png, palette
from cvserve.models.types import Instance, Mask, Prediction, SemanticMap


def encoded(img: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(h: int = 20, w: int = 30) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 8, ys * 12, (xs + ys) * 4], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_decode_exactly(fmt: str) -> None:
    img = gradient()
    np.testing.assert_array_equal(decode_image(encoded(img, fmt), max_pixels=10_000), img)


def test_grayscale_and_rgba_become_rgb() -> None:
    gray = np.arange(600, dtype=np.uint8).reshape(20, 30)
    out = decode_image(encoded(gray, "PNG"), max_pixels=10_000)
    assert out.shape == (20, 30, 3) and (out[..., 0] == gray).all()
    rgba = np.dstack([gradient(), np.full((20, 30), 255, np.uint8)])
    assert decode_image(encoded(rgba, "PNG"), max_pixels=10_000).shape == (20, 30, 3)


def test_exif_orientation_rotates() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    buf = io.BytesIO()
    Image.fromarray(gradient(20, 30)).save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue(), max_pixels=10_000).shape == (30, 20, 3)


def test_oversized_image_is_refused_from_the_header() -> None:
    data = encoded(np.zeros((100, 100, 3), np.uint8), "PNG")
    with pytest.raises(ImageTooLargeError, match="100x100 = 10000 pixels, more than the limit of 9999"):
        decode_image(data, max_pixels=9999)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello", "cannot decode"),
        (encoded(gradient(), "GIF"), "unsupported image format GIF"),
    ],
)
def test_bad_data_is_invalid(data: bytes, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message):
        decode_image(data, max_pixels=10_000)


def test_truncated_image_is_invalid() -> None:
    data = encoded(gradient(64, 64), "PNG")
    with pytest.raises(InvalidImageError, match="cannot decode"):
        decode_image(data[: len(data) // 2], max_pixels=10_000)


def test_raw_array_checks_shape_and_size() -> None:
    img = gradient(4, 5)
    np.testing.assert_array_equal(array_from_raw(img.tobytes(), 4, 5, 3, max_pixels=100), img)
    np.testing.assert_array_equal(array_from_raw(img.tobytes(), 4, 5, 0, max_pixels=100), img)
    with pytest.raises(InvalidImageError, match="59 bytes, expected 60"):
        array_from_raw(img.tobytes()[:-1], 4, 5, 3, max_pixels=100)
    with pytest.raises(InvalidImageError, match="3 channels"):
        array_from_raw(img.tobytes(), 4, 5, 1, max_pixels=100)
    with pytest.raises(InvalidImageError, match="height and width > 0"):
        array_from_raw(b"", 0, 5, 3, max_pixels=100)
    with pytest.raises(ImageTooLargeError):
        array_from_raw(img.tobytes(), 4, 5, 3, max_pixels=19)


def test_png_round_trips_label_maps_and_binary_masks() -> None:
    labels = (np.arange(200).reshape(10, 20) % 7).astype(np.uint8)
    np.testing.assert_array_equal(decode_png_array(encode_png(labels)), labels)
    mask = labels > 3
    np.testing.assert_array_equal(decode_png_array(encode_png(mask)), mask)


def test_overlays_change_only_what_they_draw() -> None:
    img = np.full((40, 50, 3), 128, np.uint8)
    from pycocotools import mask as mask_util

    binary = np.zeros((40, 50), np.uint8)
    binary[10:20, 10:30] = 1
    rle = mask_util.encode(np.asfortranarray(binary))
    inst = Instance(
        box=(10, 10, 30, 20), category_id=1, score=0.9, mask=Mask(size=(40, 50), counts=rle["counts"])
    )
    drawn = draw_overlay(img, Prediction(image_size=(40, 50), instances=(inst,)), ["cat"])
    assert drawn.shape == img.shape and (drawn[15, 20] != 128).any() and (drawn[35, 45] == 128).all()
    labels = np.zeros((40, 50), np.int64)
    labels[:, 25:] = 1
    sem = Prediction(
        image_size=(40, 50), semantic=SemanticMap(labels=labels, class_names=("background", "sky"))
    )
    drawn = draw_overlay(img, sem)
    assert (drawn[39, 10] == 128).all() and (drawn[39, 40] != 128).any()  # background left untouched


def test_palette_is_deterministic_and_distinct() -> None:
    colours = palette(8)
    assert colours.shape == (8, 3) and len({tuple(c) for c in colours}) == 8
    np.testing.assert_array_equal(colours, palette(8))
