"""detectron2 ``Instances`` -> cvserve's plain :class:`~models.types.Prediction`."""

from __future__ import annotations

import models  # noqa: F401  (detectron2 compatibility layer first)

# isort: split

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.layers.mask_ops import _do_paste_mask
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from models.types import Instance, Mask, Prediction

__all__ = ["box_rle", "instances_to_cpu", "instances_to_prediction", "paste_rles", "rescale_and_encode"]


def box_rle(crop: np.ndarray, top: int, left: int, height: int, width: int) -> bytes:
    """COCO compressed RLE of a ``height x width`` mask that is zero outside ``crop``.

    ``crop`` is the bool block of the mask at rows ``top:top + h``, columns
    ``left:left + w``. The result is byte-identical to ``pycocotools.mask.encode`` of the
    full mask, but the work is proportional to the crop's columns, not the image.
    """
    h, w = crop.shape
    if h == 0 or w == 0 or not crop.any():
        return mask_util.frPyObjects({"size": [height, width], "counts": [height * width]}, height, width)[
            "counts"
        ]
    # The full columns left..left+w in column-major order: the only part that is not all zero.
    columns = np.zeros((w, height), np.int8)
    columns[:, top : top + h] = crop.T
    seq = columns.reshape(-1)
    start, end = left * height, (left + w) * height
    edges = np.flatnonzero(seq[1:] != seq[:-1]) + (1 + start)
    head = [start] if seq[0] else []  # a 1 right after the zeros before the block
    tail = [end] if seq[-1] and end < height * width else []
    bounds = np.concatenate(([0], head, edges, tail, [height * width]))
    counts = np.diff(bounds).tolist()
    return mask_util.frPyObjects({"size": [height, width], "counts": counts}, height, width)["counts"]


def paste_rles(probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> list[bytes]:
    """Paste each ``(M, M)`` mask probability map into its box and RLE-encode it, box by box.

    The same bilinear paste and 0.5 threshold as detectron2's ``paste_masks_in_image`` on
    the CPU (so the same pixels), without materialising N full-image masks.
    """
    rles = []
    for i in range(len(probs)):
        chunk, (rows, cols) = _do_paste_mask(probs[i : i + 1, None], boxes[i : i + 1], height, width)
        crop = (chunk[0] >= 0.5).numpy()
        rles.append(box_rle(crop, int(rows.start), int(cols.start), height, width))
    return rles


def rescale_and_encode(raw: Instances, height: int, width: int) -> Prediction:
    """Network-size CPU outputs -> :class:`Prediction` at ``height x width``.

    Equal to ``detector_postprocess`` (boxes rescaled and clipped, empty ones dropped,
    masks pasted at threshold 0.5) followed by :func:`instances_to_prediction`, but masks
    are pasted and encoded inside their boxes only.
    """
    fields = dict(raw.get_fields())
    probs = fields.pop("pred_masks", None)
    if probs is None or probs.ndim != 4:  # not (N, 1, M, M) probabilities: detectron2's own path
        return instances_to_prediction(detector_postprocess(raw, height, width), height, width)
    fields["pred_boxes"] = Boxes(raw.pred_boxes.tensor.clone())  # detector_postprocess scales in place
    boxes_only = Instances(raw.image_size, **fields, _index=torch.arange(len(probs)))
    result = detector_postprocess(boxes_only, height, width)
    order = torch.argsort(result.scores, descending=True, stable=True)
    result = result[order]
    rles = paste_rles(probs[result._index, 0], result.pred_boxes.tensor, height, width)
    masks: list[Mask | None] = [Mask((height, width), r) for r in rles]
    return _prediction(result.pred_boxes.tensor, result.scores, result.pred_classes, masks, height, width)


def instances_to_prediction(raw: Instances, height: int, width: int) -> Prediction:
    """Instances in image coordinates -> :class:`Prediction`, sorted by descending score."""
    order = torch.argsort(raw.scores, descending=True, stable=True)
    masks: list[Mask | None] = [None] * len(order)
    if raw.has("pred_masks") and len(order):
        # Encode in the stored order (no copy of the N full masks) and sort the small results.
        array = raw.pred_masks.numpy()
        array = array.view(np.uint8) if array.dtype == np.bool_ else array.astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(array.transpose(1, 2, 0)))
        masks = [Mask((height, width), rles[i]["counts"]) for i in order.tolist()]
    boxes = raw.pred_boxes.tensor[order]
    return _prediction(boxes, raw.scores[order], raw.pred_classes[order], masks, height, width)


def _prediction(
    boxes_t: torch.Tensor,
    scores_t: torch.Tensor,
    classes_t: torch.Tensor,
    masks: list[Mask | None],
    height: int,
    width: int,
) -> Prediction:
    """A :class:`Prediction` from per-instance fields already in score order."""
    boxes, scores, classes = boxes_t.tolist(), scores_t.tolist(), classes_t.tolist()
    instances = tuple(
        Instance(tuple(float(v) for v in b), int(c), float(s), m)  # type: ignore[arg-type]
        for b, c, s, m in zip(boxes, classes, scores, masks, strict=True)
    )
    return Prediction(image_size=(height, width), instances=instances)


def instances_to_cpu(instances: Instances) -> Instances:
    """A CPU copy in fp32 (autocast may have produced half-precision scores and masks)."""
    out = Instances(instances.image_size)
    for name, value in instances.get_fields().items():
        if isinstance(value, torch.Tensor):
            value = value.to("cpu", copy=True)
            value = value.float() if value.is_floating_point() else value
        elif isinstance(value, Boxes):
            value = Boxes(value.tensor.to("cpu", copy=True).float())
        out.set(name, value)
    return out
