"""The tensors a cvserve model takes and returns over the Open Inference Protocol.

One input, ``image``:
    * BYTES ``[1]`` -- one encoded image (JPEG, PNG, WebP, BMP, TIFF), or BYTES
      ``[B, 1]`` -- a batch of B encoded images;
    * UINT8 ``[H, W, 3]`` -- one raw RGB image, or UINT8 ``[B, H, W, 3]`` -- a batch.

An input with a leading batch dimension gets outputs with one too, as a Triton model
with ``max_batch_size > 0`` answers. Instance models return ``boxes`` FP32 ``[N, 4]``
(absolute XYXY pixels), ``scores`` FP32 ``[N]``, ``classes`` INT64 ``[N]``, ``masks``
BYTES ``[N]`` (the COCO RLE compressed ``counts`` string of each instance's mask,
ASCII, exactly as ``pycocotools.mask.encode`` writes it, for a mask of ``image_size``;
empty when the model has no masks or ``mask_format`` is ``none``), ``num_detections``
INT32 ``[1]`` and ``image_size`` INT32 ``[2]`` (height, width). Batched, they are
``[B, K, 4]``, ``[B, K]``, ... padded to the largest count K of the batch (boxes and
scores 0, classes -1, masks empty) with ``num_detections`` ``[B]`` telling how many rows
of each image are real -- the layout of TensorRT's EfficientNMS that Triton detection
clients expect. Semantic models return ``labels`` ``[H, W]`` (UINT8, or INT32 when the
model has more than 255 classes) and ``image_size``; batched ``[B, Hmax, Wmax]``, padded
with 255 (UINT8) or -1 (INT32) beyond each image's own ``image_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cvserve.errors import InvalidImageError
from cvserve.imaging import check_pixels
from cvserve.models.types import Prediction, Task

__all__ = [
    "INPUT_NAME",
    "ImageBatch",
    "TensorSpec",
    "output_specs",
    "output_tensors",
    "split_images",
]

INPUT_NAME = "image"
_UINT8_LABEL_PAD = 255


@dataclass(frozen=True)
class TensorSpec:
    """Name, datatype and shape (``-1`` = variable, leading batch dimension included)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ImageBatch:
    """The images of one request.

    Attributes:
        images: encoded images (``bytes``) or ``(H, W, 3)`` uint8 RGB arrays.
        batched: the input had a batch dimension, so the outputs get one too.
    """

    images: list[bytes] | list[np.ndarray]
    batched: bool


def input_spec() -> TensorSpec:
    """The ``image`` input as ModelMetadata reports it (the UINT8 form is accepted too)."""
    return TensorSpec(INPUT_NAME, "BYTES", (-1, 1))


def _label_datatype(num_classes: int) -> str:
    return "UINT8" if num_classes <= _UINT8_LABEL_PAD else "INT32"


def output_specs(task: Task, num_classes: int) -> list[TensorSpec]:
    """Every output of a model, in response order, with batched shapes."""
    if task is Task.SEMANTIC:
        return [
            TensorSpec("labels", _label_datatype(num_classes), (-1, -1, -1)),
            TensorSpec("image_size", "INT32", (-1, 2)),
        ]
    return [
        TensorSpec("boxes", "FP32", (-1, -1, 4)),
        TensorSpec("scores", "FP32", (-1, -1)),
        TensorSpec("classes", "INT64", (-1, -1)),
        TensorSpec("masks", "BYTES", (-1, -1)),
        TensorSpec("num_detections", "INT32", (-1,)),
        TensorSpec("image_size", "INT32", (-1, 2)),
    ]


