"""Decoding a large JPEG at a reduced scale (libjpeg's DCT scaling) for a smaller model input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cvserve.imaging import decode_image, decode_scaled
from cvserve.models.resize import input_size
from cvserve.models.types import ScaledImage

MAX = 1 << 26


def _scene(h: int, w: int) -> np.ndarray:
    """Smooth shading with hard-edged shapes: the kind of edges masks follow."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xs / w * 200, ys / h * 200, (xs + ys) / (h + w) * 120 + 60], axis=-1)
    img[h // 5 : h // 2, w // 6 : w // 2] = (230, 40, 40)
    yy, xx = ys - 0.65 * h, xs - 0.7 * w
    img[(yy**2 + xx**2) < (0.18 * min(h, w)) ** 2] = (30, 200, 90)
    return img.astype(np.uint8)


def _jpeg(img: np.ndarray, orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(img).save(buf, format="JPEG", quality=92, exif=exif)
    return buf.getvalue()


def _model_input(h: int, w: int) -> tuple[int, int]:
    return input_size(h, w, 256, 1333)  # a detector testing at 256 px


def _resized(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))


@pytest.mark.parametrize(
    ("h", "w", "reduced"), [(3024, 4032, (378, 504)), (1200, 1600, (300, 400)), (600, 800, (300, 400))]
)
def test_a_large_jpeg_decodes_at_the_smallest_scale_still_above_the_input(h, w, reduced) -> None:
    out = decode_scaled(_jpeg(_scene(h, w)), max_pixels=MAX, needed=_model_input)
    assert isinstance(out, ScaledImage)
    assert out.size == (h, w)
    assert out.pixels.shape == (*reduced, 3)
    need = _model_input(h, w)
    assert out.pixels.shape[0] >= need[0] and out.pixels.shape[1] >= need[1]


def test_the_model_sees_nearly_the_same_input() -> None:
    """At the model's input size the reduced decode differs from the full one by about a
    grey level on average (both are resized with PIL's bilinear filter, as detectron2 does)."""
    h, w = 3024, 4032
    data = _jpeg(_scene(h, w))
    need = _model_input(h, w)
    full = _resized(decode_image(data, max_pixels=MAX), need).astype(np.int16)
    scaled = decode_scaled(data, max_pixels=MAX, needed=_model_input)
    assert isinstance(scaled, ScaledImage)
    small = _resized(scaled.pixels, need).astype(np.int16)
    diff = np.abs(full - small)
    assert diff.mean() < 1.5
    assert np.percentile(diff, 99) <= 12  # the shapes' edges, a pixel's shift at most


def test_a_jpeg_not_larger_than_needed_decodes_in_full() -> None:
    data = _jpeg(_scene(300, 400))
    out = decode_scaled(data, max_pixels=MAX, needed=_model_input)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, decode_image(data, max_pixels=MAX))
    assert isinstance(
        decode_scaled(_jpeg(_scene(1200, 1600)), max_pixels=MAX, needed=lambda h, w: None), np.ndarray
    )


def test_a_png_is_never_reduced() -> None:
    buf = io.BytesIO()
    Image.fromarray(_scene(1200, 1600)).save(buf, format="PNG")
    out = decode_scaled(buf.getvalue(), max_pixels=MAX, needed=_model_input)
    assert isinstance(out, np.ndarray) and out.shape == (1200, 1600, 3)


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied_and_the_size_is_upright(orientation: int) -> None:
    stored = _scene(1200, 1600)  # stored landscape; 6 and 8 display it as portrait
    data = _jpeg(stored, orientation)
    full = decode_image(data, max_pixels=MAX)
    out = decode_scaled(data, max_pixels=MAX, needed=_model_input)
    assert isinstance(out, ScaledImage)
    assert out.size == full.shape[:2]
    need = _model_input(*out.size)
    assert out.pixels.shape[0] >= need[0] and out.pixels.shape[1] >= need[1]
    diff = np.abs(_resized(full, need).astype(np.int16) - _resized(out.pixels, need).astype(np.int16))
    assert diff.mean() < 1.5  # upright the same way: a wrong turn would differ by tens of levels


def test_the_pixel_limit_applies_to_the_images_own_size() -> None:
    from cvserve.errors import ImageTooLargeError

    with pytest.raises(ImageTooLargeError, match="more than the limit"):
        decode_scaled(_jpeg(_scene(1200, 1600)), max_pixels=1200 * 1600 - 1, needed=_model_input)


def test_the_input_size_hint_does_not_keep_the_model_alive() -> None:
    import gc
    import weakref

    from cvserve.imaging import input_size_hint

    class Model:
        def input_size(self, height: int, width: int) -> tuple[int, int]:
            return height // 4, width // 4

    model = Model()
    needed = input_size_hint(model)
    assert needed is not None and needed(400, 800) == (100, 200)
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # a reload frees a replaced model even while a request decodes
    assert needed(400, 800) is None  # and the decode falls back to the full image
    assert input_size_hint(None) is None and input_size_hint(object()) is None
