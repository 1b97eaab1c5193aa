"""Polygon and PNG mask formats: the batched, box-cropped paths equal the per-mask full-image ones."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_util

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve.imaging import decode_png_array
from cvserve.models.types import Instance, Mask, Prediction
from cvserve.vision import codec


def rle(binary: np.ndarray) -> Mask:
    encoded = mask_util.encode(np.asfortranarray(binary.astype(np.uint8)))
    return Mask((int(encoded["size"][0]), int(encoded["size"][1])), encoded["counts"])


def shapes(height: int = 90, width: int = 120) -> list[np.ndarray]:
    """A disc, a ring (a hole), two separate blobs, one touching the image border, and an empty mask."""
    masks = [np.zeros((height, width), np.uint8) for _ in range(5)]
    cv2.circle(masks[0], (30, 40), 15, 1, -1)
    cv2.circle(masks[1], (80, 50), 20, 1, -1)
    cv2.circle(masks[1], (80, 50), 8, 0, -1)
    cv2.rectangle(masks[2], (5, 5), (20, 12), 1, -1)
    cv2.rectangle(masks[2], (60, 70), (75, 85), 1, -1)
    cv2.rectangle(masks[3], (100, 0), (width - 1, height - 1), 1, -1)
    return masks


def prediction(masks: list[np.ndarray]) -> Prediction:
    instances = tuple(
        Instance(box=(0.0, 0.0, 10.0, 10.0), category_id=0, score=1.0 - i / 10, mask=rle(m))
        for i, m in enumerate(masks)
    )
    return Prediction(image_size=masks[0].shape, instances=instances)


def respond(pred: Prediction, fmt: str) -> list[types_pb.Detection]:
    options = codec.DetectOptions(mask_format=fmt)
    return list(
        codec.detect_response(pred, model="m", version="1", class_names=["a"], options=options).detections
    )


def test_polygons_equal_full_image_contours() -> None:
    masks = shapes()
    for binary, det in zip(masks, respond(prediction(masks), "polygon"), strict=True):
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        expected = [c.reshape(-1).astype(np.float32).tolist() for c in contours if len(c) >= 3]
        assert [list(p.points) for p in det.polygons.polygons] == expected


def test_png_masks_decode_to_the_exact_mask() -> None:
    masks = shapes(33, 47)  # widths that are not a multiple of 8 exercise bit packing
    for binary, det in zip(masks, respond(prediction(masks), "png"), strict=True):
        np.testing.assert_array_equal(decode_png_array(det.png), binary.astype(bool))


def test_masks_of_different_sizes_are_decoded_one_by_one() -> None:
    small, large = shapes(20, 30)[0], shapes(40, 50)[1]
    pred = Prediction(
        image_size=(40, 50),
        instances=(
            Instance(box=(0, 0, 1, 1), category_id=0, score=0.9, mask=rle(small)),
            Instance(box=(0, 0, 1, 1), category_id=0, score=0.8, mask=None),
            Instance(box=(0, 0, 1, 1), category_id=0, score=0.7, mask=rle(large)),
        ),
    )
    first, no_mask, last = respond(pred, "png")
    np.testing.assert_array_equal(decode_png_array(first.png), small.astype(bool))
    assert no_mask.WhichOneof("mask") is None
    np.testing.assert_array_equal(decode_png_array(last.png), large.astype(bool))


def test_decode_masks_stacks_and_refuses_mixed_sizes() -> None:
    masks = shapes()
    stack = codec.decode_masks([rle(m) for m in masks])
    assert stack.shape == (90, 120, 5)
    np.testing.assert_array_equal(np.moveaxis(stack, 2, 0), np.stack(masks))
    for bad in ([], [rle(masks[0]), rle(shapes(10, 10)[0])]):
        with pytest.raises(ValueError, match="one size"):
            codec.decode_masks(bad)
