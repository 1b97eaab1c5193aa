"""detectron2 ``Instances`` -> cvserve's plain :class:`~models.types.Prediction`."""

from __future__ import annotations

import models  # noqa: F401  (detectron2 compatibility layer first)

# isort: split

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import Boxes, Instances

from models.types import Instance, Mask, Prediction

__all__ = ["instances_to_cpu", "instances_to_prediction"]


def instances_to_prediction(raw: Instances, height: int, width: int) -> Prediction:
    """Instances in image coordinates -> :class:`Prediction`, sorted by descending score."""
    order = torch.argsort(raw.scores, descending=True, stable=True)
    boxes = raw.pred_boxes.tensor[order].tolist()
    scores = raw.scores[order].tolist()
    classes = raw.pred_classes[order].tolist()
    masks: list[Mask | None] = [None] * len(order)
    if raw.has("pred_masks") and len(order):
        array = raw.pred_masks[order].numpy().astype(np.uint8)
        rles = mask_util.encode(np.asfortranarray(array.transpose(1, 2, 0)))
        masks = [Mask((height, width), r["counts"]) for r in rles]
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
