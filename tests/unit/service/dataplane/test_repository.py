"""The repository at run time in the data plane: re-read on load, swaps beside the serving
version, versions and their policy, the index; fake models, plain asyncio."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from cvserve.config import ServerConfig
from cvserve.dataplane.model_state import ModelState
from cvserve.dataplane.plane import DataPlane
from cvserve.dataplane.repository import Change, file_source
from cvserve.errors import ModelLoadError, ModelNotFoundError, RepositoryFileError, VersionNotFoundError
from cvserve.metrics import Metrics
from cvserve.models.repository import load_repository
from tests.fixtures.fake_models import build_fake


def write(path: Path, *models: dict[str, Any]) -> Path:
    entries = [{"config": "fake", "max_wait_ms": 1, **m} for m in models]
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


def plane(path: Path, metrics: Metrics | None = None) -> DataPlane:
    config = ServerConfig(worker_threads=2, warmup_image_size=8)
    specs = load_repository(path)
    return DataPlane(specs, config, builder=build_fake, source=file_source(path), metrics=metrics)


def image() -> np.ndarray:
    img = np.zeros((8, 10, 3), np.uint8)
    img[..., 0] = 200
    return img


async def score(dp: DataPlane, name: str = "det", version: str | None = None) -> float:
    (outcome,) = await dp.infer_timed(name, [image()], version=version)
    assert outcome.error is None and outcome.prediction is not None
    return outcome.prediction.instances[0].score


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


async def started(path: Path, metrics: Metrics | None = None) -> DataPlane:
    dp = plane(path, metrics)
    await dp.start()
    await dp.wait_loaded(10)
    return dp


def test_load_rereads_the_file_and_swaps_a_changed_entry(tmp_path: Path) -> None:
    path = write(tmp_path / "models.yaml", {"name": "det", "task": "instance"})

    async def main() -> None:
        dp = await started(path)
        before = await score(dp)
        old = weakref.ref(dp.model_object("det"))
        await dp.load("det")  # unchanged: left alone
        assert dp.model_object("det") is old()
        write(path, {"name": "det", "task": "instance", "options": {"score_scale": 0.5}})
        status = await dp.load("det")
        assert status.ready and status.spec.options["score_scale"] == 0.5
        assert await score(dp) == pytest.approx(before * 0.5, abs=1e-6)
        gc.collect()
        assert old() is None  # the replaced model is freed: one copy in memory
        await dp.close()

    run(main())


def test_a_config_file_written_anew_is_a_change(tmp_path: Path) -> None:
    # As Triton's poll mode: the files an entry names count, not only the entry's fields.
    config = tmp_path / "det.yaml"
    config.write_text("a: 1\n")
    path = write(tmp_path / "models.yaml", {"name": "det", "task": "instance", "config": str(config)})

    async def main() -> None:
        dp = await started(path)
        first = dp.model_object("det")
        await dp.load("det")
        assert dp.model_object("det") is first  # nothing changed: not reloaded
        config.write_text("a: 2\nb: 3\n")
        assert (await dp.load("det")).ready
        assert dp.model_object("det") is not first
        await dp.close()

    run(main())


def test_a_new_entry_loads_and_an_unknown_name_is_not_found(tmp_path: Path) -> None:
    path = write(tmp_path / "models.yaml", {"name": "det", "task": "instance"})

    async def main() -> None:
        dp = await started(path)
        write(path, {"name": "det", "task": "instance"}, {"name": "seg", "task": "semantic"})
        assert [(e.name, e.state, e.reason) for e in dp.repository_index()][1] == (
            "seg",
            ModelState.UNLOADED,
            "not loaded: new in the repository",
        )
        assert (await dp.load("seg")).ready
        assert [m.name for m in dp.models()] == ["det", "seg"]
        with pytest.raises(ModelNotFoundError, match=r"'x' is not in the repository \(it has: det, seg\)"):
            await dp.load("x")
        await dp.close()

    run(main())


def test_a_failed_reload_or_an_invalid_file_changes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path / "models.yaml", {"name": "det", "task": "instance"})

    async def main() -> None:
        dp = await started(path)
        model = dp.model_object("det")
        write(path, {"name": "det", "task": "instance", "options": {"load_error": "corrupt checkpoint"}})
        with pytest.raises(ModelLoadError, match="corrupt checkpoint"):
            await dp.load("det")
        assert dp.model_object("det") is model and dp.is_ready("det")
        (row,) = dp.repository_index()
        assert row.state == ModelState.READY
        assert (
            row.reason
            == "reload failed, the previous load keeps serving: version 1: RuntimeError: corrupt checkpoint"
        )
        assert await dp.reload_repository() == []  # the failed attempt is not retried until the entry changes

        path.write_text("models: [{name: det, task: instance, config: fake, max_batch_size: 0}]")
        for attempt in (dp.load("det"), dp.reload_repository()):
            with pytest.raises(RepositoryFileError, match=r"models\.yaml: models\[0\]\.max_batch_size"):
                await attempt
        (row,) = dp.repository_index()
        assert row.state == ModelState.READY and "repository not applied" in row.reason
        assert dp.model_object("det") is model and await score(dp) > 0
        await dp.close()

    run(main())


def test_reload_applies_new_changed_and_removed_entries(tmp_path: Path) -> None:
    path = write(
        tmp_path / "models.yaml", {"name": "det", "task": "instance"}, {"name": "old", "task": "semantic"}
    )

    async def main() -> None:
        dp = await started(path)
        assert await dp.reload_repository() == []
        write(
            path,
            {"name": "det", "task": "instance", "max_batch_size": 2},
            {"name": "new", "task": "semantic"},
            {"name": "bad", "task": "semantic", "options": {"load_error": "no such file"}},
        )
        rows = [(e.name, e.reason) for e in dp.repository_index()]
        assert ("det", "changed in the repository, not applied yet") in rows
        assert ("old", "removed from the repository, serving until unloaded") in rows
        changes = await dp.reload_repository()
        assert changes == [
            Change("det", "reload"),
            Change("new", "load"),
            Change("bad", "load", "model 'bad' failed to load: version 1: RuntimeError: no such file"),
            Change("old", "unload"),
        ]
        assert {m.name: m.state for m in dp.models()} == {"det": "ready", "new": "ready", "bad": "failed"}
        assert dp.get("det").spec.max_batch_size == 2
        with pytest.raises(ModelNotFoundError):
            dp.get("old")
        await dp.close()

    run(main())


def test_requests_holding_the_old_model_finish_on_it(tmp_path: Path) -> None:
    path = write(tmp_path / "models.yaml", {"name": "det", "task": "instance", "options": {"delay_ms": 300}})

    async def main() -> None:
        dp = await started(path)
        before = await score(dp)
        old = dp.model_object("det")
        in_flight = [asyncio.ensure_future(score(dp)) for _ in range(3)]
        await asyncio.sleep(0.05)
        write(path, {"name": "det", "task": "instance", "options": {"score_scale": 0.25}})
        await dp.load("det")  # returns once the old model is freed
        assert [f.done() for f in in_flight] == [True] * 3
        assert [f.result() for f in in_flight] == [before] * 3  # ran on the old model
        assert old is not None and old.ready is False and dp.model_object("det") is not old
        assert await score(dp) == pytest.approx(before * 0.25, abs=1e-6)
        await dp.close()

    run(main())


def test_unload_of_an_entry_removed_from_the_file_forgets_it(tmp_path: Path) -> None:
    path = write(
        tmp_path / "models.yaml", {"name": "det", "task": "instance"}, {"name": "gone", "task": "semantic"}
    )

    async def main() -> None:
        dp = await started(path)
        write(path, {"name": "det", "task": "instance"})
        with pytest.raises(ModelNotFoundError, match="it serves until unloaded"):
            await dp.load("gone")
        await dp.unload("gone")
        assert [m.name for m in dp.models()] == ["det"]
        with pytest.raises(ModelNotFoundError):
            await dp.unload("gone")
        await dp.unload("det")  # still in the file: listed as unloaded
        assert [(e.name, e.state, e.reason) for e in dp.repository_index()] == [
            ("det", "unloaded", "unloaded")
        ]
        await dp.close()

    run(main())


def versions(tmp_path: Path, **scales: float) -> Path:
    """Version folders whose fake "checkpoints" scale the scores: ``versions(v1=1.0, v2=0.5)``."""
    root = tmp_path / "det"
    for key, scale in scales.items():
        (root / key[1:]).mkdir(parents=True, exist_ok=True)
        (root / key[1:] / "model_final.pth").write_text(json.dumps({"score_scale": scale}))
    return root


def test_versions_follow_the_policy(tmp_path: Path) -> None:
    versions(tmp_path, v1=1.0, v2=0.5)
    entry = {"name": "det", "task": "instance", "weights": "det", "version_policy": {"latest": 2}}
    path = write(tmp_path / "models.yaml", entry)

    metrics = Metrics()
    ready = metrics.registry.get_sample_value

    async def main() -> None:
        dp = await started(path, metrics)
        assert [(m.version, m.ready) for m in dp.models()] == [("1", True), ("2", True)]
        assert ready("cvserve_model_ready", {"model": "det", "version": "1"}) == 1.0
        full = await score(dp, version="1")
        assert await score(dp) == await score(dp, version="2") == pytest.approx(full * 0.5, abs=1e-6)
        (outcome,) = await dp.infer_timed("det", [image()])
        assert outcome.version == "2"  # no version asked: the newest ready one
        with pytest.raises(VersionNotFoundError, match="no version '3'; served versions: 1, 2"):
            await dp.infer("det", [image()], version="3")
        assert dp.is_ready("det", "2") and not dp.is_ready("det", "3")

        kept = dp.model_object("det", "2")
        versions(tmp_path, v3=0.25)
        await dp.load("det")
        assert dp.versions("det") == ["2", "3"]
        assert dp.model_object("det", "2") is kept  # unchanged versions are not reloaded
        assert await score(dp) == pytest.approx(full * 0.25, abs=1e-6)
        with pytest.raises(VersionNotFoundError):
            await dp.infer("det", [image()], version="1")
        assert ready("cvserve_model_ready", {"model": "det", "version": "1"}) is None  # gauge removed
        assert ready("cvserve_model_ready", {"model": "det", "version": "3"}) == 1.0
        assert ready("cvserve_queue_depth", {"model": "det", "version": "3"}) == 0.0
        await dp.close()

    run(main())
