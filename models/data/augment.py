"""Training augmentations: detectron2 transforms plus photometric ones for the image only.

The photometric transforms change pixel values but not geometry, so boxes, masks and
semantic labels pass through unchanged. Their randomness comes from numpy's global
generator, like detectron2's own augmentations, so seeding detectron2 (and its data
loader workers) makes them reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

# isort: split

import cv2
import numpy as np
from detectron2.config import CfgNode
from detectron2.data import transforms as T

__all__ = [
    "ColorJitter",
    "ColorJitterTransform",
    "GaussianNoise",
    "GaussianNoiseTransform",
    "build_augmentations",
]


class _PhotometricTransform(T.Transform):
    """Base of transforms that leave coordinates and label maps untouched."""

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> T.Transform:
        return T.NoOpTransform()


class ColorJitterTransform(_PhotometricTransform):
    """Scale brightness, contrast and saturation, then rotate hue, of an RGB/BGR uint8 image."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue_shift: float) -> None:
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = img.astype(np.float32) * self.brightness
        mean = out.mean()
        out = (out - mean) * self.contrast + mean
        gray = out.mean(axis=2, keepdims=True)
        out = (out - gray) * self.saturation + gray
        out = np.clip(out, 0, 255).astype(np.uint8)
        if self.hue_shift and out.ndim == 3 and out.shape[2] == 3:
            hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
            # OpenCV's 8-bit hue runs over [0, 180).
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + round(self.hue_shift * 180)) % 180).astype(
                np.uint8
            )
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        return out


class GaussianNoiseTransform(_PhotometricTransform):
    """Add zero-mean Gaussian noise of a fixed ``std`` drawn from a fixed ``seed``."""

    def __init__(self, std: float, seed: int) -> None:
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        noise = np.random.default_rng(self.seed).normal(0.0, self.std, img.shape)
        return np.clip(img.astype(np.float32) + noise, 0, 255).astype(img.dtype)


class ColorJitter(T.Augmentation):
    """Random colour jitter: factors drawn from ``1 ± strength``, hue shift from ``± strength / 4``."""

    def __init__(self, strength: float) -> None:
        super().__init__()
        if not 0 <= strength < 1:
            raise ValueError(f"color jitter strength must be in [0, 1), got {strength}")
        self.strength = strength

    def get_transform(self, image: np.ndarray) -> T.Transform:
        s = self.strength
        b, c, sat = (float(np.random.uniform(1 - s, 1 + s)) for _ in range(3))
        return ColorJitterTransform(b, c, sat, float(np.random.uniform(-s / 4, s / 4)))


class GaussianNoise(T.Augmentation):
    """Gaussian pixel noise with a standard deviation drawn from ``[0, std]``."""

    def __init__(self, std: float) -> None:
        super().__init__()
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        self.std = std

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return GaussianNoiseTransform(float(np.random.uniform(0, self.std)), int(np.random.randint(2**31)))


def _resize(cfg: CfgNode, scale_jitter: Sequence[float] | None) -> T.Augmentation:
    if not scale_jitter:
        return T.ResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    if len(scale_jitter) != 2 or not 0 < scale_jitter[0] <= scale_jitter[1]:
        raise ValueError(f"scale_jitter must be (min, max) with 0 < min <= max, got {tuple(scale_jitter)}")
    lo, hi = scale_jitter
    if hi <= 8:  # factors of the configured training size, not pixel sizes
        base = min(cfg.INPUT.MIN_SIZE_TRAIN)
        lo, hi = lo * base, hi * base
    max_size = max(
        cfg.INPUT.MAX_SIZE_TRAIN, int(np.ceil(hi * cfg.INPUT.MAX_SIZE_TRAIN / min(cfg.INPUT.MIN_SIZE_TRAIN)))
    )
    return T.ResizeShortestEdge((round(lo), round(hi)), max_size, sample_style="range")


def build_augmentations(
    cfg: CfgNode,
    *,
    hflip: bool = True,
    vflip: bool = False,
    scale_jitter: Sequence[float] | None = None,
    crop: float | None = None,
    rotation: float = 0.0,
    color_jitter: float = 0.0,
    noise_std: float = 0.0,
) -> list[T.Augmentation]:
    """The training augmentation list, in application order.

    Args:
        cfg: detectron2 config; its ``INPUT.MIN/MAX_SIZE_TRAIN`` set the resize.
        hflip: random horizontal flip.
        vflip: random vertical flip.
        scale_jitter: ``(min, max)`` short-edge range; values up to 8 are factors of
            ``INPUT.MIN_SIZE_TRAIN``, larger ones pixel sizes. None: the config's resize.
        crop: relative crop size in (0, 1], or None for no crop.
        rotation: maximum rotation in degrees (0 = off).
        color_jitter: colour jitter strength in [0, 1) (0 = off).
        noise_std: maximum Gaussian noise std in pixel values (0 = off).

    Raises:
        ValueError: an out-of-range setting.
    """
    augs: list[T.Augmentation] = [_resize(cfg, scale_jitter)]
    if crop is not None:
        if not 0 < crop <= 1:
            raise ValueError(f"crop must be a relative size in (0, 1], got {crop}")
        if crop < 1:
            augs.append(T.RandomCrop("relative_range", (crop, crop)))
    if rotation:
        if not 0 < rotation <= 180:
            raise ValueError(f"rotation must be in (0, 180] degrees, got {rotation}")
        augs.append(T.RandomRotation([-rotation, rotation], expand=False, sample_style="range"))
    if hflip:
        augs.append(T.RandomFlip(horizontal=True, vertical=False))
    if vflip:
        augs.append(T.RandomFlip(horizontal=False, vertical=True))
    if color_jitter:
        augs.append(ColorJitter(color_jitter))
    if noise_std:
        augs.append(GaussianNoise(noise_std))
    return augs
