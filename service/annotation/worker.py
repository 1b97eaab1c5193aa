"""Turn image paths into journal records: read, decode, predict, write label maps and overlays.

The same code runs in the in-process and server engines' threads and inside Ray actors;
records are plain JSON-ready dicts so any engine can ship them to the journal writer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_util

from cvserve.annotation.journal import atomic_write_bytes
from cvserve.config import DEFAULT_MAX_IMAGE_PIXELS
from cvserve.errors import ImageTooLargeError, InvalidImageError
from cvserve.imaging import Needed, decode_image, decode_scaled, draw_overlay, encode_label_map
from cvserve.models.types import Prediction, ScaledImage, pixels_and_size

__all__ = [
    "ImageReadError",
    "LoadedImage",
    "PredictFn",
    "RenderOptions",
    "WorkItem",
    "output_path",
    "process_batch",
    "read_image",
]

logger = logging.getLogger(__name__)


class ImageReadError(Exception):
    """An image file is missing, unreadable or not a decodable image."""


@dataclass(frozen=True)
class WorkItem:
    """An image to annotate: its absolute path and its path relative to the image root."""

    path: str
    rel: str


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: the file's bytes and the ``(H, W, 3)`` RGB uint8 array, or a JPEG
    decoded at a reduced scale for a smaller model input."""

    item: WorkItem
    data: bytes
    array: np.ndarray | ScaledImage

    @property
    def size(self) -> tuple[int, int]:
        """The image's own upright ``(height, width)``."""
        return pixels_and_size(self.array)[1]

    def full_pixels(self) -> np.ndarray:
        """Every pixel (decoded again when the image was read at a reduced scale)."""
        if isinstance(self.array, ScaledImage):
            return decode_image(self.data, max_pixels=self.size[0] * self.size[1])
        return self.array


@dataclass(frozen=True)
class RenderOptions:
    """Files written per image besides the journal record.

    Attributes:
        class_names: the model's label names (for overlay captions).
        labels_dir: where semantic label PNGs go (pixel value = label index); None: not written.
        overlays_dir: where images with predictions drawn go; None: not written.
    """

    class_names: tuple[str, ...]
    labels_dir: str | None = None
    overlays_dir: str | None = None


# Predicts loaded images; one Prediction, or the Exception that failed that image, per input.
PredictFn = Callable[[Sequence[LoadedImage]], list["Prediction | Exception"]]


def read_image(
    path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, needed: Needed | None = None
) -> tuple[bytes, np.ndarray | ScaledImage]:
    """Read and decode an image file into upright RGB uint8.

    Decoding is the server's own (:func:`cvserve.imaging.decode_image`); with ``needed`` (a
    model's ``input_size``) a JPEG larger than the model's input is decoded at a reduced
    scale as the server does (:func:`cvserve.imaging.decode_scaled`), so every engine feeds
    the model the same pixels.

    Raises:
        ImageReadError: with the reason the file cannot be used.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageReadError(f"cannot read: {e.strerror or e}") from None
    if not data:
        raise ImageReadError("empty file")
    try:
        return data, decode_scaled(data, max_pixels=max_pixels, needed=needed)
    except (InvalidImageError, ImageTooLargeError) as e:
        raise ImageReadError(e.message) from None


def output_path(base: str, rel: str, suffix: str) -> str:
    """``base/rel`` with ``suffix``, kept inside ``base`` even for ``..`` or absolute ``rel``."""
    parts = [p if p != ".." else "__" for p in PurePosixPath(rel.replace("\\", "/")).parts if p != "/"]
    return os.path.join(base, *parts[:-1], PurePosixPath(parts[-1]).stem + suffix)


def _instance_entries(pred: Prediction) -> list[dict[str, Any]]:
    """COCO-style entries with the model's class index as ``label`` (mapped to ids at output)."""
    entries = []
    for inst in pred.instances:
        entry = inst.coco_entry()
        entry["label"] = entry.pop("category_id")
        entries.append(entry)
    return entries


def _semantic_entries(labels: np.ndarray) -> list[dict[str, Any]]:
    """One COCO-stuff style entry (RLE of the region) per label present in the map."""
    entries = []
    for value in np.unique(labels):
        rle = mask_util.encode(np.asfortranarray((labels == value).astype(np.uint8)))
        x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
        entries.append(
            {
                "label": int(value),
                "bbox": [x, y, w, h],
                "score": 1.0,
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": rle["counts"].decode("ascii"),
                },
            }
        )
    return entries


def _image_record(image: LoadedImage, pred: Prediction, render: RenderOptions) -> dict[str, Any]:
    height, width = image.size
    record: dict[str, Any] = {"type": "image", "path": image.item.path, "height": height, "width": width}
    if pred.semantic is not None:
        labels = np.asarray(pred.semantic.labels)
        record["instances"] = _semantic_entries(labels)
        if render.labels_dir:
            target = output_path(render.labels_dir, image.item.rel, ".png")
            atomic_write_bytes(target, encode_label_map(labels))
            record["labels_png"] = os.path.relpath(target, render.labels_dir)
    else:
        record["instances"] = _instance_entries(pred)
    if render.overlays_dir:
        names = [
            render.class_names[i.category_id] if i.category_id < len(render.class_names) else ""
            for i in pred.instances
        ]
        drawn = draw_overlay(image.full_pixels(), pred, names)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
        if ok:
            atomic_write_bytes(output_path(render.overlays_dir, image.item.rel, ".jpg"), buf.tobytes())
    return record


def process_batch(
    items: Sequence[WorkItem], predict: PredictFn, render: RenderOptions, needed: Needed | None = None
) -> list[dict[str, Any]]:
    """Annotate a batch: one journal record per item, in order.

    Unreadable images and images the model fails on become ``error`` records; any
    exception ``predict`` raises (rather than returns) aborts the batch. ``needed``: see
    :func:`read_image`.
    """
    records: dict[str, dict[str, Any]] = {}
    loaded: list[LoadedImage] = []
    for item in items:
        try:
            data, array = read_image(item.path, needed=needed)
        except ImageReadError as e:
            records[item.path] = {"type": "error", "stage": "read", "path": item.path, "reason": str(e)}
            continue
        loaded.append(LoadedImage(item, data, array))
    results = predict(loaded) if loaded else []
    if len(results) != len(loaded):
        raise RuntimeError(f"predictor returned {len(results)} results for {len(loaded)} images")
    for image, result in zip(loaded, results, strict=True):
        if isinstance(result, Exception):
            reason = f"prediction failed: {result}"
            records[image.item.path] = {
                "type": "error",
                "stage": "predict",
                "path": image.item.path,
                "reason": reason,
            }
        else:
            records[image.item.path] = _image_record(image, result, render)
    return [records[item.path] for item in items]
