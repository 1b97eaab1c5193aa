"""The transport-neutral data plane: model lookup, readiness, batching and statistics.

Servicers (``cvserve.v1``, the Open Inference Protocol) convert protos and validate;
everything else happens here, as in KServe's ``DataPlane``:

* models of the repository are built, loaded and warmed up in the background by
  :meth:`DataPlane.start`; each is ready only after a synthetic image went through the
  whole path. A model that fails to load is ``FAILED`` with its error; others serve;
* :meth:`DataPlane.infer` looks a model up (``ModelNotFoundError``, ``VersionNotFoundError``),
  checks readiness (``ModelNotReadyError`` while loading, ``ServerDrainingError`` while
  draining), then runs each image: preprocess in the shared CPU pool, forward through
  the model's :class:`~service.batcher.Batcher` on the model's single thread,
  postprocess in the shared pool;
* :meth:`load` / :meth:`unload` change what is served at run time, by repository name
  only (never a path a client sent);
* per-model :class:`ModelStats` follow the Open Inference Protocol's statistics.

Deadlines are absolute ``time.monotonic()`` values.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from models.base import VisionModel
from models.registry import build_model
from models.repository import ModelSpec
from models.types import Prediction
from service.batch_policy import candidate_sizes, choose_batch_size, forward_timer
from service.batcher import Batcher, BatchReport, ItemTiming
from service.config import ServerConfig
from service.errors import (
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerDrainingError,
    VersionNotFoundError,
)
from service.metrics import Metrics
from service.model_state import Duration, ModelState, ModelStats, ModelStatus, Outcome

__all__ = ["DataPlane", "Duration", "ModelState", "ModelStats", "ModelStatus", "Outcome"]

logger = logging.getLogger(__name__)
_R = TypeVar("_R")
Listener = Callable[[], Awaitable[None]]


@dataclass(eq=False)
class _Entry:
    spec: ModelSpec
    state: str = ModelState.LOADING
    error: str = ""
    model: VisionModel | None = None
    batcher: Batcher[Any, Any] | None = None
    executor: ThreadPoolExecutor | None = None
    stats: ModelStats = field(default_factory=ModelStats)
    loading: asyncio.Task[None] | None = None


class DataPlane:
    """Serves the models of one repository.

    Args:
        specs: the repository; names must be unique.
        config: server settings (worker threads, warm-up); defaults if None.
        metrics: Prometheus metrics to feed, if any.
        builder: builds an unloaded model from a spec (``models.registry.build_model``).
        cpu_pool: the shared pool for decoding / pre- / post-processing; by default one
            of ``config.worker_threads`` threads owned by the data plane.
    """

    def __init__(
        self,
        specs: Iterable[ModelSpec],
        config: ServerConfig | None = None,
        *,
        metrics: Metrics | None = None,
        builder: Callable[[ModelSpec], VisionModel] = build_model,
        cpu_pool: Executor | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        self._entries: dict[str, _Entry] = {}
        for spec in specs:
            if spec.name in self._entries:
                raise ValueError(f"duplicate model name {spec.name!r}")
            self._entries[spec.name] = _Entry(spec)
        self._metrics = metrics
        self._builder = builder
        self._own_pool = cpu_pool is None
        self._pool = cpu_pool or ThreadPoolExecutor(
            self.config.worker_threads, thread_name_prefix="cvserve-cpu"
        )
        self._listeners: list[Listener] = []
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle -----------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Await ``listener()`` after every change of a model's state or of draining."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Start loading every model in the background and return at once."""
        for entry in self._entries.values():
            if entry.loading is None and entry.state == ModelState.LOADING:
                entry.loading = asyncio.get_running_loop().create_task(self._load(entry))
            if self._metrics is not None:
                self._metrics.set_ready(entry.spec.name, False)

    async def wait_loaded(self, timeout: float | None = None) -> None:
        """Wait until no model is loading any more (ready or failed)."""
        tasks = [e.loading for e in self._entries.values() if e.loading is not None and not e.loading.done()]
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)

    async def _notify(self) -> None:
        for listener in self._listeners:
            await listener()

    async def _set_state(self, entry: _Entry, state: str, error: str = "") -> None:
        entry.state, entry.error = state, error
        if self._metrics is not None:
            self._metrics.set_ready(entry.spec.name, state == ModelState.READY)
        await self._notify()

    async def _load(self, entry: _Entry) -> None:
        spec = entry.spec
        await self._set_state(entry, ModelState.LOADING)
        entry.executor = ThreadPoolExecutor(1, thread_name_prefix=f"model-{spec.name}")
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            entry.model = await loop.run_in_executor(entry.executor, self._build_and_load, spec)
            if spec.batching == "auto":
                entry.spec = await loop.run_in_executor(entry.executor, self._tune_batch_size, entry)
            if self._metrics is not None:
                self._metrics.set_max_batch_size(spec.name, entry.spec.max_batch_size, spec.batching)
            entry.batcher = self._make_batcher(entry)
            if self.config.warmup:
                await self._warm_up(entry)
        except Exception as e:
            logger.exception("model %s failed to load", spec.name)
            await self._teardown(entry)
            await self._set_state(entry, ModelState.FAILED, f"{type(e).__name__}: {e}")
            return
        entry.stats = ModelStats()  # warm-up is not traffic
        entry.model.mark_ready()
        logger.info("model %s v%s ready in %.2f s", spec.name, spec.version, time.monotonic() - started)
        await self._set_state(entry, ModelState.READY)

    def _build_and_load(self, spec: ModelSpec) -> VisionModel:
        model = self._builder(spec)
        model.load()
        return model

    def _tune_batch_size(self, entry: _Entry) -> ModelSpec:
        """The spec with the measured fastest ``max_batch_size`` (model thread, at load time)."""
        assert entry.model is not None
        spec = entry.spec
        measure = forward_timer(entry.model, _synthetic_image(480, 640))
        decision = choose_batch_size(measure, candidate_sizes(spec.max_batch_size))
        logger.info(
            "model %s on %s: batching auto chose %s", spec.name, entry.model.device, decision.describe()
        )
        return dataclasses.replace(spec, max_batch_size=decision.size)

    def _make_batcher(self, entry: _Entry) -> Batcher[Any, Any]:
        assert entry.model is not None and entry.executor is not None
        name = entry.spec.name
        batcher: Batcher[Any, Any] = Batcher(
            entry.model.forward,
            max_batch_size=entry.spec.max_batch_size,
            max_wait_ms=entry.spec.max_wait_ms,
            max_queue=entry.spec.max_queue,
            executor=entry.executor,
            name=name,
            on_batch=functools.partial(self._on_batch, entry),
        )
        if self._metrics is not None:
            self._metrics.track_queue_depth(name, lambda: batcher.depth)
        return batcher

    async def _warm_up(self, entry: _Entry) -> None:
        side = self.config.warmup_image_size
        outcome = await self._run_image(entry, _synthetic_image(side, side), None)
        if outcome.error is not None:
            raise RuntimeError(f"warm-up inference failed: {outcome.error}") from outcome.error

    def _on_batch(self, entry: _Entry, report: BatchReport) -> None:
        stats = entry.stats
        stats.queue.add(sum(report.queue_s), len(report.queue_s))
        stats.compute_infer.add(report.compute_s)
        stats.execution_count += 1
        stats.inference_count += report.size
        stats.last_inference_ms = int(time.time() * 1000)
        if self._metrics is not None and entry.state == ModelState.READY:  # warm-up is not traffic
            self._metrics.observe_batch(
                entry.spec.name, report.size, report.queue_s, report.compute_s, report.failed
            )

    async def _teardown(self, entry: _Entry) -> None:
        if entry.batcher is not None:
            await entry.batcher.close()
        if entry.executor is not None:
            entry.executor.shutdown(wait=False)
        if entry.model is not None:
            entry.model.mark_ready(False)
        entry.model, entry.batcher, entry.executor = None, None, None

    async def load(self, name: str) -> ModelStatus:
        """Load (or finish loading) a model of the repository by name.

        Raises:
            ModelNotFoundError: ``name`` is not in the repository.
            ModelLoadError: loading failed; the message holds the error.
        """
        entry = self._entry(name)
        if entry.state == ModelState.READY:
            return self._status(entry)
        if entry.loading is None or entry.loading.done():
            entry.state = ModelState.LOADING
            entry.loading = asyncio.get_running_loop().create_task(self._load(entry))
        await asyncio.shield(entry.loading)
        if entry.state != ModelState.READY:
            raise ModelLoadError(f"model {name!r} failed to load: {entry.error}")
        return self._status(entry)

    async def unload(self, name: str) -> ModelStatus:
        """Stop serving a model: refuse new requests, finish queued ones, free it.

        Raises:
            ModelNotFoundError: ``name`` is not in the repository.
        """
        entry = self._entry(name)
        if entry.loading is not None and not entry.loading.done():
            await asyncio.shield(entry.loading)
        await self._set_state(entry, ModelState.UNLOADED)
        await self._teardown(entry)
        return self._status(entry)

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, grace_s: float) -> bool:
        """Refuse new requests and wait up to ``grace_s`` for in-flight ones.

        Returns:
            True when every in-flight request finished in time.
        """
        self._draining = True
        await self._notify()
        if self._in_flight == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
            return True
        except TimeoutError:
            logger.warning("drain: %d requests still in flight after %.1f s", self._in_flight, grace_s)
            return False

    async def close(self) -> None:
        """Free every model and the shared pool (after :meth:`drain`)."""
        self._draining = True
        for entry in self._entries.values():
            if entry.loading is not None and not entry.loading.done():
                # A load still running in its thread finishes there; nobody awaits it any more.
                entry.loading.cancel()
            await self._teardown(entry)
        if self._own_pool:
            self._pool.shutdown(wait=False)

    # ---- lookup --------------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ModelNotFoundError(f"unknown model {name!r}; served models: {known}") from None

    def _status(self, entry: _Entry) -> ModelStatus:
        model = entry.model
        return ModelStatus(
            spec=entry.spec,
            state=entry.state,
            error=entry.error,
            class_names=tuple(model.class_names) if model is not None else (),
            device=str(model.device) if model is not None else "",
        )

    def models(self) -> list[ModelStatus]:
        """Every model of the repository, in repository order."""
        return [self._status(e) for e in self._entries.values()]

    def get(self, name: str, version: str | None = None) -> ModelStatus:
        """One model's status.

        Raises:
            ModelNotFoundError / VersionNotFoundError: no such model or version.
        """
        entry = self._entry(name)
        if version and version != entry.spec.version:
            raise VersionNotFoundError(
                f"model {name!r} has no version {version!r}; served version: {entry.spec.version!r}"
            )
        return self._status(entry)

    def is_ready(self, name: str) -> bool:
        """True when ``name`` exists and serves (False for unknown names too)."""
        entry = self._entries.get(name)
        return entry is not None and entry.state == ModelState.READY and not self._draining

    def require_ready(self, name: str, version: str | None = None) -> ModelStatus:
        """Like :meth:`get`, but also raise ``ModelNotReadyError`` / ``ServerDrainingError``."""
        status = self.get(name, version)
        if self._draining:
            raise ServerDrainingError("server is shutting down; retry on another replica")
        if status.state != ModelState.READY:
            why = f": {status.error}" if status.error else ""
            raise ModelNotReadyError(f"model {name!r} is not ready ({status.state}{why})")
        return status

    def model_object(self, name: str) -> VisionModel | None:
        """The loaded :class:`VisionModel` of ``name`` (None unless loaded), for in-process callers."""
        return self._entry(name).model

    def stats(self, name: str) -> ModelStats:
        """A copy of ``name``'s statistics."""
        return copy.deepcopy(self._entry(name).stats)

    # ---- inference -----------------------------------------------------------------------------

    async def run_cpu(self, fn: Callable[..., _R], *args: Any) -> _R:
        """Run ``fn(*args)`` in the shared CPU pool, carrying the caller's context (request id)."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(ctx.run, fn, *args)
        )

    def observe_stage(self, name: str, stage: str, seconds: float) -> None:
        """Record one image's time in a serving stage (see :data:`service.metrics.STAGES`)."""
        if self._metrics is not None and self._entries[name].state == ModelState.READY:
            self._metrics.observe_stage(name, stage, seconds)

    async def infer(
        self,
        name: str,
        images: Sequence[np.ndarray],
        *,
        version: str | None = None,
        deadline: float | None = None,
    ) -> list[Prediction | Exception]:
        """Predict ``images`` (RGB uint8 ``(H, W, 3)``) with model ``name``.

        Returns:
            One prediction, or the exception that image failed with, per image.

        Raises:
            ModelNotFoundError, VersionNotFoundError, ModelNotReadyError, ServerDrainingError.
        """
        outcomes = await self.infer_timed(name, images, version=version, deadline=deadline)
        return [o.prediction if o.error is None else o.error for o in outcomes]  # type: ignore[misc]

    async def infer_timed(
        self,
        name: str,
        images: Sequence[np.ndarray],
        *,
        version: str | None = None,
        deadline: float | None = None,
    ) -> list[Outcome]:
        """Like :meth:`infer`, with each image's queue / inference timing."""
        self.require_ready(name, version)
        entry = self._entries[name]
        self._in_flight += 1
        self._idle.clear()
        try:
            return list(await asyncio.gather(*(self._run_image(entry, img, deadline) for img in images)))
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _run_image(self, entry: _Entry, image: np.ndarray, deadline: float | None) -> Outcome:
        model, batcher, stats = entry.model, entry.batcher, entry.stats
        timing = ItemTiming()
        start = time.monotonic()
        try:
            if model is None or batcher is None:
                raise ModelNotReadyError(f"model {entry.spec.name!r} is not loaded")
            inputs, seconds = await self.run_cpu(_timed, model.preprocess, image)
            stats.compute_input.add(seconds)
            self.observe_stage(entry.spec.name, "preprocess", seconds)
            raw = await batcher.submit(inputs, deadline=deadline, timing=timing)
            size = (int(image.shape[0]), int(image.shape[1]))
            prediction, seconds = await self.run_cpu(_timed, model.postprocess, raw, size)
            stats.compute_output.add(seconds)
            self.observe_stage(entry.spec.name, "postprocess", seconds)
        except Exception as e:
            stats.failure.add(time.monotonic() - start)
            return Outcome(None, e, timing)
        stats.success.add(time.monotonic() - start)
        return Outcome(prediction, None, timing)


def _timed(fn: Callable[..., _R], *args: Any) -> tuple[_R, float]:
    """``fn(*args)`` and its duration: measured in the worker, so pool queueing is not counted."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _synthetic_image(height: int, width: int) -> np.ndarray:
    """A smooth RGB test pattern (colour ramps) for warm-up and batch-size measurement."""
    rows = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    cols = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    image = np.stack(np.broadcast_arrays(cols, rows, cols[:, ::-1]), axis=-1)
    return np.ascontiguousarray(image)
