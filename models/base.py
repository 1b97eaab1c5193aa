"""The transport-neutral model interface every served model implements."""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from cvserve.models.types import Prediction, ScaledImage, Task, pixels_and_size


class VisionModel(abc.ABC):
    """A vision model: RGB uint8 images in, :class:`Prediction` out.

    The work of one request is split in three so a server can put each part where it
    belongs: ``preprocess`` and ``postprocess`` are thread-safe and run in a worker
    pool, ``forward`` runs a whole batch on the model's device, one batch at a time.
    ``predict_batch`` composes the three for in-process callers.

    Attributes:
        name: the model's name in its repository.
        task: what it predicts.
        class_names: label names, index = category id / label value.
        device: the torch device string it runs on (``cpu``, ``cuda:0``).
        precision: the precision its forward runs at: ``fp32``, ``fp16`` or ``bf16``
            (see :mod:`cvserve.models.precision`).
        shares_cpu_threads: ``forward`` runs under :func:`cvserve.models.threads.forward_threads`,
            so passes running at once on a CPU share its cores instead of each taking all
            of them. ``instances: auto`` gives such a model one instance per core (up to
            4) on a CPU, and any other model one.
    """

    name: str
    task: Task
    class_names: tuple[str, ...]
    device: str = "cpu"
    precision: str = "fp32"
    shares_cpu_threads: bool = False

    def __init__(self) -> None:
        self._ready = threading.Event()

    @property
    def ready(self) -> bool:
        """True once ``load`` (and warm-up, where the caller does one) completed."""
        return self._ready.is_set()

    def mark_ready(self, ready: bool = True) -> None:
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    @abc.abstractmethod
    def load(self) -> None:
        """Build the network and load its weights. Raises on failure."""

    @abc.abstractmethod
    def preprocess(self, image: np.ndarray) -> Any:
        """Turn one ``(H, W, 3)`` RGB uint8 image into the model's input. Thread-safe."""

    def prepare(self, image: np.ndarray, *, masks: bool = True) -> Any:
        """:meth:`preprocess` for one request. Thread-safe.

        Args:
            image: ``(H, W, 3)`` RGB uint8.
            masks: False when the request wants no instance masks; a model that can
                skip computing them (its mask head, pasting, encoding) does. The
                default ignores it and calls :meth:`preprocess`.
        """
        return self.preprocess(image)

    @abc.abstractmethod
    def forward(self, inputs: Sequence[Any]) -> list[Any]:
        """Run the network on a batch of preprocessed inputs; one raw output per input."""

    @abc.abstractmethod
    def postprocess(self, raw: Any, image_size: tuple[int, int]) -> Prediction:
        """Turn one raw output into a :class:`Prediction` in original image coordinates. Thread-safe."""

    def predict_batch(
        self, images: Sequence[np.ndarray | ScaledImage], *, masks: bool = True
    ) -> list[Prediction]:
        """Predict a batch of RGB uint8 images in-process.

        Args:
            images: ``(H, W, 3)`` uint8 RGB arrays, sizes may differ; or images decoded at a
                reduced scale, whose predictions are in their own size's pixels.
            masks: False to skip instance masks (see :meth:`prepare`).

        Returns:
            One :class:`Prediction` per image, in order.
        """
        if not images:
            return []
        try:
            split = [pixels_and_size(img) for img in images]
            raws = self.forward([self.prepare(pixels, masks=masks) for pixels, _ in split])
            if len(raws) != len(images):
                raise RuntimeError(
                    f"{self.name}: forward returned {len(raws)} outputs for {len(images)} inputs"
                )
            return [self.postprocess(r, size) for r, (_, size) in zip(raws, split, strict=True)]
        finally:
            from cvserve.models.threads import release_team  # torch: not for importing this module

            release_team()  # pre- and postprocessing may have made one (models.threads)

    def input_size(self, height: int, width: int) -> tuple[int, int] | None:
        """The size ``(h, w)`` :meth:`preprocess` resizes a ``height x width`` image to.

        None when the model does not resize to a size known in advance, is not loaded, or
        would refuse the image. Adapters resizing with :class:`cvserve.models.resize.InputResize`
        keep it in ``_resize`` and get this for free.
        """
        resize = getattr(self, "_resize", None)
        if resize is None:
            return None
        from cvserve.models.errors import InputSizeError

        try:
            return resize.output_size(height, width)  # type: ignore[no-any-return]
        except InputSizeError:
            return None

    def describe(self) -> dict[str, Any]:
        """Static facts about the model for metadata endpoints."""
        return {
            "name": self.name,
            "task": self.task.value,
            "class_names": list(self.class_names),
            "device": self.device,
            "precision": self.precision,
        }
