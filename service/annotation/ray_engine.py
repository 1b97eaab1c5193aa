"""Batch annotation on Ray Data: a dataset of image paths streamed through a pool of model actors.

Each actor builds and loads the model once, then reads, decodes and predicts the
batches it is given (writing label maps and overlays itself, so input and output
folders must be shared with the workers, as the inputs already are). Records stream
back to the driver as batches complete; the driver alone writes the journal, so resume
works exactly as with the in-process engine. Ray is an optional extra (``cvserve[ray]``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from cvserve.annotation.predictors import LocalPredictor, ModelInfo, Predictor
from cvserve.annotation.worker import RenderOptions, WorkItem, process_batch
from cvserve.models.repository import ModelSpec

__all__ = ["RAY_INSTALL_HINT", "AnnotateActor", "RayPredictor", "RayUnavailableError", "import_ray"]

logger = logging.getLogger(__name__)

RAY_INSTALL_HINT = "pip install 'cvserve[ray]'"


class RayUnavailableError(ImportError):
    """Ray Data is not installed."""


def import_ray() -> Any:
    """Import ``ray`` with Ray Data, or explain how to install it.

    Raises:
        RayUnavailableError: Ray or Ray Data is missing; the message has the install hint.
    """
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise RayUnavailableError(
            f"the Ray engine needs Ray Data, install it with: {RAY_INSTALL_HINT} ({e})"
        ) from None
    return ray


def _model_info(spec: ModelSpec) -> ModelInfo:
    from cvserve.models.build import build_model

    # Constructed, and loaded only when the class names come from the checkpoint; on the
    # CPU, so the driver never holds a GPU the actors need.
    model = build_model(dataclasses.replace(spec, device="cpu"))
    if not model.class_names:
        model.load()
    return ModelInfo(spec.name, model.task, tuple(model.class_names))


class AnnotateActor:
    """The ``map_batches`` callable class: one loaded model per actor."""

    def __init__(self, spec: ModelSpec, render: RenderOptions) -> None:
        from cvserve.models.batching import load_for_inference

        model, spec = load_for_inference(spec)
        self._predictor = LocalPredictor(model, concurrency=1, max_batch_size=spec.max_batch_size)
        self._render = render

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [WorkItem(str(p), str(r)) for p, r in zip(batch["path"], batch["rel"], strict=True)]
        records = process_batch(items, self._predictor.predict, self._render)
        # JSON strings keep records schema-free across Arrow blocks.
        return {"record": np.array([json.dumps(r, separators=(",", ":")) for r in records], dtype=object)}


class RayPredictor(Predictor):
    """Runs annotation batches on a Ray cluster.

    Args:
        spec: the model to run (every actor builds it from this spec).
        address: Ray cluster address (``auto``, ``ray://host:10001``); None starts a
            local Ray, unless Ray is already initialised in this process.
        num_actors: size of the actor pool; default one per GPU group when the cluster
            has GPUs, else one per two CPUs (at least one).
        gpus_per_actor: GPUs reserved per actor; default 1 when the cluster has GPUs, else 0.
        init_kwargs: extra ``ray.init`` arguments when this predictor starts Ray.

    Raises:
        RayUnavailableError: Ray Data is not installed.
        ValueError: ``num_actors`` < 1 or ``gpus_per_actor`` < 0.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        address: str | None = None,
        num_actors: int | None = None,
        gpus_per_actor: float | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if num_actors is not None and num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        if gpus_per_actor is not None and gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0, got {gpus_per_actor}")
        self._ray = import_ray()
        self._owns_ray = not self._ray.is_initialized()
        if self._owns_ray:
            self._ray.init(address=address, **(init_kwargs or {"include_dashboard": False}))
        self.spec = spec
        self.info = _model_info(spec)
        resources = self._ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        self.gpus_per_actor = float(gpus_per_actor) if gpus_per_actor is not None else (1.0 if gpus else 0.0)
        if num_actors is None:
            per_gpu = int(gpus // self.gpus_per_actor) if self.gpus_per_actor else 0
            num_actors = max(1, per_gpu if self.gpus_per_actor else int(resources.get("CPU", 1)) // 2)
        self.num_actors = num_actors
        logger.info("Ray: %d actor(s), %.2g GPU(s) each", self.num_actors, self.gpus_per_actor)

    def map_batches(
        self, batches: Iterable[Sequence[WorkItem]], render: RenderOptions
    ) -> Iterator[list[dict[str, Any]]]:
        chunks = list(batches)
        if not chunks:
            return
        rows = [{"path": item.path, "rel": item.rel} for chunk in chunks for item in chunk]
        ray_data = self._ray.data
        ctx = ray_data.DataContext.get_current()
        ctx.execution_options.preserve_order = False  # consume batches as they complete
        ctx.enable_progress_bars = False  # the caller shows one bar for the whole job
        gpu_args = {"num_gpus": self.gpus_per_actor} if self.gpus_per_actor else {}
        dataset = ray_data.from_items(rows).map_batches(
            AnnotateActor,
            fn_constructor_kwargs={"spec": self.spec, "render": render},
            batch_size=max(len(c) for c in chunks),
            batch_format="numpy",
            compute=ray_data.ActorPoolStrategy(size=self.num_actors),
            **gpu_args,
        )
        for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield [json.loads(s) for s in out["record"]]

    def close(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
