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
* :meth:`load` / :meth:`unload` / :meth:`reload_repository` change what is served at
  run time, by repository name only (never a path a client sent), re-reading the
  repository each time (:mod:`cvserve.dataplane.repository`); a reload swaps in the new
  version without failing a request (:mod:`cvserve.dataplane.versions`);
* each served version of a model is a :class:`~cvserve.dataplane.served_model.ServedModel`
  (its own lifecycle, thread, batcher and statistics, as Triton's model versions); a request
  without a version gets the newest ready one. This module adds what spans models.

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
from cvserve.dataplane.model_state import ModelState, ModelStats, ModelStatus, Outcome
from cvserve.dataplane.repository import Change, IndexEntry, RepositorySource, RepositorySync
from cvserve.dataplane.served_model import ServedModel, run_in_pool
from cvserve.dataplane.versions import ServedVersions
from cvserve.errors import ModelNotFoundError, ModelNotReadyError, ServerDrainingError
from cvserve.metrics import Metrics
from cvserve.models.base import VisionModel
from cvserve.models.build import build_model
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Prediction, ScaledImage

__all__ = ["DataPlane"]

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
        source: re-reads the repository for :meth:`load` and :meth:`reload_repository`
            (:func:`cvserve.dataplane.repository.file_source`); by default ``specs`` again.
    """

    def __init__(
        self,
        specs: Iterable[ModelSpec],
        config: ServerConfig | None = None,
        *,
        metrics: Metrics | None = None,
        builder: Callable[[ModelSpec], VisionModel] = build_model,
        cpu_pool: Executor | None = None,
        source: RepositorySource | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        self._metrics = metrics
        self._builder = builder
        self._own_pool = cpu_pool is None
        self._pool = cpu_pool or ThreadPoolExecutor(
            self.config.worker_threads, thread_name_prefix="cvserve-cpu", initializer=_helper_thread
        )
        specs = list(specs)
        self._entries: dict[str, ServedVersions] = {}
        for spec in specs:
            if spec.name in self._entries:
                raise ValueError(f"duplicate model name {spec.name!r}")
            self._entries[spec.name] = self._new_entry(spec)
        self._sync = RepositorySync(source or (lambda: specs), self._entries, self._new_entry, self._notify)
        self._listeners: list[Listener] = []
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def _new_entry(self, spec: ModelSpec) -> ServedVersions:
        return ServedVersions(spec, self._served_model, self._metrics)

    def _served_model(self, spec: ModelSpec) -> ServedModel:
        return ServedModel(
            spec,
            config=self.config,
            metrics=self._metrics,
            builder=self._builder,
            pool=self._pool,
            notify=self._notify,
        )

    # ---- lifecycle -----------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Await ``listener()`` after every change of a model's state or of draining."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Start loading every model in the background and return at once."""
        for entry in self._entries.values():
            for model in entry.versions.values():
                if model.loading is None and model.state == ModelState.LOADING:
                    model.start_loading()
        self._publish_readiness()

    async def wait_loaded(self, timeout: float | None = None) -> None:
        """Wait until no model is loading any more (ready or failed)."""
        tasks = [t for e in self._entries.values() for t in e.loading_tasks()]
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)

    async def _notify(self) -> None:
        self._publish_readiness()
        for listener in self._listeners:
            await listener()

    def _publish_readiness(self) -> None:
        if self._metrics is not None:
            for entry in self._entries.values():
                for model in entry.versions.values():
                    self._metrics.set_ready(*model.labels, model.state == ModelState.READY)

    async def load(self, name: str) -> ModelStatus:
        """Load or reload a model of the repository by name, re-reading the repository.

        A model already serving keeps serving until its new load is ready; when nothing
        changed it is left alone.

        Returns:
            The status of the version a request without a version now gets.

        Raises:
            RepositoryFileError: the repository cannot be read or is invalid; nothing changed.
            ModelNotFoundError: ``name`` is not in the repository.
            ModelLoadError: loading failed; the message holds the error.
        """
        entry = await self._sync.load(name)
        return entry.select(None).status()

    async def unload(self, name: str) -> None:
        """Stop serving a model: refuse new requests, finish those holding it, free it.

        Raises ``ModelNotFoundError`` when ``name`` is neither served nor in the repository.
        """
        await self._sync.unload(name)

    async def reload_repository(self) -> list[Change]:
        """Re-read the repository and apply every change (new, changed and removed entries).

        Raises ``RepositoryFileError`` (nothing changed) when the file cannot be read or is invalid.
        """
        return await self._sync.reload()

    def repository_index(self) -> list[IndexEntry]:
        """Every entry of the repository per version, with its state and why it is not ready."""
        return self._sync.index()

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
            for model in entry.versions.values():
                if model.loading is not None and not model.loading.done():
                    # A load still running in its thread finishes there; nobody awaits it any more.
                    model.loading.cancel()
                await model.teardown()
        if self._own_pool:
            self._pool.shutdown(wait=False)

    # ---- lookup --------------------------------------------------------------------------------

    def _entry(self, name: str) -> ServedVersions:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ModelNotFoundError(f"unknown model {name!r}; served models: {known}") from None

    def models(self) -> list[ModelStatus]:
        """Every served version of every model, in repository order, oldest version first."""
        return [status for entry in self._entries.values() for status in entry.statuses()]

    def get(self, name: str, version: str | None = None) -> ModelStatus:
        """The status of ``version`` of a model (None: the version a request without one gets).

        Raises ``ModelNotFoundError`` / ``VersionNotFoundError`` for no such model or version.
        """
        return self._entry(name).select(version).status()

    def versions(self, name: str, ready: bool = True) -> list[str]:
        """The versions of ``name`` served (``ready``: only the ready ones), oldest first."""
        return [s.version for s in self._entry(name).statuses() if s.ready or not ready]

    def is_ready(self, name: str, version: str | None = None) -> bool:
        """True when ``name`` (at ``version``, or any) exists and serves (False for unknown names too)."""
        entry = self._entries.get(name)
        if entry is None or self._draining:
            return False
        model = entry.versions.get(version) if version else entry.select(None)
        return model is not None and model.state == ModelState.READY

    def server_ready(self) -> bool:
        """True once no model is loading, at least one serves, and the server is not draining."""
        models = [m for e in self._entries.values() for m in e.versions.values()]
        settled = all(m.state != ModelState.LOADING for m in models)
        return settled and not self._draining and any(m.state == ModelState.READY for m in models)

    def require_ready(self, name: str, version: str | None = None) -> ModelStatus:
        """Like :meth:`get`, but also raise ``ModelNotReadyError`` / ``ServerDrainingError``."""
        return self._ready_model(name, version).status()

    def _ready_model(self, name: str, version: str | None) -> ServedModel:
        model = self._entry(name).select(version)
        if self._draining:
            raise ServerDrainingError("server is shutting down; retry on another replica")
        if model.state != ModelState.READY:
            why = f": {model.error}" if model.error else ""
            raise ModelNotReadyError(f"model {name!r} is not ready ({model.state}{why})")
        return model

    def model_object(self, name: str, version: str | None = None) -> VisionModel | None:
        """The loaded :class:`VisionModel` of ``name`` (None unless loaded), for in-process callers."""
        return self._entry(name).select(version).model

    def stats(self, name: str, version: str | None = None) -> ModelStats:
        """A copy of the statistics of ``name`` at ``version``."""
        return copy.deepcopy(self._entry(name).select(version).stats)

    # ---- inference -----------------------------------------------------------------------------

    async def run_cpu(self, fn: Callable[..., _R], *args: Any) -> _R:
        """Run ``fn(*args)`` in the shared CPU pool, carrying the caller's context (request id)."""
        return await run_in_pool(self._pool, fn, *args)

    def observe_stage(self, name: str, stage: str, seconds: float, version: str | None = None) -> None:
        """Record one image's time in a serving stage (see :data:`cvserve.metrics.STAGES`)."""
        entry = self._entries.get(name)
        model = entry.versions.get(version) if entry is not None and version else None
        if entry is not None:
            (model or entry.select(None)).observe_stage(stage, seconds)

    async def infer(
        self,
        name: str,
        images: Sequence[np.ndarray | ScaledImage],
        *,
        version: str | None = None,
        deadline: float | None = None,
        masks: bool = True,
    ) -> list[Prediction | Exception]:
        """Predict ``images`` (RGB uint8 ``(H, W, 3)``) with model ``name``; ``masks=False`` skips masks.

        Returns one prediction, or the exception that image failed with, per image. Raises
        ModelNotFoundError, VersionNotFoundError, ModelNotReadyError or ServerDrainingError.
        """
        outcomes = await self.infer_timed(name, images, version=version, deadline=deadline, masks=masks)
        return [o.prediction if o.error is None else o.error for o in outcomes]  # type: ignore[misc]

    async def infer_timed(
        self,
        name: str,
        images: Sequence[np.ndarray | ScaledImage],
        *,
        version: str | None = None,
        deadline: float | None = None,
        masks: bool = True,
    ) -> list[Outcome]:
        """Like :meth:`infer`, with each image's queue / inference timing."""
        model = self._ready_model(name, version)
        # Held from here to the last stage: a reload frees this model only after the request.
        model.hold()
        self._in_flight += 1
        self._idle.clear()
        try:
            runs = (model.run_image(img, deadline, masks=masks) for img in images)
            return list(await asyncio.gather(*runs))
        finally:
            model.release()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
