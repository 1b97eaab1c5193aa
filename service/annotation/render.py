"""Draw predictions onto images for visual inspection."""

from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_util

from models.types import Prediction

__all__ = ["color_for", "draw_overlay"]

_MASK_ALPHA = 0.45


def color_for(label: int) -> tuple[int, int, int]:
    """A distinct, stable BGR colour per label (golden-ratio hue steps)."""
    hue = int((label * 0.618033988749895 % 1.0) * 180)
    hsv = np.array([[[hue, 200, 255]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _blend(canvas: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> None:
    canvas[mask] = (canvas[mask] * (1 - _MASK_ALPHA) + np.array(color) * _MASK_ALPHA).astype(np.uint8)


def _caption(canvas: np.ndarray, text: str, x: int, y: int, color: tuple[int, int, int]) -> None:
    scale = max(0.3, min(canvas.shape[:2]) / 800)
    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    y = max(y, h + base)
    cv2.rectangle(canvas, (x, y - h - base), (x + w, y), color, -1)
    cv2.putText(canvas, text, (x, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)


def draw_overlay(image: np.ndarray, pred: Prediction, class_names: tuple[str, ...]) -> np.ndarray:
    """Draw masks, boxes and captions (or a tinted label map) on a copy of an image.

    Args:
        image: ``(H, W, 3)`` RGB uint8.
        pred: the prediction for that image.
        class_names: label names, index = category / label.

    Returns:
        The drawing as BGR uint8, ready for ``cv2.imwrite``.
    """
    canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)

    def name(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    if pred.semantic is not None:
        labels = np.asarray(pred.semantic.labels)
        for value in np.unique(labels):
            _blend(canvas, labels == value, color_for(int(value)))
        return canvas
    for inst in reversed(pred.instances):  # highest score drawn last, on top
        color = color_for(inst.category_id)
        if inst.mask is not None:
            rle = {"size": list(inst.mask.size), "counts": inst.mask.counts}
            _blend(canvas, mask_util.decode(rle).astype(bool), color)
        x0, y0, x1, y1 = (round(v) for v in inst.box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, max(1, min(canvas.shape[:2]) // 300))
        _caption(canvas, f"{name(inst.category_id)} {inst.score:.2f}", x0, y0, color)
    return canvas
