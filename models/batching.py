"""Choosing a model's batch size by measuring it on the device it runs on.

The one meaning of ``max_batch_size: auto``, wherever a model runs: the server, annotate
(in-process and in each Ray actor) and ``cvserve eval --model`` all call
:func:`tune_batch_size` (or :func:`load_for_inference`) on the loaded model.


Batching pays on a GPU (one kernel launch for many images) and often costs on a CPU
(a batch of four R50-FPN images measured 2.54 s per image against 1.59 s alone). A
repository entry with ``max_batch_size: auto`` therefore runs a few forward passes at
load time, one batch size after another (1, 2, 4, ... up to the limit), and keeps the
size with the lowest time per image. A larger size must beat the best smaller one by
``tolerance`` to win, because every image of a batch waits for the whole batch: equal
throughput at a larger batch only adds latency. The search stops at the first size that
does not improve, so a CPU pays for two sizes, not all of them.

The measurement is injected (``measure(size) -> seconds per forward``), so the choice
is unit-tested with a given cost per image and no clock. A size that runs out of memory
measures as infinitely slow: the search ends there and the load goes on with the best
size that fitted.

On a GPU the search goes up to :data:`GPU_AUTO_BATCH_LIMIT` images (a CPU stops after a
size or two anyway). The images are busy scenes (:func:`busy_image`): many edges and
objects, so the detection heads and mask pasting cost what they cost on real photos, not
what they cost on an empty image.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cvserve.models.base import VisionModel
from cvserve.models.device import is_out_of_memory, release_device_memory
from cvserve.models.repository import ModelSpec
from cvserve.models.threads import release_team

__all__ = [
    "GPU_AUTO_BATCH_LIMIT",
    "BatchDecision",
    "auto_batch_limit",
    "busy_image",
    "candidate_sizes",
    "choose_batch_size",
    "forward_timer",
    "load_for_inference",
    "synthetic_image",
    "tune_batch_size",
]

logger = logging.getLogger(__name__)

# ``max_batch_size: auto`` on a GPU tries batch sizes up to this many images.
GPU_AUTO_BATCH_LIMIT = 32


@dataclass(frozen=True)
class BatchDecision:
    """The batch size chosen and the evidence.

    Attributes:
        size: the chosen ``max_batch_size``.
        per_image_s: measured seconds per image, by batch size, in the order tried.
    """

    size: int
    per_image_s: dict[int, float]

    def describe(self) -> str:
        """One log line: each size's time per image and the choice."""
        tried = ", ".join(f"{b}: {s * 1000:.1f} ms" for b, s in self.per_image_s.items())
        return f"max_batch_size {self.size} (per image at batch {tried})"


