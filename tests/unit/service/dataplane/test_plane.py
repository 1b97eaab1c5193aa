"""The transport-neutral data plane with fake models, in plain asyncio."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from cvserve.config import ServerConfig
from cvserve.dataplane.model_state import ModelState
from cvserve.dataplane.plane import DataPlane
from cvserve.errors import (
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    ServerDrainingError,
    VersionNotFoundError,
)
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Task
from tests.fixtures.fake_models import build_fake


def spec(name: str, task: Task = Task.INSTANCE, **options: object) -> ModelSpec:
    return ModelSpec(name=name, task=task, config="fake", max_batch_size=4, max_wait_ms=5, options=options)


def image(value: int = 200) -> np.ndarray:
    img = np.zeros((8, 10, 3), np.uint8)
    img[..., 0] = value
    return img


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 20))


def plane(*specs: ModelSpec, **config: object) -> DataPlane:
    return DataPlane(specs, ServerConfig(worker_threads=2, **config), builder=build_fake)


def test_models_load_in_background_then_serve() -> None:
    async def main() -> None:
        dp = plane(spec("det"), spec("seg", Task.SEMANTIC), spec("slow", load_delay_ms=300))
        changes: list[list[str]] = []

        async def listener() -> None:
            changes.append([m.state for m in dp.models()])

        dp.add_listener(listener)
        await dp.start()
        assert dp.get("slow").state == ModelState.LOADING
        with pytest.raises(ModelNotReadyError, match="loading"):
            await dp.infer("slow", [image()])
        await dp.wait_loaded(10)
        assert all(m.ready for m in dp.models())
        assert changes[-1] == ["ready", "ready", "ready"]
        (pred,) = await dp.infer("det", [image()])
        assert pred.image_size == (8, 10) and pred.instances[0].category_id == 0
        (seg,) = await dp.infer("seg", [image()])
        assert seg.semantic.labels.shape == (8, 10)
        await dp.close()

    run(main())


def test_warm_up_runs_the_whole_path_before_ready_and_is_not_counted() -> None:
    async def main() -> None:
        dp = plane(spec("det"))
        await dp.start()
        await dp.wait_loaded(10)
        assert dp.model_object("det").batch_sizes == [4]  # the warm-up: one full batch
        assert dp.stats("det").inference_count == 0
        no_warmup = plane(spec("det"), warmup=False)
        await no_warmup.start()
        await no_warmup.wait_loaded(10)
        assert no_warmup.model_object("det").batch_sizes == []
        await dp.close()
        await no_warmup.close()

    run(main())


def test_failed_load_is_reported_and_others_keep_serving() -> None:
    async def main() -> None:
        dp = plane(spec("bad", load_error="disk on fire"), spec("det"))
        await dp.start()
        await dp.wait_loaded(10)
        bad = dp.get("bad")
        assert bad.state == ModelState.FAILED and "disk on fire" in bad.error
        with pytest.raises(ModelNotReadyError, match="disk on fire"):
            await dp.infer("bad", [image()])
        with pytest.raises(ModelLoadError, match="disk on fire"):
            await dp.load("bad")
        assert (await dp.infer("det", [image()]))[0].instances
        await dp.close()

    run(main())


def test_lookup_errors() -> None:
    async def main() -> None:
        dp = plane(spec("det"))
        with pytest.raises(ModelNotFoundError, match="unknown model 'x'; served models: det"):
            await dp.infer("x", [image()])
        with pytest.raises(VersionNotFoundError):
            dp.get("det", "7")
        with pytest.raises(ModelNotFoundError):
            await dp.load("../../etc/passwd")  # only repository names, never paths
        assert dp.is_ready("x") is False

    run(main())


def test_per_image_errors_are_returned_not_raised() -> None:
    async def main() -> None:
        dp = plane(spec("det", fail_forward_on_red=True))
        await dp.start()
        await dp.wait_loaded(10)
        red = np.zeros((4, 4, 3), np.uint8)
        red[..., 0] = 255
        results = await dp.infer("det", [image(), red])
        assert all(isinstance(r, RuntimeError) for r in results)  # batch-wide failure
        (ok,) = await dp.infer("det", [image()])
        assert ok.instances
        stats = dp.stats("det")
        assert stats.failure.count == 2 and stats.success.count == 1
        await dp.close()

    run(main())


def test_unload_then_load_again() -> None:
    async def main() -> None:
        dp = plane(spec("det"))
        await dp.start()
        await dp.wait_loaded(10)
        await dp.unload("det")
        assert dp.get("det").state == ModelState.UNLOADED
        with pytest.raises(ModelNotReadyError, match="unloaded"):
            await dp.infer("det", [image()])
        status = await dp.load("det")
        assert status.ready and (await dp.infer("det", [image()]))[0].instances
        await dp.close()

    run(main())


def test_drain_refuses_new_work_and_waits_for_in_flight() -> None:
    async def main() -> None:
        dp = plane(spec("det", delay_ms=200))
        await dp.start()
        await dp.wait_loaded(10)
        in_flight = asyncio.ensure_future(dp.infer("det", [image()]))
        await asyncio.sleep(0.05)
        assert await dp.drain(5.0) is True
        assert in_flight.done() and in_flight.result()[0].instances
        with pytest.raises(ServerDrainingError):
            await dp.infer("det", [image()])
        assert not dp.is_ready("det")
        await dp.close()

    run(main())


def test_cpu_work_runs_in_the_pool_and_forward_in_the_model_thread() -> None:
    seen: dict[str, str] = {}
    model = build_fake(spec("det"))
    forward, preprocess = model.forward, model.preprocess

    def spy_forward(inputs):  # type: ignore[no-untyped-def]
        seen["forward"] = threading.current_thread().name
        return forward(inputs)

    def spy_preprocess(img):  # type: ignore[no-untyped-def]
        seen["preprocess"] = threading.current_thread().name
        return preprocess(img)

    model.forward, model.preprocess = spy_forward, spy_preprocess  # type: ignore[method-assign]

    async def main() -> None:
        dp = DataPlane([spec("det")], ServerConfig(worker_threads=2), builder=lambda s: model)
        await dp.start()
        await dp.wait_loaded(10)
        await dp.infer("det", [image()])
        await dp.close()

    run(main())
    assert seen["preprocess"].startswith("cvserve-cpu") and seen["forward"].startswith("model-det")


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="duplicate model name"):
        plane(spec("a"), spec("a"))


def test_close_while_a_model_is_loading() -> None:
    async def main() -> None:
        dp = plane(spec("slow", load_delay_ms=300))
        await dp.start()
        await dp.close()
        assert dp.get("slow").state == ModelState.LOADING
        with pytest.raises(ServerDrainingError):
            await dp.infer("slow", [image()])

    run(main())


def test_requests_without_masks_reach_the_model() -> None:
    async def main() -> None:
        dp = plane(spec("det"))
        await dp.start()
        await dp.wait_loaded(10)
        model = dp.model_object("det")
        assert model is not None
        asked: list[bool] = []
        prepare = model.prepare

        def recording(img: np.ndarray, *, masks: bool = True) -> object:
            asked.append(masks)
            return prepare(img, masks=masks)

        model.prepare = recording  # type: ignore[method-assign]
        await dp.infer("det", [image()])
        await dp.infer("det", [image(), image(50)], masks=False)
        assert asked == [True, False, False]
        await dp.close()

    run(main())
