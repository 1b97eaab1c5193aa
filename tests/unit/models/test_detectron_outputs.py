"""Box-limited mask pasting and RLE encoding against detectron2's full-image path."""

from __future__ import annotations

import models  # noqa: F401  (detectron2 compatibility layer first)

# isort: split

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from models.detectron_outputs import box_rle, instances_to_prediction, rescale_and_encode

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