def candidate_sizes(limit: int) -> list[int]:
    """Powers of two up to ``limit``, and ``limit`` itself.

    Raises:
        ValueError: ``limit`` < 1.
    """
    if limit < 1:
        raise ValueError(f"batch size limit must be >= 1, got {limit}")
    sizes = [1]
    while sizes[-1] * 2 <= limit:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def choose_batch_size(
    measure: Callable[[int], float], sizes: Sequence[int], *, tolerance: float = 0.05
) -> BatchDecision:
    """Measure batch sizes in increasing order and keep the one with the cheapest image.

    Args:
        measure: ``measure(size)`` -> seconds for one forward pass of ``size`` images.
        sizes: increasing batch sizes to try, starting with the smallest acceptable.
        tolerance: a larger size must cost this fraction less per image than the best
            so far to replace it; the first size that does not stops the search.

    Returns:
        The decision, with the per-image time of every size tried.

    Raises:
        ValueError: no sizes, sizes not increasing, a non-positive measurement, or a
            tolerance outside [0, 1).
    """
    if not sizes or any(b <= a for a, b in itertools.pairwise(sizes)) or sizes[0] < 1:
        raise ValueError(f"sizes must be increasing integers >= 1, got {list(sizes)}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    per_image: dict[int, float] = {}
    best = sizes[0]
    for size in sizes:
        seconds = measure(size)
        if not seconds > 0:
            raise ValueError(f"measured {seconds!r} s for a batch of {size}; expected a positive time")
        per_image[size] = seconds / size
        if size == best:
            continue
        if per_image[size] < per_image[best] * (1 - tolerance):
            best = size
        else:
            break  # larger batches only grow slower once one did not help
    return BatchDecision(best, per_image)


def forward_timer(model: Any, image: Any, *, repeats: int = 3) -> Callable[[int], float]:
    """``measure(size)`` for :func:`choose_batch_size`: median seconds of ``model.forward`` on ``size`` copies.

    Args:
        model: a loaded :class:`~cvserve.models.base.VisionModel`.
        image: an ``(H, W, 3)`` RGB uint8 image of a realistic size.
        repeats: timed passes per size, after one untimed pass at that size.
    """
    sample = model.preprocess(image)

    def passes(size: int) -> list[float] | None:
        """The timed passes, or None when the batch does not fit in memory."""
        batch = [sample] * size
        try:
            model.forward(batch)  # first pass at a new shape allocates; not representative
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model.forward(batch)
                times.append(time.perf_counter() - start)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            return None  # the failed pass's tensors are freed with this frame
        return times

    def measure(size: int) -> float:
        times = passes(size)
        if times is None:
            release_device_memory()
            logger.info("a batch of %d ran out of memory while measuring: not a candidate", size)
            return math.inf
        return statistics.median(times)

    return measure


def auto_batch_limit(spec: ModelSpec, device: str) -> int:
    """The largest batch ``max_batch_size: auto`` tries on ``device``."""
    return (
        max(spec.max_batch_size, GPU_AUTO_BATCH_LIMIT) if device.startswith("cuda") else spec.max_batch_size
    )


def busy_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic cluttered scene: textured background, dozens of filled rectangles and discs.

    Detectors propose and keep many more boxes on it than on :func:`synthetic_image`, so a
    batch-size measurement pays for the detection heads and mask pasting as on real photos.
    """
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 96, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(48):
        colour = rng.integers(64, 256, 3, dtype=np.uint8)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        r = int(rng.integers(max(4, min(height, width) // 40), max(8, min(height, width) // 8)))
        if rng.random() < 0.5:
            image[max(0, cy - r) : cy + r, max(0, cx - r) : cx + r] = colour
        else:
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
    return image


def synthetic_image(height: int, width: int) -> np.ndarray:
    """A smooth RGB test pattern (colour ramps) for warm-up and batch-size measurement."""
    rows = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    image = np.stack(np.broadcast_arrays(cols, rows, cols[:, ::-1]), axis=-1)
    return np.ascontiguousarray(image)


def tune_batch_size(model: VisionModel, spec: ModelSpec) -> ModelSpec:
    """``spec`` with ``max_batch_size`` measured on ``model`` when the entry said ``auto``.

    A fixed ``max_batch_size`` is returned unchanged. Runs forward passes: call it on
    the thread that owns the model, after ``load()``.
    """
    if spec.batching != "auto":
        return spec
    measure = forward_timer(model, busy_image(480, 640))
    decision = choose_batch_size(measure, candidate_sizes(auto_batch_limit(spec, str(model.device))))
    if math.isinf(decision.per_image_s[decision.size]):
        raise MemoryError(f"model {spec.name!r}: a single image runs out of memory on {model.device}")
    logger.info("model %s on %s: batching auto chose %s", spec.name, model.device, decision.describe())
    return dataclasses.replace(spec, max_batch_size=decision.size)


def load_for_inference(spec: ModelSpec) -> tuple[VisionModel, ModelSpec]:
    """Build, load and mark ready the model of ``spec``, with its batch size resolved.

    What annotate and eval do with a repository entry in-process, the same way the
    server does at load time.

    Returns:
        The ready model and the spec with a measured ``max_batch_size`` if it was ``auto``.

    Raises:
        KeyError: no builder for the spec (see :func:`cvserve.models.build.build_model`).
        Exception: whatever loading the weights or config raises.
    """
    from cvserve.models.build import build_model

    model = build_model(spec)
    model.load()
    spec = tune_batch_size(model, spec)
    release_team()  # loading's OpenMP team would slow the passes of other threads (models.threads)
    model.mark_ready()
    return model, spec
