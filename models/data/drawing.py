"""Drawing primitives of the synthetic dataset: shape masks, textures and backgrounds.

Every function takes an explicit ``numpy.random.Generator`` so an image depends only
on its own seed. Masks are drawn without anti-aliasing: the mask is the ground truth
and the image is composited through it, so pixels and labels always agree.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["CATEGORIES", "draw_shape", "random_background", "random_colour", "random_texture"]

# Told apart by form only: every category draws from the same colours and textures.
CATEGORIES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")


def _polygon(
    center: tuple[float, float], radii: np.ndarray, angles: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    cx, cy = center
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    mask = np.zeros(shape, np.uint8)
    # Fixed-point coordinates (shift=4) keep small shapes from snapping to the pixel grid.
    cv2.fillPoly(mask, [np.round(pts * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask


def draw_shape(
    category: str,
    center: tuple[float, float],
    radius: float,
    shape: tuple[int, int],
    rng: np.random.Generator,
) -> np.ndarray:
    """Binary ``(H, W)`` uint8 mask of one shape.

    Args:
        category: one of :data:`CATEGORIES`.
        center: ``(x, y)`` in pixels.
        radius: circumradius in pixels.
        shape: ``(height, width)`` of the image.
        rng: source of the rotation and proportions.

    Raises:
        ValueError: unknown category.
    """
    rot = rng.uniform(0, 2 * math.pi)
    if category == "circle":
        return _polygon(center, np.full(64, radius), np.linspace(0, 2 * math.pi, 64, endpoint=False), shape)
    if category == "ring":
        outer = _polygon(center, np.full(64, radius), np.linspace(0, 2 * math.pi, 64, endpoint=False), shape)
        inner_r = radius * rng.uniform(0.45, 0.62)
        inner = _polygon(center, np.full(64, inner_r), np.linspace(0, 2 * math.pi, 64, endpoint=False), shape)
        return outer & (1 - inner)
    if category == "square":
        angles = rot + np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        return _polygon(center, np.full(4, radius), angles, shape)
    if category == "triangle":
        angles = rot + np.array([0.0, 2 / 3, 4 / 3]) * math.pi + rng.uniform(-0.12, 0.12, 3)
        return _polygon(center, np.full(3, radius), angles, shape)
    if category == "star":
        ratio = float(rng.uniform(0.38, 0.5))
        radii = np.tile([radius, radius * ratio], 5)
        return _polygon(center, radii, rot + np.arange(10) * math.pi / 5, shape)
    raise ValueError(f"unknown shape category {category!r}; expected one of {', '.join(CATEGORIES)}")


def random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour as float32 ``(3,)``."""
    return rng.uniform(0, 255, 3).astype(np.float32)


def random_texture(colour: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A ``(H, W, 3)`` float32 fill: solid, stripes, checkerboard or speckle around ``colour``."""
    h, w = shape
    kind = rng.integers(0, 4)
    base = np.broadcast_to(colour, (h, w, 3)).astype(np.float32)
    if kind == 0:
        return base.copy()
    if kind == 3:
        return np.clip(base + rng.normal(0, 22, (h, w, 1)).astype(np.float32), 0, 255)
    other = np.clip(colour + rng.choice([-1, 1], 3) * rng.uniform(35, 80, 3), 0, 255).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(4, 10)
    if kind == 1:
        theta = rng.uniform(0, math.pi)
        phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
        sel = (np.floor(phase) % 2).astype(bool)
    else:
        sel = ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(bool)
    out = base.copy()
    out[sel] = other
    return out


def _gradient(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    c0, c1 = random_colour(rng), random_colour(rng)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    return c0 + (c1 - c0) * t[..., None]


def _low_freq_noise(shape: tuple[int, int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    h, w = shape
    grid = rng.normal(0, amplitude, (rng.integers(3, 9), rng.integers(3, 9), 3)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _clutter(img: np.ndarray, rng: np.random.Generator) -> None:
    """Distractors that are not objects: thin lines, arcs and small blobs."""
    h, w = img.shape[:2]
    for _ in range(rng.integers(0, 5)):
        colour = tuple(float(c) for c in random_colour(rng))
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        kind = rng.integers(0, 3)
        if kind == 0:
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p0, p1, colour, int(rng.integers(1, 3)))
        elif kind == 1:
            axes = (int(rng.integers(8, 40)), int(rng.integers(8, 40)))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(img, p0, axes, 0, start, start + float(rng.uniform(30, 150)), colour, 1)
        else:
            cv2.circle(img, p0, int(rng.integers(1, 4)), colour, -1)


def random_background(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A ``(H, W, 3)`` float32 background: gradient or flat, low-frequency noise and clutter."""
    if rng.random() < 0.7:
        img = _gradient(shape, rng)
    else:
        img = np.broadcast_to(random_colour(rng), (*shape, 3)).astype(np.float32).copy()
    if rng.random() < 0.6:
        img = img + _low_freq_noise(shape, rng, float(rng.uniform(10, 35)))
    img = np.ascontiguousarray(np.clip(img, 0, 255), dtype=np.float32)
    _clutter(img, rng)
    return img
