"""detectron2 ``Instances`` -> cvserve's plain :class:`~cvserve.models.types.Prediction`."""

from __future__ import annotations

# isort: split

import itertools

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from cvserve.models.instance.paste import paste_rles
from cvserve.models.types import Instance, Mask, Prediction

__all__ = [
    "block_rles",
    "box_rle",
    "instances_to_cpu",
    "instances_to_prediction",
    "paste_rles",
    "rescale_and_encode",
]


def block_rles(
    masks: np.ndarray, tops: np.ndarray, lefts: np.ndarray, height: int, width: int
) -> list[bytes]:
    """COCO compressed RLEs of ``height x width`` masks, each zero outside a block.

    Args:
        masks: ``(n, rows, cols)`` bool; mask ``i`` is ``masks[i]`` placed with its top-left
            corner at row ``tops[i]``, column ``lefts[i]`` (rows and columns past the image
            edge must be zero).
        tops, lefts: ``(n,)`` integer block positions.
        height, width: the image size.

    Returns:
        Byte-identical to ``pycocotools.mask.encode`` of each full mask, with work
        proportional to the blocks, not the image: a transition of the column-major full
        mask can only happen inside a block's columns, so it is found there (all masks in
        one pass) and its index in the full mask computed.
    """
    n, rows, cols = masks.shape
    total = height * width
    if n == 0:
        return []
    # Each block column with a zero row above and below: every run of ones starts and ends
    # inside, and the zeros around the block in the image column stand for themselves.
    padded = np.zeros((n, cols, rows + 2), np.int8)
    padded[:, :, 1:-1] = masks.transpose(0, 2, 1)
    # One flat pass over all masks: each ends and starts on a padding zero, so no
    # transition crosses from one mask into the next.
    flat = padded.reshape(-1)
    which, k = np.divmod(np.flatnonzero(flat[1:] != flat[:-1]) + 1, cols * (rows + 2))
    column, row = np.divmod(k, rows + 2)
    edges = (
        (np.asarray(lefts, np.int64)[which] + column) * height + np.asarray(tops, np.int64)[which] + row - 1
    )
    # A run of ones ending at the image's last row and one starting at the next column's
    # first row are one run in the image: their two transitions share an index; drop both.
    # A transition at the very end of the image is no transition.
    same = np.zeros(len(edges), bool)
    if len(edges) > 1:
        pair = (edges[1:] == edges[:-1]) & (which[1:] == which[:-1])
        same[1:] |= pair
        same[:-1] |= pair
    keep = ~same & (edges < total)
    which, edges = which[keep], edges[keep]
    bounds = np.searchsorted(which, np.arange(n + 1))
    objs = [
        {"size": [height, width], "counts": np.diff(np.concatenate(([0], edges[a:b], [total]))).tolist()}
        for a, b in itertools.pairwise(bounds.tolist())
    ]
    return [r["counts"] for r in mask_util.frPyObjects(objs, height, width)]


def box_rle(crop: np.ndarray, top: int, left: int, height: int, width: int) -> bytes:
    """COCO compressed RLE of a ``height x width`` mask that is zero outside ``crop``.

    ``crop`` is the bool block of the mask at rows ``top:top + h``, columns
    ``left:left + w``; see :func:`block_rles`.
    """
    return block_rles(crop[None], np.array([top]), np.array([left]), height, width)[0]


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
