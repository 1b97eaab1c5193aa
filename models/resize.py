"""The test-time resize of the detectron2 adapters, safe for every image shape.

detectron2's ``ResizeShortestEdge`` scales the short side to ``short_edge`` and then,
when the long side exceeds ``max_size``, scales both down; for a very elongated image
(a 3000x1 line scan, a 1x12000 panorama strip) the short side rounds to 0 pixels and the
resize fails. :class:`InputResize` computes detectron2's size and keeps each side at least
1 pixel, so every image gets a network input: for every image detectron2 can resize the
size is detectron2's own, and so are the predictions.

With ``max_size`` bounded, an input has at most ``max_size ** 2`` pixels. A model
configured with no useful ``max_size`` could be asked for an input of billions of pixels
(a 1x3000 image at short side 800 is 800x2400000): ``max_pixels`` bounds the input, and
an image over it raises :class:`InputSizeError` naming the limit.
"""

from __future__ import annotations

import numpy as np
from detectron2.data import transforms as T

from cvserve.models.errors import InputSizeError

__all__ = ["DEFAULT_MAX_INPUT_PIXELS", "InputResize", "InputSizeError", "input_size"]

DEFAULT_MAX_INPUT_PIXELS = 4096 * 4096


def input_size(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """The network input size ``(h, w)`` of a ``height x width`` image.

    detectron2's ``ResizeShortestEdge.get_output_shape``, with each side at least 1 pixel.

    Raises:
        ValueError: a side or ``short_edge`` below 1.
    """
    if height < 1 or width < 1 or short_edge < 1:
        raise ValueError(f"sizes must be >= 1, got image {width}x{height}, short edge {short_edge}")
    new_h, new_w = T.ResizeShortestEdge.get_output_shape(height, width, short_edge, max_size)
    return max(1, new_h), max(1, new_w)


class InputResize:
    """Resizes ``(H, W, C)`` uint8 images to a model's test size (bilinear, as detectron2).

    Args:
        short_edge: target short side (``INPUT.MIN_SIZE_TEST``).
        max_size: most pixels on the long side (``INPUT.MAX_SIZE_TEST``).
        max_pixels: most pixels of a network input.
        model: the model's name, for error messages.

    Raises:
        ValueError: a size below 1.
    """

    def __init__(self, short_edge: int, max_size: int, max_pixels: int, model: str = "") -> None:
        for label, value in (("min_size_test", short_edge), ("max_size_test", max_size)):
            if value < 1:
                raise ValueError(f"model {model!r}: {label} must be >= 1, got {value}")
        if max_pixels < 1:
            raise ValueError(f"model {model!r}: max_input_pixels must be >= 1, got {max_pixels}")
        self.short_edge, self.max_size, self.max_pixels, self.model = short_edge, max_size, max_pixels, model

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The input size ``(h, w)`` for an image of ``height x width``.

        Raises:
            InputSizeError: the input would have more than ``max_pixels`` pixels.
        """
        new_h, new_w = input_size(height, width, self.short_edge, self.max_size)
        if new_h * new_w > self.max_pixels:
            raise InputSizeError(
                f"image {width}x{height} resizes to {new_w}x{new_h} = {new_h * new_w} pixels for model "
                f"{self.model!r} (min_size_test {self.short_edge}, max_size_test {self.max_size}), "
                f"more than its limit max_input_pixels = {self.max_pixels}"
            )
        return new_h, new_w

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """A resized copy of ``image``."""
        height, width = int(image.shape[0]), int(image.shape[1])
        new_h, new_w = self.output_size(height, width)
        return T.ResizeTransform(height, width, new_h, new_w).apply_image(image)
