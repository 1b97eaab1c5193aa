"""Client-side conversions of the ``cvserve.v1`` protos: images in, predictions back.

Image -> ``Image`` proto, mask-format names -> enum values, and ``DetectResponse`` /
``SegmentResponse`` -> :class:`~cvserve.models.types.Prediction`. The server side is
:mod:`cvserve.vision.codec`, which re-exports these names.
"""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_util

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve.imaging import decode_png_array
from cvserve.models.types import Instance, Mask, Prediction, SemanticMap

__all__ = [
    "MASK_FORMATS",
    "image_to_proto",
    "mask_format_to_proto",
    "prediction_from_detect",
    "prediction_from_segment",
]

# Client-facing names of the MaskFormat enum values.
MASK_FORMATS = {
    "none": types_pb.MASK_FORMAT_NONE,
    "rle": types_pb.MASK_FORMAT_RLE,
    "polygon": types_pb.MASK_FORMAT_POLYGON,
    "png": types_pb.MASK_FORMAT_PNG,
}


def image_to_proto(image: bytes | np.ndarray) -> types_pb.Image:
    """Wrap encoded bytes, or an ``(H, W, 3)`` RGB uint8 array sent raw, in an ``Image``.

    Raises:
        ValueError: an array that is not ``(H, W, 3)`` uint8.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return types_pb.Image(encoded=bytes(image))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image array must be (H, W, 3) uint8 RGB, got {array.shape} {array.dtype}")
    height, width, _ = array.shape
    raw = types_pb.RawImage(
        data=np.ascontiguousarray(array).tobytes(), height=height, width=width, channels=3
    )
    return types_pb.Image(raw=raw)


def mask_format_to_proto(name: str) -> types_pb.MaskFormat:
    """The ``MaskFormat`` value of ``none``, ``rle``, ``polygon`` or ``png``.

    Raises:
        ValueError: an unknown name.
    """
    try:
        return MASK_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown mask format {name!r}; use one of {', '.join(MASK_FORMATS)}") from None


def _mask_from_detection(det: types_pb.Detection, size: tuple[int, int]) -> Mask | None:
    kind = det.WhichOneof("mask")
    if kind == "rle":
        return Mask(size=(det.rle.height, det.rle.width), counts=det.rle.counts)
    if kind == "png":
        binary = decode_png_array(det.png)
    elif kind == "polygons":
        binary = np.zeros(size, np.uint8)
        contours = [
            np.asarray(p.points, np.float32).reshape(-1, 1, 2).round().astype(np.int32)
            for p in det.polygons.polygons
        ]
        cv2.drawContours(binary, contours, -1, 1, thickness=cv2.FILLED)
    else:
        return None
    rle = mask_util.encode(np.asfortranarray(binary.astype(np.uint8)))
    return Mask(size=(int(rle["size"][0]), int(rle["size"][1])), counts=rle["counts"])


def prediction_from_detect(response: pb.DetectResponse) -> Prediction:
    """Turn a ``DetectResponse`` back into a :class:`Prediction` (masks as COCO RLE)."""
    size = (response.image_height, response.image_width)
    instances = tuple(
        Instance(
            box=(d.box.x0, d.box.y0, d.box.x1, d.box.y1),
            category_id=d.class_id,
            score=d.score,
            mask=_mask_from_detection(d, size),
        )
        for d in response.detections
    )
    return Prediction(image_size=size, instances=instances)


def prediction_from_segment(response: pb.SegmentResponse) -> Prediction:
    """Turn a ``SegmentResponse`` back into a :class:`Prediction` with its label map."""
    labels = decode_png_array(response.label_map_png)
    semantic = SemanticMap(labels=labels, class_names=tuple(response.class_names))
    return Prediction(image_size=(response.image_height, response.image_width), semantic=semantic)
