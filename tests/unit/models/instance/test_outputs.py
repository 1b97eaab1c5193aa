"""Box-limited mask pasting and RLE encoding against detectron2's full-image path."""

from __future__ import annotations

# isort: split

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.layers.mask_ops import paste_masks_in_image
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from cvserve.models.instance import paste
from cvserve.models.instance.outputs import (
    block_rles,
    box_rle,
    instances_to_prediction,
    paste_rles,
    rescale_and_encode,
)

H, W = 48, 64


def _full(crop: np.ndarray, top: int, left: int) -> np.ndarray:
    full = np.zeros((H, W), bool)
    full[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return full


@pytest.mark.parametrize(
    ("top", "left", "h", "w"),
    [
        (0, 0, H, W),  # the whole image
        (0, 5, H, 3),  # full-height columns: runs continue across columns
        (10, 0, 5, 7),  # touches the left edge
        (H - 4, W - 6, 4, 6),  # ends in the last pixel
        (3, 9, 1, 1),
        (7, 11, 20, 30),
    ],
)
@pytest.mark.parametrize("fill", ["ones", "random", "zeros"])
def test_box_rle_matches_pycocotools(top: int, left: int, h: int, w: int, fill: str) -> None:
    rng = np.random.default_rng(top * 100 + left)
    crop = {
        "ones": np.ones((h, w), bool),
        "zeros": np.zeros((h, w), bool),
        "random": rng.random((h, w)) > 0.4,
    }[fill]
    full = _full(crop, top, left)
    expected = mask_util.encode(np.asfortranarray(full.astype(np.uint8)))["counts"]
    assert box_rle(crop, top, left, H, W) == expected


def test_box_rle_empty_crop() -> None:
    expected = mask_util.encode(np.asfortranarray(np.zeros((H, W), np.uint8)))["counts"]
    assert box_rle(np.zeros((0, 0), bool), 0, 0, H, W) == expected


def _raw(seed: int, n: int = 12) -> Instances:
    g = torch.Generator().manual_seed(seed)
    inst = Instances((32, 43))
    xy = torch.rand(n, 2, generator=g) * torch.tensor([43.0, 32.0]) - 3
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 20 + 0.2], 1)
    boxes[0] = torch.tensor([0.0, 0.0, 43.0, 32.0])  # the whole image
    boxes[1] = torch.tensor([5.0, 5.0, 5.0, 9.0])  # empty: dropped
    inst.pred_boxes = Boxes(boxes)
    inst.scores = torch.rand(n, generator=g)
    inst.pred_classes = torch.randint(0, 5, (n,), generator=g)
    inst.pred_masks = torch.rand(n, 1, 28, 28, generator=g)
    return inst


def _copy(inst: Instances) -> Instances:
    fields = {
        k: Boxes(v.tensor.clone()) if isinstance(v, Boxes) else v.clone()
        for k, v in inst.get_fields().items()
    }
    return Instances(inst.image_size, **fields)


@pytest.mark.parametrize("seed", range(5))
def test_rescale_and_encode_equals_detector_postprocess(seed: int) -> None:
    raw = _raw(seed)
    expected = instances_to_prediction(detector_postprocess(_copy(raw), H, W), H, W)
    got = rescale_and_encode(raw, H, W)
    assert got.image_size == expected.image_size
    assert got.instances == expected.instances
    assert len(got.instances) < len(raw)  # the empty box is gone
    scores = [i.score for i in got.instances]
    assert scores == sorted(scores, reverse=True)
    assert raw.has("pred_masks") and torch.equal(raw.pred_boxes.tensor, _raw(seed).pred_boxes.tensor)


def test_rescale_and_encode_without_masks() -> None:
    raw = _raw(0)
    raw.remove("pred_masks")
    got = rescale_and_encode(raw, H, W)
    assert got.instances
    assert all(i.mask is None for i in got.instances)
    assert len(got.instances) < len(raw)


@pytest.mark.parametrize("seed", range(4))
def test_block_rles_of_many_masks_match_pycocotools(seed: int) -> None:
    # Blocks of several sizes in one padded array, some touching the image's edges (runs
    # of ones continuing from one image column into the next) and some empty.
    rng = np.random.default_rng(seed)
    n, rows, cols = 9, H, 20
    tops = rng.integers(0, H - 5, n)
    lefts = rng.integers(0, W - cols, n)
    tops[:3], lefts[0], lefts[1] = 0, 0, W - cols
    heights = np.minimum(rng.integers(1, rows + 1, n), H - tops)
    heights[:2] = H  # whole image columns
    masks = rng.random((n, rows, cols)) > 0.3
    masks[3] = False
    masks &= np.arange(rows)[None, :, None] < heights[:, None, None]
    expected = []
    for i in range(n):
        full = np.zeros((H, W), np.uint8)
        full[tops[i] : tops[i] + rows, lefts[i] : lefts[i] + cols] = masks[i][: H - tops[i]]
        expected.append(mask_util.encode(np.asfortranarray(full))["counts"])
    assert block_rles(masks, tops, lefts, H, W) == expected


def _boxes(n: int, seed: int, height: int, width: int) -> torch.Tensor:
    """Boxes of very different sizes, clipped to the image like detector_postprocess's."""
    g = torch.Generator().manual_seed(seed)
    size = torch.rand(n, 2, generator=g) ** 3 * torch.tensor([width, height]) + 0.3
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) - size / 2
    boxes = torch.cat([xy, xy + size], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def _smooth(n: int, seed: int, size: int = 28) -> torch.Tensor:
    """Mask-head-like probabilities: blurred blobs, mostly saturated, smooth edges."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 1, size // 4, size // 4, generator=g) * 6
    up = torch.nn.functional.interpolate(logits, size=(size, size), mode="bicubic", align_corners=False)
    return up[:, 0].sigmoid()


@pytest.mark.parametrize("direct_max", [paste.DIRECT_MAX_PIXELS, 0], ids=["default", "crossings-only"])
@pytest.mark.parametrize("kind", ["noise", "smooth"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("height", "width"), [(90, 120), (3024, 4032)])
def test_paste_rles_equals_detectron2_paste(
    kind: str, seed: int, height: int, width: int, direct_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of finding a mask's pixels, small blocks sampled whole (the default) and
    crossings for every block (``DIRECT_MAX_PIXELS`` 0), give detectron2's paste exactly."""
    monkeypatch.setattr(paste, "DIRECT_MAX_PIXELS", direct_max)
    boxes = _boxes(25, seed, height, width)
    if seed % 3 == 2:  # boxes on the image's edges and corners
        boxes[: len(boxes) // 2, :2] = 0.0
        boxes[len(boxes) // 4 :, 2:] = torch.tensor([float(width), float(height)])
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(25, 28, 28, generator=g) if kind == "noise" else _smooth(25, seed)
    full = paste_masks_in_image(probs, Boxes(boxes), (height, width)).numpy()
    expected = mask_util.encode(np.asfortranarray(full.transpose(1, 2, 0).astype(np.uint8)))
    assert paste_rles(probs, boxes, height, width) == [r["counts"] for r in expected]


def test_paste_rles_of_nothing() -> None:
    assert paste_rles(torch.zeros(0, 28, 28), torch.zeros(0, 4), 10, 10) == []
