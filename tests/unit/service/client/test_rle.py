"""The client's numpy COCO RLE encoder writes the bytes pycocotools writes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pycocotools import mask as mask_util

from cvserve.client.rle import encode_mask, run_lengths


def reference(mask: np.ndarray) -> tuple[tuple[int, int], bytes]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return (int(rle["size"][0]), int(rle["size"][1])), rle["counts"]


masks = hnp.arrays(bool, st.tuples(st.integers(0, 48), st.integers(0, 48)))
# Long runs: few rectangles on large canvases, so counts and their differences need 3-5 groups.
blocks = st.tuples(st.integers(1, 1500), st.integers(1, 1500)).flatmap(
    lambda shape: st.lists(
        st.tuples(
            st.integers(0, shape[0]),
            st.integers(0, shape[0]),
            st.integers(0, shape[1]),
            st.integers(0, shape[1]),
        ),
        max_size=4,
    ).map(lambda boxes: _draw(shape, boxes))
)


def _draw(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for y0, y1, x0, x1 in boxes:
        mask[min(y0, y1) : max(y0, y1), min(x0, x1) : max(x0, x1)] ^= True
    return mask


@settings(max_examples=500, deadline=None)
@given(masks)
def test_random_masks_equal_pycocotools(mask: np.ndarray) -> None:
    assert encode_mask(mask) == reference(mask)


@settings(max_examples=100, deadline=None)
@given(blocks)
def test_long_runs_equal_pycocotools(mask: np.ndarray) -> None:
    assert encode_mask(mask) == reference(mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (37, 1), (20, 30), (0, 4), (4, 0)])
@pytest.mark.parametrize("fill", [False, True])
def test_empty_and_full_masks_of_any_shape(shape: tuple[int, int], fill: bool) -> None:
    mask = np.full(shape, fill)
    assert encode_mask(mask) == reference(mask)


def test_runs_start_with_background_and_nonzero_is_foreground() -> None:
    mask = np.array([[3, 0], [1, 0]], np.uint8)  # column-major: 1, 1, 0, 0
    assert run_lengths(mask).tolist() == [0, 2, 2]
    assert encode_mask(mask) == reference(mask != 0)
    with pytest.raises(ValueError, match="2-D"):
        encode_mask(np.zeros((2, 2, 1), bool))
