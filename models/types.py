"""Plain result types shared by every model, the service and the tools.

All are frozen dataclasses holding Python and numpy values only; nothing here
knows about protobuf, gRPC or Ray.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np


class Task(enum.StrEnum):
    """What a model predicts."""

    INSTANCE = "instance"  # boxes, classes, scores and masks (detection / instance segmentation)
    SEMANTIC = "semantic"  # a per-pixel class label map


@dataclass(frozen=True)
class Mask:
    """A binary mask in COCO run-length encoding, as produced by ``pycocotools.mask.encode``.

    Attributes:
        size: ``(height, width)`` of the image the mask covers.
        counts: the compressed RLE string (bytes), exactly as pycocotools stores it.
    """

    size: tuple[int, int]
    counts: bytes

    def to_coco(self) -> dict[str, object]:
        """The ``segmentation`` value of a COCO results entry (counts as str)."""
        return {"size": [int(self.size[0]), int(self.size[1])], "counts": self.counts.decode("ascii")}


@dataclass(frozen=True)
class Instance:
    """One detected object, in original image coordinates.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in pixels, absolute, XYXY.
        category_id: index into the model's ``class_names`` (contiguous, from 0).
        score: confidence in [0, 1].
        mask: the instance mask, or None for box-only models.
    """

    box: tuple[float, float, float, float]
    category_id: int
    score: float
    mask: Mask | None = None

    def coco_entry(self, category_id: int | None = None, image_id: int | None = None) -> dict[str, Any]:
        """This instance as a COCO results entry (``bbox`` as XYWH, ``segmentation`` as RLE).

        Args:
            category_id: the entry's ``category_id`` (default: the model's class index).
            image_id: added as ``image_id`` when given.
        """
        x0, y0, x1, y1 = (float(v) for v in self.box)
        entry: dict[str, Any] = {} if image_id is None else {"image_id": image_id}
        entry["category_id"] = self.category_id if category_id is None else category_id
        entry["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        entry["score"] = float(self.score)
        if self.mask is not None:
            entry["segmentation"] = self.mask.to_coco()
        return entry


@dataclass(frozen=True, eq=False)
class SemanticMap:
    """A per-pixel label map in original image coordinates.

    Attributes:
        labels: ``(H, W)`` integer array of class indices into ``class_names``.
        class_names: names of the classes, index = label value.
    """

    labels: np.ndarray
    class_names: tuple[str, ...]

    def areas(self) -> dict[int, int]:
        """Pixel count per label present in the map."""
        values, counts = np.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}


class ScaledImage(NamedTuple):
    """An image decoded at a reduced scale, with the size predictions are reported in.

    Attributes:
        pixels: ``(h, w, 3)`` RGB uint8, at most ``size`` (a JPEG decoded with libjpeg's DCT
            scaling, see ``cvserve.imaging.decode_scaled``).
        size: the image's own upright ``(height, width)``: boxes and masks are in its pixels.
    """

    pixels: np.ndarray
    size: tuple[int, int]


def pixels_and_size(image: np.ndarray | ScaledImage) -> tuple[np.ndarray, tuple[int, int]]:
    """The pixels a model reads and the upright ``(height, width)`` its predictions are in."""
    if isinstance(image, ScaledImage):
        return image.pixels, image.size
    return image, (int(image.shape[0]), int(image.shape[1]))


@dataclass(frozen=True, eq=False)
class Prediction:
    """The result for one image.

    Attributes:
        image_size: ``(height, width)`` of the input image.
        instances: detections sorted by descending score (instance models), else empty.
        semantic: the label map (semantic models), else None.
    """

    image_size: tuple[int, int]
    instances: tuple[Instance, ...] = field(default_factory=tuple)
    semantic: SemanticMap | None = None
