"""The transport-neutral data plane: model lookup, readiness, batching and statistics.

Servicers (``cvserve.v1``, the Open Inference Protocol) convert protos and validate;
everything else happens here, as in KServe's ``DataPlane``:

* models of the repository are built, loaded and warmed up in the background by
  :meth:`DataPlane.start`; each is ready only after a synthetic image went through the
  whole path. A model that fails to load is ``FAILED`` with its error; others serve;
* :meth:`DataPlane.infer` looks a model up (``ModelNotFoundError``, ``VersionNotFoundError``),
  checks readiness (``ModelNotReadyError`` while loading, ``ServerDrainingError`` while
  draining), then runs each image: preprocess in the shared CPU pool, forward through
  the model's :class:`~cvserve.dataplane.batcher.Batcher` on the model's single thread,
  postprocess in the shared pool;
* :meth:`load` / :meth:`unload` change what is served at run time, by repository name
  only (never a path a client sent);
* per-model :class:`ModelStats` follow the Open Inference Protocol's statistics.

Each model's own lifecycle, thread, batcher and statistics live in its
:class:`~cvserve.dataplane.served_model.ServedModel`; this module adds what spans models.

Deadlines are absolute ``time.monotonic()`` values.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from cvserve.config import ServerConfig
from cvserve.dataplane.model_state import Duration, ModelState, ModelStats, ModelStatus, Outcome
from cvserve.dataplane.served_model import ServedModel, run_in_pool
from cvserve.errors import (
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerDrainingError,
    VersionNotFoundError,
)
from cvserve.metrics import Metrics
from cvserve.models.base import VisionModel
from cvserve.models.build import build_model
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Prediction

__all__ = ["DataPlane", "Duration", "ModelState", "ModelStats", "ModelStatus", "Outcome"]

logger = logging.getLogger(__name__)
_R = TypeVar("_R")
Listener = Callable[[], Awaitable[None]]


def _helper_thread() -> None:
    """Initializer of the shared CPU pool: one intra-op thread (see models.threads)."""
    from cvserve.models.threads import limit_helper_thread  # torch: only once a pool thread starts

    limit_helper_thread()


class DataPlane:
    """Serves the models of one repository.

    Args:
        specs: the repository; names must be unique.
        config: server settings (worker threads, warm-up); defaults if None.
        metrics: Prometheus metrics to feed, if any.
        builder: builds an unloaded model from a spec (``cvserve.models.registry.build_model``).
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
        self._metrics = metrics
        self._own_pool = cpu_pool is None
        self._pool = cpu_pool or ThreadPoolExecutor(
            self.config.worker_threads, thread_name_prefix="cvserve-cpu", initializer=_helper_thread
        )
        self._entries: dict[str, ServedModel] = {}
        for spec in specs:
            if spec.name in self._entries:
                raise ValueError(f"duplicate model name {spec.name!r}")
            self._entries[spec.name] = ServedModel(
                spec,
                config=self.config,
                metrics=metrics,
                builder=builder,
                pool=self._pool,
                notify=self._notify,
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
                entry.start_loading()
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

    async def load(self, name: str) -> ModelStatus:
        """Load (or finish loading) a model of the repository by name.

        Raises:
            ModelNotFoundError: ``name`` is not in the repository.
            ModelLoadError: loading failed; the message holds the error.
        """
        entry = self._entry(name)
        if entry.state == ModelState.READY:
            return entry.status()
        loading = entry.loading
        if loading is None or loading.done():
            loading = entry.start_loading()
        await asyncio.shield(loading)
        if entry.state != ModelState.READY:
            raise ModelLoadError(f"model {name!r} failed to load: {entry.error}")
        return entry.status()

    async def unload(self, name: str) -> ModelStatus:
        """Stop serving a model: refuse new requests, finish queued ones, free it.

        Raises:
            ModelNotFoundError: ``name`` is not in the repository.
        """
        entry = self._entry(name)
        if entry.loading is not None and not entry.loading.done():
            await asyncio.shield(entry.loading)
        await entry.set_state(ModelState.UNLOADED)
        await entry.teardown()
        return entry.status()

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
            await entry.teardown()
        if self._own_pool:
            self._pool.shutdown(wait=False)

    # ---- lookup --------------------------------------------------------------------------------

    def _entry(self, name: str) -> ServedModel:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ModelNotFoundError(f"unknown model {name!r}; served models: {known}") from None

    def models(self) -> list[ModelStatus]:
        """Every model of the repository, in repository order."""
        return [e.status() for e in self._entries.values()]

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
        return entry.status()

    def is_ready(self, name: str) -> bool:
        """True when ``name`` exists and serves (False for unknown names too)."""
        entry = self._entries.get(name)
        return entry is not None and entry.state == ModelState.READY and not self._draining

    def server_ready(self) -> bool:
        """True once no model is loading, at least one serves, and the server is not draining."""
        entries = self._entries.values()
        settled = all(e.state != ModelState.LOADING for e in entries)
        return settled and not self._draining and any(e.state == ModelState.READY for e in entries)

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
        return await run_in_pool(self._pool, fn, *args)

    def observe_stage(self, name: str, stage: str, seconds: float) -> None:
        """Record one image's time in a serving stage (see :data:`cvserve.metrics.STAGES`)."""
        self._entries[name].observe_stage(stage, seconds)

    async def infer(
        self,
        name: str,
        images: Sequence[np.ndarray],
        *,
        version: str | None = None,
        deadline: float | None = None,
        masks: bool = True,
    ) -> list[Prediction | Exception]:
        """Predict ``images`` (RGB uint8 ``(H, W, 3)``) with model ``name``.

        ``masks=False`` skips instance masks (the request asks for none).

        Returns:
            One prediction, or the exception that image failed with, per image.

        Raises:
            ModelNotFoundError, VersionNotFoundError, ModelNotReadyError, ServerDrainingError.
        """
        outcomes = await self.infer_timed(name, images, version=version, deadline=deadline, masks=masks)
        return [o.prediction if o.error is None else o.error for o in outcomes]  # type: ignore[misc]

    async def infer_timed(
        self,
        name: str,
        images: Sequence[np.ndarray],
        *,
        version: str | None = None,
        deadline: float | None = None,
        masks: bool = True,
    ) -> list[Outcome]:
        """Like :meth:`infer`, with each image's queue / inference timing."""
        self.require_ready(name, version)
        entry = self._entries[name]
        self._in_flight += 1
        self._idle.clear()
        try:
            runs = (entry.run_image(img, deadline, masks=masks) for img in images)
            return list(await asyncio.gather(*runs))
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
