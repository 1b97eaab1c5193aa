"""One model of the repository as the data plane serves it: load, warm-up, batcher, statistics.

A :class:`ServedModel` owns everything of a single model version: its state, its own
thread (the model runs only there), its :class:`~cvserve.dataplane.batcher.Batcher` and its
:class:`ModelStats`. :class:`~cvserve.dataplane.plane.DataPlane` holds one per served version of
each repository entry (see :mod:`cvserve.dataplane.versions`) and adds what spans models:
lookup, readiness, draining and the shared CPU pool.

Requests hold the model they run on (:meth:`ServedModel.hold`) from lookup to their last
stage, so a model replaced by a reload is freed only once they are done
(:meth:`ServedModel.wait_idle`).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from cvserve.config import ServerConfig
from cvserve.dataplane.batcher import Batcher, BatchReport, ItemTiming
from cvserve.dataplane.model_state import ModelState, ModelStats, ModelStatus, Outcome
from cvserve.dataplane.replicas import ReplicaSet, build_replicas
from cvserve.errors import InvalidImageError, ModelNotReadyError
from cvserve.metrics import Metrics
from cvserve.models.base import VisionModel
from cvserve.models.batching import busy_image, tune_batch_size
from cvserve.models.errors import InputSizeError
from cvserve.models.repository import ModelSpec
from cvserve.models.types import ScaledImage, pixels_and_size

__all__ = ["ServedModel", "run_in_pool"]

logger = logging.getLogger(__name__)
_R = TypeVar("_R")


async def run_in_pool(pool: Executor, fn: Callable[..., _R], *args: Any) -> _R:
    """Run ``fn(*args)`` in ``pool``, carrying the caller's context (request id)."""
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(ctx.run, fn, *args))


