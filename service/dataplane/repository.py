"""The repository file at run time: explicit load and unload, applying the whole file, the index.

Like Triton's model control, every operation re-reads the repository (through a
:data:`RepositorySource`, usually :func:`file_source`) instead of trusting what was read
at start:

* :meth:`RepositorySync.load` (``RepositoryModelLoad``, ``cvserve.v1`` ``LoadModel``) loads
  an entry new in the file, or reloads an entry whose fields or files changed, beside the
  version serving (:meth:`~cvserve.dataplane.versions.ServedVersions.apply`); an unchanged,
  ready entry is left alone;
* :meth:`RepositorySync.unload` unloads an entry; one no longer in the file is forgotten;
* :meth:`RepositorySync.reload` applies every change of the file at once: new entries
  load, changed ones reload, removed ones unload (Triton's poll mode; ``--poll-repository``,
  SIGHUP and ``ReloadRepository`` call it). Only changes are applied: an entry unloaded
  on request, or one that failed, is retried when its entry or files change;
* :meth:`RepositorySync.index` lists every entry of the file with its state and reason.

A file that cannot be read or does not validate changes nothing: the operation fails
with :class:`~cvserve.errors.RepositoryFileError` naming the file and field.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cvserve.dataplane.model_state import ModelState, ModelStatus
from cvserve.dataplane.versions import ServedVersions
from cvserve.errors import ModelLoadError, ModelNotFoundError, RepositoryFileError
from cvserve.models.repository import ModelSpec, RepositoryError, load_repository

__all__ = ["Change", "IndexEntry", "RepositorySource", "RepositorySync", "file_source"]

logger = logging.getLogger(__name__)

RepositorySource = Callable[[], list[ModelSpec]]
"""Reads the repository; raises :class:`~cvserve.models.repository.RepositoryError` when it is invalid."""


def file_source(path: str | os.PathLike[str]) -> RepositorySource:
    """A source re-reading the repository YAML at ``path`` at every call."""
    return lambda: load_repository(path)


@dataclass(frozen=True)
class Change:
    """One change :meth:`RepositorySync.reload` applied (or tried to).

    Attributes:
        name: the model.
        action: ``load`` (new entry), ``reload`` (changed entry) or ``unload`` (removed entry).
        error: why it failed, empty when it succeeded.
    """

    name: str
    action: str
    error: str = ""


@dataclass(frozen=True)
class IndexEntry:
    """One version of one entry of the repository: its :class:`ModelState` and why it is not ready."""

    name: str
    version: str
    state: str
    reason: str = ""


class RepositorySync:
    """Keeps the data plane's entries in line with the repository.

    Args:
        source: reads the repository.
        entries: the data plane's entries by name (changed in place).
        new_entry: builds the entry of a spec (models not loaded yet).
        notify: awaited after entries were added or removed.
    """

    def __init__(
        self,
        source: RepositorySource,
        entries: dict[str, ServedVersions],
        new_entry: Callable[[ModelSpec], ServedVersions],
        notify: Callable[[], Awaitable[None]],
    ) -> None:
        self._source = source
        self._entries = entries
        self._new_entry = new_entry
        self._notify = notify
        self._lock = asyncio.Lock()

    def read(self) -> list[ModelSpec]:
        """The repository as it is now.

        Raises:
            RepositoryFileError: it cannot be read or does not validate.
        """
        try:
            return self._source()
        except RepositoryError as e:
            raise RepositoryFileError(f"repository not applied, nothing changed: {e}") from None

    async def load(self, name: str) -> ServedVersions:
        """Load or reload entry ``name`` as the repository gives it now.

        Raises:
            RepositoryFileError: the repository is invalid; nothing changed.
            ModelNotFoundError: ``name`` is not in the repository.
            ModelLoadError: a version failed to load; what served before still serves.
        """
        spec = next((s for s in self.read() if s.name == name), None)
        if spec is None:
            known = ", ".join(sorted(s.name for s in self.read())) or "none"
            extra = "; it serves until unloaded" if name in self._entries else ""
            raise ModelNotFoundError(f"model {name!r} is not in the repository (it has: {known}){extra}")
        return await self._apply(spec)

    async def _apply(self, spec: ModelSpec) -> ServedVersions:
        entry = self._entries.get(spec.name)
        if entry is None:
            entry = self._entries[spec.name] = self._new_entry(spec)
            await self._notify()
        async with entry.lock:
            try:
                await entry.apply(spec)
            finally:
                await self._notify()  # readiness follows the swap
        return entry

    async def unload(self, name: str) -> None:
        """Unload every version of ``name``; forget it when the repository no longer has it.

        Raises:
            ModelNotFoundError: no entry of that name is served or in the repository.
        """
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ModelNotFoundError(f"unknown model {name!r}; served models: {known}")
        async with entry.lock:
            await entry.unload()
        try:
            in_file = any(s.name == name for s in self._source())
        except RepositoryError:
            in_file = True  # cannot tell: keep listing it
        if not in_file and self._entries.get(name) is entry:
            del self._entries[name]
            await self._notify()

    async def reload(self) -> list[Change]:
        """Apply every change of the repository: load new, reload changed, unload removed entries.

        Raises:
            RepositoryFileError: the repository is invalid; nothing changed.
        """
        async with self._lock:
            specs = self.read()
            changes: list[Change] = []
            for spec in specs:
                entry = self._entries.get(spec.name)
                if entry is not None and not entry.changed(spec):
                    continue
                action = "load" if entry is None else "reload"
                try:
                    await self._apply(spec)
                    changes.append(Change(spec.name, action))
                except ModelLoadError as e:
                    changes.append(Change(spec.name, action, e.message))
            names = {s.name for s in specs}
            for name in [n for n in self._entries if n not in names]:
                await self.unload(name)
                changes.append(Change(name, "unload"))
            for change in changes:
                if change.error:
                    logger.error("repository: %s %s failed: %s", change.action, change.name, change.error)
                else:
                    logger.info("repository: %s %s", change.action, change.name)
            return changes

    def index(self) -> list[IndexEntry]:
        """Every entry of the repository (and every served entry no longer in it), per version."""
        try:
            specs, problem = self.read(), ""
        except RepositoryFileError as e:
            specs, problem = [entry.spec for entry in self._entries.values()], e.message
        rows: list[IndexEntry] = []
        for spec in specs:
            entry = self._entries.get(spec.name)
            if entry is None:
                rows.extend(
                    IndexEntry(spec.name, s.version, ModelState.UNLOADED, "not loaded: new in the repository")
                    for s in spec.version_specs()
                )
                continue
            pending = "changed in the repository, not applied yet" if entry.changed(spec) else ""
            rows.extend(_row(status, entry.reason, pending, problem) for status in entry.statuses())
        listed = {s.name for s in specs}
        for name, entry in self._entries.items():
            if name not in listed:
                gone = "removed from the repository, serving until unloaded"
                rows.extend(_row(status, entry.reason, gone, problem) for status in entry.statuses())
        return rows


def _row(status: ModelStatus, *notes: str) -> IndexEntry:
    own = {ModelState.FAILED: status.error, ModelState.UNLOADED: "unloaded"}.get(status.state, "")
    reason = "; ".join(note for note in (own, *notes) if note)
    return IndexEntry(status.name, status.version, status.state, reason)
