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

__all__ = [
    "RAY_INSTALL_HINT",
    "ActorPlacement",
    "AnnotateActor",
    "RayPredictor",
    "RayUnavailableError",
    "import_ray",
    "plan_actors",
]

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


@dataclasses.dataclass(frozen=True)
class ActorPlacement:
    """How the actor pool sits on the cluster.

    Attributes:
        num_actors: size of the actor pool.
        gpus_per_actor: GPUs Ray reserves for each actor (0: none; fractions share a GPU).
        device: the device each actor's model uses. Ray makes an actor see only the GPUs
            reserved for it, numbered from 0, so every CUDA model runs on ``cuda``.
    """

    num_actors: int
    gpus_per_actor: float
    device: str


def plan_actors(
    device: str,
    cluster_gpus: float,
    cluster_cpus: float,
    num_actors: int | None,
    gpus_per_actor: float | None,
) -> ActorPlacement:
    """Place the actors of a model whose repository entry says ``device``.

    ``cpu`` reserves no GPU; ``auto`` one GPU per actor when the cluster has GPUs, else
    none; ``cuda`` / ``cuda:N`` one GPU per actor (the index is Ray's to choose). By
    default one actor per GPU share, or one per two CPUs without GPUs.

    Raises:
        ValueError: GPUs asked of a ``cpu`` model, a CUDA model on a cluster without GPUs,
            or more GPUs per actor than the cluster has.
    """
    if device == "cpu" and gpus_per_actor:
        raise ValueError(f"device cpu uses no GPU, but {gpus_per_actor:g} GPU(s) per actor were asked for")
    if device.startswith("cuda") and cluster_gpus <= 0:
        raise ValueError(f"device {device} needs GPUs, and the Ray cluster has none")
    if gpus_per_actor is None:
        gpus_per_actor = 0.0 if device == "cpu" or cluster_gpus <= 0 else 1.0
    if gpus_per_actor > cluster_gpus:
        raise ValueError(
            f"{gpus_per_actor:g} GPU(s) per actor asked for; the Ray cluster has {cluster_gpus:g}"
        )
    if device.startswith("cuda") and gpus_per_actor == 0:
        raise ValueError(f"device {device} needs a GPU per actor; gpus_per_actor is 0")
    if num_actors is None:
        shares = int(cluster_gpus // gpus_per_actor) if gpus_per_actor else int(cluster_cpus) // 2
        num_actors = max(1, shares)
    return ActorPlacement(num_actors, float(gpus_per_actor), "cuda" if gpus_per_actor else "cpu")


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

    def __init__(self, spec: ModelSpec, render: RenderOptions, scaled_decode: bool = False) -> None:
        from cvserve.models.batching import load_for_inference

        model, spec = load_for_inference(spec)
        self._predictor = LocalPredictor(model, 1, spec.max_batch_size, scaled_decode)
        self._render = render

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [WorkItem(str(p), str(r)) for p, r in zip(batch["path"], batch["rel"], strict=True)]
        records = process_batch(items, self._predictor.predict, self._render, self._predictor.decode_hint)
        # JSON strings keep records schema-free across Arrow blocks.
        return {"record": np.array([json.dumps(r, separators=(",", ":")) for r in records], dtype=object)}


class RayPredictor(Predictor):
    """Runs annotation batches on a Ray cluster.

    Args:
        spec: the model to run (every actor builds it from this spec).
        address: Ray cluster address (``auto``, ``ray://host:10001``); None starts a
            local Ray, unless Ray is already initialised in this process.
        num_actors: size of the actor pool; default one per GPU group when the actors
            use GPUs, else one per two CPUs (at least one).
        gpus_per_actor: GPUs reserved per actor; default 0 for ``device: cpu``, else 1
            when the cluster has GPUs (see :func:`plan_actors`).
        init_kwargs: extra ``ray.init`` arguments when this predictor starts Ray.
        scaled_decode: actors decode a JPEG larger than the model's input at a reduced scale
            (see :class:`~cvserve.annotation.predictors.LocalPredictor`).

    Raises:
        RayUnavailableError: Ray Data is not installed.
        ValueError: ``num_actors`` < 1, ``gpus_per_actor`` < 0, or a placement the
            cluster cannot give (:func:`plan_actors`).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        address: str | None = None,
        num_actors: int | None = None,
        gpus_per_actor: float | None = None,
        init_kwargs: dict[str, Any] | None = None,
        scaled_decode: bool = False,
    ) -> None:
        self.scaled_decode = scaled_decode
        if num_actors is not None and num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {num_actors}")
        if gpus_per_actor is not None and gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0, got {gpus_per_actor}")
        self._ray = import_ray()
        self._owns_ray = not self._ray.is_initialized()
        if self._owns_ray:
            self._ray.init(address=address, **(init_kwargs or {"include_dashboard": False}))
        try:
            resources = self._ray.cluster_resources()
            placement = plan_actors(
                spec.device,
                float(resources.get("GPU", 0)),
                float(resources.get("CPU", 1)),
                num_actors,
                gpus_per_actor,
            )
            self.info = _model_info(spec)
        except BaseException:
            self.close()
            raise
        self.spec = dataclasses.replace(spec, device=placement.device)  # what each actor builds
        self.num_actors, self.gpus_per_actor = placement.num_actors, placement.gpus_per_actor
        logger.info(
            "Ray: %d actor(s), %.2g GPU(s) each, model on %s",
            self.num_actors,
            self.gpus_per_actor,
            placement.device,
        )

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
            fn_constructor_kwargs={"spec": self.spec, "render": render, "scaled_decode": self.scaled_decode},
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
