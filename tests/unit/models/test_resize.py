"""The adapters' test-time resize: detectron2's sizes, each side at least 1 pixel, a pixel limit."""

from __future__ import annotations

import numpy as np
import pytest
from detectron2.data import transforms as T
from hypothesis import given, settings
from hypothesis import strategies as st

from cvserve.models.errors import InputSizeError
from cvserve.models.resize import InputResize, input_size

sides = st.integers(1, 200_000)
short_edges = st.integers(1, 1600)
max_sizes = st.integers(1, 4000)


@settings(max_examples=500, deadline=None)
@given(sides, sides, short_edges, max_sizes)
def test_size_is_detectron2s_wherever_detectron2_gives_one(h: int, w: int, short: int, max_size: int) -> None:
    reference = T.ResizeShortestEdge.get_output_shape(h, w, short, max_size)
    new_h, new_w = input_size(h, w, short, max_size)
    assert new_h >= 1 and new_w >= 1
    if min(reference) >= 1:
        assert (new_h, new_w) == reference
    else:  # detectron2 rounds the short side to 0; it becomes 1, the long side stays
        assert (new_h, new_w) == tuple(max(1, side) for side in reference)
    # The long side obeys max_size (up to detectron2's rounding), the orientation is kept.
    assert max(new_h, new_w) <= max(max_size, short) + 1
    assert (new_h >= new_w) == (h >= w) or new_h == new_w


@pytest.mark.parametrize(
    ("h", "w", "expected"), [(1, 3000, (1, 1333)), (12000, 1, (1333, 1)), (1, 1, (800, 800))]
)
def test_extreme_aspect_ratios_keep_one_pixel(h: int, w: int, expected: tuple[int, int]) -> None:
    assert 0 in T.ResizeShortestEdge.get_output_shape(h, w, 800, 1333) or (h, w) == (1, 1)
    resize = InputResize(800, 1333, 4096 * 4096, "m")
    out = resize(np.full((h, w, 3), 200, np.uint8))
    assert out.shape == (*expected, 3) and out.dtype == np.uint8
    assert (out == 200).all()  # a constant image stays constant through the bilinear resize


def test_resize_equals_detectron2_on_an_ordinary_image() -> None:
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    expected = T.ResizeShortestEdge([800, 800], 1333).get_transform(image).apply_image(image)
    np.testing.assert_array_equal(InputResize(800, 1333, 4096 * 4096)(image), expected)


def test_an_input_over_the_pixel_limit_names_the_limit() -> None:
    resize = InputResize(800, 10**9, 16_000_000, "wide")
    with pytest.raises(InputSizeError) as info:
        resize.output_size(1, 3000)
    message = str(info.value)
    assert "image 3000x1 resizes to 2400000x800 = 1920000000 pixels" in message
    assert "model 'wide'" in message and "max_input_pixels = 16000000" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("args", "name"), [((0, 10, 10), "min_size_test"), ((10, 0, 10), "max_size_test"),
                                            ((10, 10, 0), "max_input_pixels")])  # fmt: skip
def test_bad_settings_fail_at_construction(args: tuple[int, int, int], name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        InputResize(*args)