def split_images(inputs: dict[str, np.ndarray], *, max_pixels: int, max_images: int) -> ImageBatch:
    """The images held by a request's inputs (see the module docstring for the forms).

    Args:
        inputs: the request's tensors by name.
        max_pixels: largest ``height * width`` of a raw image.
        max_images: most images in one request.

    Raises:
        InvalidImageError: no ``image`` input, another input, a wrong datatype/shape, or
            more than ``max_images`` images.
        ImageTooLargeError: a raw image over ``max_pixels``.
    """
    extra = sorted(set(inputs) - {INPUT_NAME})
    if extra or INPUT_NAME not in inputs:
        raise InvalidImageError(
            f"expected exactly one input named {INPUT_NAME!r}, got {sorted(inputs) or 'none'}"
        )
    array = inputs[INPUT_NAME]
    shape = list(array.shape)
    if array.ndim in (2, 4) and shape[0] > max_images:
        raise InvalidImageError(
            f"batch of {shape[0]} images is more than the {max_images} one request may hold"
        )
    if array.dtype == object:
        if shape == [1]:
            return ImageBatch([bytes(array[0])], batched=False)
        if len(shape) == 2 and shape[1] == 1 and shape[0] >= 1:
            return ImageBatch([bytes(item) for item in array[:, 0]], batched=True)
        raise InvalidImageError(
            f"BYTES input {INPUT_NAME!r} must have shape [1] (one image) or [B, 1] (a batch), got {shape}"
        )
    if array.dtype != np.uint8:
        raise InvalidImageError(
            f"input {INPUT_NAME!r} must be BYTES (encoded) or UINT8 (raw RGB), got {array.dtype}"
        )
    if array.ndim not in (3, 4) or shape[-1] != 3 or 0 in shape:
        raise InvalidImageError(
            f"UINT8 input {INPUT_NAME!r} must have shape [H, W, 3] or [B, H, W, 3] with no zero "
            f"dimension, got {shape}"
        )
    check_pixels(shape[-3], shape[-2], max_pixels)
    if array.ndim == 3:
        return ImageBatch([array], batched=False)
    return ImageBatch(list(array), batched=True)


def _instance_arrays(predictions: Sequence[Prediction], with_masks: bool) -> dict[str, np.ndarray]:
    count = len(predictions)
    k = max((len(p.instances) for p in predictions), default=0)
    boxes = np.zeros((count, k, 4), np.float32)
    scores = np.zeros((count, k), np.float32)
    classes = np.full((count, k), -1, np.int64)
    masks = np.full((count, k), b"", dtype=object)
    for i, prediction in enumerate(predictions):
        for j, inst in enumerate(prediction.instances):
            boxes[i, j] = inst.box
            scores[i, j] = inst.score
            classes[i, j] = inst.category_id
            if with_masks and inst.mask is not None:
                masks[i, j] = inst.mask.counts
    return {
        "boxes": boxes,
        "scores": scores,
        "classes": classes,
        "masks": masks,
        "num_detections": np.array([len(p.instances) for p in predictions], np.int32),
    }


def _semantic_arrays(predictions: Sequence[Prediction], num_classes: int) -> dict[str, np.ndarray]:
    dtype: np.dtype[np.integer] = np.dtype(np.uint8 if _label_datatype(num_classes) == "UINT8" else np.int32)
    pad = _UINT8_LABEL_PAD if dtype == np.uint8 else -1
    maps = []
    for prediction in predictions:
        if prediction.semantic is None:
            raise RuntimeError("a semantic model returned a prediction without a label map")
        maps.append(np.asarray(prediction.semantic.labels))
    height = max(m.shape[0] for m in maps)
    width = max(m.shape[1] for m in maps)
    labels = np.full((len(maps), height, width), pad, dtype)
    for i, m in enumerate(maps):
        labels[i, : m.shape[0], : m.shape[1]] = m
    return {"labels": labels}


def output_tensors(
    predictions: Sequence[Prediction],
    *,
    task: Task,
    num_classes: int,
    batched: bool,
    names: Sequence[str],
    with_masks: bool = True,
) -> list[tuple[str, np.ndarray]]:
    """The requested output arrays of a request's predictions, in ``names`` order.

    Args:
        predictions: one per image of the request, in order.
        task: the model's task.
        num_classes: the model's class count (chooses the label map datatype).
        batched: give every output a leading batch dimension.
        names: the outputs to return (validated against :func:`output_specs`).
        with_masks: fill ``masks`` (else every element is empty).
    """
    if task is Task.SEMANTIC:
        arrays = _semantic_arrays(predictions, num_classes)
    else:
        arrays = _instance_arrays(predictions, with_masks)
    arrays["image_size"] = np.array([p.image_size for p in predictions], np.int32).reshape(-1, 2)
    if not batched:
        arrays = {name: a[0] if name != "num_detections" else a for name, a in arrays.items()}
    return [(name, arrays[name]) for name in names]
