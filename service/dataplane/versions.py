"""The served versions of one repository entry, and how they are replaced without a failed request.

A :class:`ServedVersions` holds one :class:`~cvserve.dataplane.served_model.ServedModel` per version
the entry's version policy serves (Triton's model versions). :meth:`ServedVersions.apply`
brings them in line with a (re-read) repository entry the way Triton reloads a model:

* versions whose settings and files did not change keep serving untouched;
* new and changed versions load and warm up *beside* the ones serving; only once every
  one of them is ready do they take new requests (one swap of the version table);
* the replaced models are freed once the requests that already hold them (queued or
  running, see :meth:`ServedModel.hold`) are done;
* if any of them fails to load, nothing changes: the previous load keeps serving and
  :attr:`ServedVersions.reason` says why the reload was not applied.

Which version a request gets: the one it names, or, when it names none, the newest
version that is ready (Triton's choice for an empty ``model_version``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from cvserve.dataplane.model_state import ModelState, ModelStatus
from cvserve.dataplane.served_model import ServedModel
from cvserve.errors import ModelLoadError, VersionNotFoundError
from cvserve.metrics import Metrics
from cvserve.models.repository import ModelSpec

__all__ = ["ServedVersions", "fingerprint"]

logger = logging.getLogger(__name__)


def _stat(path: str) -> tuple[int, int, int] | None:
    """A local file's modification time, size and inode (None for model-zoo names and URLs)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def fingerprint(spec: ModelSpec) -> tuple[Any, ...]:
    """What a reload compares: every field of the entry plus the state of its config and
    weights files, so new weights written over the old path count as a change (as
    Triton's poll mode watches the files' modification times)."""
    files = [spec.config, spec.weights, *spec.versions.values()]
    return (spec, tuple(_stat(path) for path in files if path))


class ServedVersions:
    """The served versions of one repository entry.

    Args:
        spec: the entry as the repository file gives it.
        make: builds an unloaded :class:`ServedModel` for one version's spec.
        metrics: where the gauges of versions no longer served are dropped, if any.
    """

    def __init__(
        self, spec: ModelSpec, make: Callable[[ModelSpec], ServedModel], metrics: Metrics | None = None
    ) -> None:
        self.spec = spec
        self.fingerprint = fingerprint(spec)
        self.versions: dict[str, ServedModel] = {s.version: make(s) for s in spec.version_specs()}
        self.reason = ""
        self.lock = asyncio.Lock()
        self._prints = {s.version: fingerprint(s) for s in spec.version_specs()}
        self._make = make
        self._metrics = metrics

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def serving(self) -> bool:
        """True when at least one version is ready."""
        return any(m.state == ModelState.READY for m in self.versions.values())

    def loading_tasks(self) -> list[asyncio.Task[None]]:
        return [m.loading for m in self.versions.values() if m.loading is not None and not m.loading.done()]

    async def settle(self) -> None:
        """Wait for loads in progress (e.g. the first one, started by the data plane)."""
        tasks = self.loading_tasks()
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)

    def statuses(self) -> list[ModelStatus]:
        """One status per served version, oldest first."""
        return [self.versions[v].status() for v in sorted(self.versions, key=int)]

    def select(self, version: str | None) -> ServedModel:
        """The model a request for ``version`` runs on (None or "": the newest ready one).

        Raises:
            VersionNotFoundError: the entry does not serve ``version``.
        """
        if version:
            model = self.versions.get(version)
            if model is None:
                served = ", ".join(sorted(self.versions, key=int)) or "none"
                raise VersionNotFoundError(
                    f"model {self.name!r} has no version {version!r}; served versions: {served}"
                )
            return model
        ordered = [self.versions[v] for v in sorted(self.versions, key=int)]
        ready = [m for m in ordered if m.state == ModelState.READY]
        return (ready or ordered)[-1]

    def changed(self, spec: ModelSpec) -> bool:
        """True when ``spec`` (or a file it names) differs from what was last applied."""
        return fingerprint(spec) != self.fingerprint

    async def apply(self, spec: ModelSpec) -> None:
        """Serve ``spec``'s versions: load new and changed ones beside the current ones, swap, free.

        Call with :attr:`lock` held.

        Raises:
            ModelLoadError: a version failed to load; the versions served before (if any)
                keep serving and :attr:`reason` says why.
        """
        await self.settle()
        self.fingerprint = fingerprint(spec)
        wanted: dict[str, ServedModel] = {}
        prints = {s.version: fingerprint(s) for s in spec.version_specs()}
        for version_spec in spec.version_specs():
            current = self.versions.get(version_spec.version)
            unchanged = self._prints.get(version_spec.version) == prints[version_spec.version]
            if current is not None and current.state == ModelState.READY and unchanged:
                wanted[version_spec.version] = current
            else:
                wanted[version_spec.version] = self._make(version_spec)
        fresh = [m for v, m in wanted.items() if m is not self.versions.get(v)]
        await asyncio.gather(*(m.start_loading() for m in fresh))
        failed = [m for m in fresh if m.state != ModelState.READY]
        if failed and self.serving:
            for model in fresh:
                await model.teardown()
            why = "; ".join(f"version {m.spec.version}: {m.error}" for m in failed)
            self.reason = f"reload failed, the previous load keeps serving: {why}"
            logger.error("model %s: %s", self.name, self.reason)
            raise ModelLoadError(f"model {self.name!r} failed to load: {why}")
        replaced = [m for v, m in self.versions.items() if wanted.get(v) is not m]
        self.versions, self.spec, self._prints, self.reason = wanted, spec, prints, ""
        if fresh:
            logger.info("model %s: now serving version(s) %s", self.name, ", ".join(sorted(wanted, key=int)))
        await asyncio.gather(*(self._retire(m) for m in replaced))
        if failed:
            why = "; ".join(f"version {m.spec.version}: {m.error}" for m in failed)
            raise ModelLoadError(f"model {self.name!r} failed to load: {why}")

    async def _retire(self, model: ServedModel) -> None:
        """Free a model no longer served once the requests holding it are done."""
        await model.wait_idle()
        await model.teardown()
        model.state = ModelState.UNLOADED
        version = model.spec.version
        if self._metrics is not None and version not in self.versions:
            self._metrics.forget_version(model.spec.name, version)

    async def unload(self) -> None:
        """Refuse new requests for every version, let the ones holding them finish, free them.

        Call with :attr:`lock` held.
        """
        await self.settle()
        self.reason = ""
        for model in self.versions.values():
            await model.set_state(ModelState.UNLOADED)
        for model in self.versions.values():
            await model.wait_idle()
            await model.teardown()