class ServedModel:
    """The serving state of one model.

    Args:
        spec: the model's repository entry.
        config: server settings (warm-up).
        metrics: Prometheus metrics to feed, if any.
        builder: builds an unloaded model from a spec.
        pool: the shared pool for pre- / post-processing.
        notify: awaited after every change of state.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        config: ServerConfig,
        metrics: Metrics | None,
        builder: Callable[[ModelSpec], VisionModel],
        pool: Executor,
        notify: Callable[[], Awaitable[None]],
    ) -> None:
        self.spec = spec
        self.declared = spec  # as the repository gave it; ``spec`` gets tuned values at load
        self.state: str = ModelState.LOADING
        self.error = ""
        self.model: VisionModel | None = None  # the first copy (pre- / post-processing)
        self.replicas: ReplicaSet | None = None
        self.batcher: Batcher[Any, Any] | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.stats = ModelStats()
        self.loading: asyncio.Task[None] | None = None
        self._config = config
        self._metrics = metrics
        self._builder = builder
        self._pool = pool
        self._notify = notify
        self._holders = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def labels(self) -> tuple[str, str]:
        """The model's metric labels: name and version (Triton's ``model`` / ``version``)."""
        return self.spec.name, self.spec.version

    def hold(self) -> None:
        """Count one request running on this model (pair with :meth:`release`)."""
        self._holders += 1
        self._idle.clear()

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request holds this model."""
        await self._idle.wait()

    def status(self) -> ModelStatus:
        model = self.model
        return ModelStatus(
            spec=self.spec,
            state=self.state,
            error=self.error,
            class_names=tuple(model.class_names) if model is not None else (),
            device=",".join(self.replicas.devices) if self.replicas is not None else "",
            precision=str(getattr(model, "precision", "")) if model is not None else "",
        )

    def start_loading(self) -> asyncio.Task[None]:
        """Start :meth:`load` in the background (state LOADING at once)."""
        self.state = ModelState.LOADING
        self.loading = asyncio.get_running_loop().create_task(self.load())
        return self.loading

    async def set_state(self, state: str, error: str = "") -> None:
        self.state, self.error = state, error
        await self._notify()

    async def load(self) -> None:
        """Build, load, tune and warm up the model; ends READY, or FAILED with the error."""
        spec = self.spec
        await self.set_state(ModelState.LOADING)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{spec.name}")
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            models = await loop.run_in_executor(self.executor, build_replicas, spec, self._builder)
            self.model = models[0]
            if spec.batching == "auto":
                self.spec = await loop.run_in_executor(self.executor, self._tune_batch_size)
            instances = resolve_instances(self.spec, self.model.device, self.model.shares_cpu_threads)
            self.spec = dataclasses.replace(self.spec, instances=instances)
            self.replicas = replicas = ReplicaSet(models, instances, self._on_device_batch)
            if replicas.slots > 1:
                self.executor.shutdown(wait=False)
                self.executor = ThreadPoolExecutor(replicas.slots, thread_name_prefix=f"model-{spec.name}")
            if self._metrics is not None:
                self._metrics.set_instances(*self.labels, replicas.devices, instances)
                self._metrics.set_max_batch_size(*self.labels, self.spec.max_batch_size, spec.batching)
            self.batcher = self._make_batcher()
            if self._config.warmup:
                await self._warm_up()
        except Exception as e:
            logger.exception("model %s failed to load", spec.name)
            await self.teardown()
            await self.set_state(ModelState.FAILED, f"{type(e).__name__}: {e}")
            return
        self.stats = ModelStats()  # warm-up is not traffic
        for model in replicas.models:
            model.mark_ready()
        logger.info(
            "model %s v%s ready in %.2f s (%s instance(s), max_batch_size %d)",
            spec.name, spec.version, time.monotonic() - started, self.spec.instances, self.spec.max_batch_size,
        )  # fmt: skip
        await self.set_state(ModelState.READY)

    def _tune_batch_size(self) -> ModelSpec:
        """The spec with the measured fastest ``max_batch_size`` (model thread, at load time)."""
        assert self.model is not None
        return tune_batch_size(self.model, self.spec)

    def _make_batcher(self) -> Batcher[Any, Any]:
        assert self.replicas is not None and self.executor is not None
        name = self.spec.name
        batcher: Batcher[Any, Any] = Batcher(
            self.replicas.forward,
            max_batch_size=self.spec.max_batch_size,
            max_wait_ms=self.spec.max_wait_ms,
            max_queue=self.spec.max_queue,
            executor=self.executor,
            name=name,
            on_batch=self._on_batch,
            concurrency=self.replicas.slots,
        )
        if self._metrics is not None:
            self._metrics.track_queue_depth(*self.labels, lambda: batcher.depth)
        return batcher

    async def _warm_up(self) -> None:
        """A full batch of busy images through the whole path on each copy, before any traffic.

        Kernels, cuDNN's algorithm search and the caching allocator meet the largest batch
        now rather than on the first requests; an image that does not fit even alone fails
        the load here. One wave per copy: the replica set hands consecutive batches to its
        copies in turn, so each GPU of a ``devices`` list runs one.
        """
        side = self._config.warmup_image_size
        image = busy_image(side, side)
        count = min(self.spec.max_batch_size, self.spec.max_queue)
        for _ in range(len(self.replicas.models) if self.replicas is not None else 1):
            outcomes = await asyncio.gather(*(self.run_image(image, None) for _ in range(count)))
            errors = [o.error for o in outcomes if o.error is not None]
            if errors:
                raise RuntimeError(f"warm-up inference failed: {errors[0]}") from errors[0]

    def _on_device_batch(self, device: str) -> None:
        if self._metrics is not None and self.state == ModelState.READY:  # warm-up is not traffic
            self._metrics.observe_device_batch(*self.labels, device)

    def _on_batch(self, report: BatchReport) -> None:
        stats = self.stats
        stats.queue.add(sum(report.queue_s), len(report.queue_s))
        stats.compute_infer.add(report.compute_s)
        stats.execution_count += 1
        stats.inference_count += report.size
        stats.last_inference_ms = int(time.time() * 1000)
        if self._metrics is not None and self.state == ModelState.READY:  # warm-up is not traffic
            self._metrics.observe_batch(
                *self.labels, report.size, report.queue_s, report.compute_s, report.failed
            )

    async def teardown(self) -> None:
        """Close the batcher (queued items finish), stop the model's thread, drop the model."""
        if self.batcher is not None:
            await self.batcher.close()
        if self.executor is not None:
            self.executor.shutdown(wait=False)
        for model in self.replicas.models if self.replicas is not None else ():
            model.mark_ready(False)
        self.model, self.replicas, self.batcher, self.executor = None, None, None, None

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record one image's time in a serving stage, once the model serves traffic."""
        if self._metrics is not None and self.state == ModelState.READY:
            self._metrics.observe_stage(*self.labels, stage, seconds)

    async def run_image(
        self,
        image: np.ndarray | ScaledImage,
        deadline: float | None,
        *,
        masks: bool = True,
    ) -> Outcome:
        """Preprocess in the shared pool, forward through the batcher, postprocess in the pool.

        Args:
            image: RGB uint8 ``(H, W, 3)``, or one decoded at a reduced scale with its own size
                (predictions are in that size's pixels).
            deadline: absolute ``time.monotonic()`` deadline, if any.
            masks: False when the request wants no instance masks (see
                :meth:`~cvserve.models.base.VisionModel.prepare`).
        """
        model, batcher, stats = self.model, self.batcher, self.stats
        timing = ItemTiming()
        start = time.monotonic()
        pixels, size = pixels_and_size(image)
        try:
            if model is None or batcher is None:
                raise ModelNotReadyError(f"model {self.spec.name!r} is not loaded")
            prepare = functools.partial(model.prepare, masks=masks)
            try:
                inputs, seconds = await run_in_pool(self._pool, _timed, prepare, pixels)
            except InputSizeError as e:  # the image's fault, not the server's
                raise InvalidImageError(str(e)) from None
            stats.compute_input.add(seconds)
            self.observe_stage("preprocess", seconds)
            raw = await batcher.submit(inputs, deadline=deadline, timing=timing)
            prediction, seconds = await run_in_pool(self._pool, _timed, model.postprocess, raw, size)
            stats.compute_output.add(seconds)
            self.observe_stage("postprocess", seconds)
        except Exception as e:
            stats.failure.add(time.monotonic() - start)
            return Outcome(None, e, timing, self.spec.version)
        stats.success.add(time.monotonic() - start)
        return Outcome(prediction, None, timing, self.spec.version)


def resolve_instances(spec: ModelSpec, device: str, shares_cpu_threads: bool) -> int:
    """The number of batches to run at once: ``spec.instances``, with ``auto`` resolved
    for ``device``: 1 on a GPU, and 1 for a model whose passes do not share the CPU's
    threads (each would take every core); otherwise :func:`cvserve.models.threads.cpu_instances`."""
    if spec.instances != "auto":
        return int(spec.instances)
    if device.startswith("cuda") or not shares_cpu_threads:
        return 1
    from cvserve.models.threads import cpu_instances  # imports torch: only for auto on a CPU

    return cpu_instances()


def _timed(fn: Callable[..., _R], *args: Any) -> tuple[_R, float]:
    """``fn(*args)`` and its duration: measured in the worker, so pool queueing is not counted."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start
