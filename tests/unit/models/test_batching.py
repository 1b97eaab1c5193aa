"""Choosing ``max_batch_size`` from measured per-image cost: costs are injected, never timed."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from cvserve.config import ServerConfig
from cvserve.dataplane.plane import DataPlane
from cvserve.metrics import Metrics
from cvserve.models import batching as batch_policy
from cvserve.models.repository import AUTO_BATCH_LIMIT, ModelSpec, RepositoryError, load_repository
from cvserve.models.types import Task
from cvserve.vision.servicer import model_info
from tests.fixtures.fake_models import build_fake


def cost(per_image_ms: dict[int, float]) -> tuple[Callable[[int], float], list[int]]:
    """A fake ``measure``: forward seconds = size x the given per-image cost; records calls."""
    calls: list[int] = []

    def measure(size: int) -> float:
        calls.append(size)
        return size * per_image_ms[size] / 1000

    return measure, calls


def test_cpu_like_costs_keep_batch_one_and_stop_early() -> None:
    measure, calls = cost({1: 45.0, 2: 52.0, 4: 60.0, 8: 70.0})
    decision = batch_policy.choose_batch_size(measure, [1, 2, 4, 8])
    assert decision.size == 1
    assert calls == [1, 2]  # batch 2 did not help: larger sizes are not tried
    assert decision.per_image_s == {1: pytest.approx(0.045), 2: pytest.approx(0.052)}


def test_gpu_like_costs_pick_the_cheapest_image() -> None:
    measure, calls = cost({1: 20.0, 2: 11.0, 4: 6.0, 8: 5.0})
    decision = batch_policy.choose_batch_size(measure, [1, 2, 4, 8])
    assert decision.size == 8 and calls == [1, 2, 4, 8]


def test_a_gain_within_tolerance_prefers_the_smaller_batch() -> None:
    # 4 costs 2 % less per image than 2: not worth the extra latency at a 5 % tolerance.
    measure, calls = cost({1: 20.0, 2: 10.0, 4: 9.8, 8: 5.0})
    assert batch_policy.choose_batch_size(measure, [1, 2, 4, 8], tolerance=0.05).size == 2
    assert calls == [1, 2, 4]
    measure, _ = cost({1: 20.0, 2: 10.0, 4: 9.8, 8: 5.0})
    assert batch_policy.choose_batch_size(measure, [1, 2, 4, 8], tolerance=0.0).size == 8


@pytest.mark.parametrize(
    ("limit", "sizes"), [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8]), (12, [1, 2, 4, 8, 12])]
)
def test_candidate_sizes(limit: int, sizes: list[int]) -> None:
    assert batch_policy.candidate_sizes(limit) == sizes


@pytest.mark.parametrize(
    ("sizes", "tolerance", "measured", "message"),
    [
        ([], 0.05, 1.0, "increasing"),
        ([2, 1], 0.05, 1.0, "increasing"),
        ([0, 1], 0.05, 1.0, "increasing"),
        ([1, 2], 1.0, 1.0, "tolerance"),
        ([1, 2], 0.05, 0.0, "positive time"),
        ([1, 2], 0.05, float("nan"), "positive time"),
    ],
)
def test_bad_arguments_are_refused(sizes: list[int], tolerance: float, measured: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        batch_policy.choose_batch_size(lambda size: measured, sizes, tolerance=tolerance)
    with pytest.raises(ValueError, match=">= 1"):
        batch_policy.candidate_sizes(0)


def test_repository_accepts_auto_and_explicit_numbers(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  - {name: a, task: instance, config: c, max_batch_size: auto}\n"
        "  - {name: b, task: instance, config: c, max_batch_size: 4}\n"
    )
    auto, fixed = load_repository(path)
    assert (auto.batching, auto.max_batch_size) == ("auto", AUTO_BATCH_LIMIT)
    assert (fixed.batching, fixed.max_batch_size) == ("fixed", 4)
    path.write_text("models:\n  - {name: a, task: instance, config: c, max_batch_size: fast}\n")
    with pytest.raises(RepositoryError, match=r"models\[0\]\.max_batch_size: .* or auto, got 'fast'"):
        load_repository(path)


def test_dataplane_runs_the_chosen_size_and_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The data plane measures at load (here: injected costs), serves with the choice, exposes it."""
    measure, calls = cost({1: 20.0, 2: 11.0, 4: 10.9, 8: 5.0})
    monkeypatch.setattr(batch_policy, "forward_timer", lambda model, image: measure)
    specs = [
        ModelSpec(name="auto", task=Task.INSTANCE, config="-", max_batch_size=8, batching="auto"),
        ModelSpec(name="fixed", task=Task.INSTANCE, config="-", max_batch_size=3),
    ]
    metrics = Metrics()
    config = ServerConfig(worker_threads=2)

    async def main() -> None:
        dp = DataPlane(specs, config, builder=build_fake, metrics=metrics)
        await dp.start()
        await dp.wait_loaded(10)
        assert calls == [1, 2, 4]  # the fixed model was never measured
        assert model_info(dp.get("auto"), config).batching.max_batch_size == 2
        assert model_info(dp.get("fixed"), config).batching.max_batch_size == 3
        await dp.close()

    asyncio.run(asyncio.wait_for(main(), 20))
    sample = metrics.registry.get_sample_value
    assert sample("cvserve_max_batch_size", {"model": "auto", "version": "1", "policy": "auto"}) == 2
    assert sample("cvserve_max_batch_size", {"model": "fixed", "version": "1", "policy": "fixed"}) == 3


def test_in_process_runs_measure_auto_as_the_server_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """annotate and eval load through load_for_inference: ``auto`` means the measured size there too."""
    measure, calls = cost({1: 20.0, 2: 11.0, 4: 10.9, 8: 5.0})
    monkeypatch.setattr(batch_policy, "forward_timer", lambda model, image: measure)
    spec = ModelSpec(
        name="auto", task=Task.INSTANCE, config="-", max_batch_size=8, batching="auto",
        handler="tests.fixtures.fake_models:build_fake",
    )  # fmt: skip
    model, tuned = batch_policy.load_for_inference(spec)
    assert (tuned.max_batch_size, calls) == (2, [1, 2, 4])
    assert model.ready
    fixed, calls[:] = dataclasses.replace(spec, batching="fixed", max_batch_size=3), []
    assert batch_policy.load_for_inference(fixed)[1].max_batch_size == 3
    assert calls == []


class ClockedGpuModel:
    """A fake model on ``cuda:0`` whose forward advances a fake clock by its cost and runs out
    of memory (``torch.cuda.OutOfMemoryError``) above ``fits`` images."""

    device = "cuda:0"

    def __init__(self, per_image_ms: dict[int, float], fits: int) -> None:
        self.per_image_ms, self.fits, self.now, self.sizes = per_image_ms, fits, 0.0, []

    def clock(self) -> float:
        return self.now

    def preprocess(self, image: object) -> object:
        return image

    def forward(self, batch: list[object]) -> list[object]:
        import torch

        self.sizes.append(len(batch))
        if len(batch) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        self.now += len(batch) * self.per_image_ms[len(batch)] / 1000
        return batch


GPU_COSTS = {1: 20.0, 2: 11.0, 4: 6.0, 8: 4.0, 16: 3.0, 32: 2.5}
AUTO = ModelSpec(
    name="auto", task=Task.INSTANCE, config="-", max_batch_size=AUTO_BATCH_LIMIT, batching="auto"
)


def test_on_a_gpu_auto_searches_beyond_8_and_stops_at_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ClockedGpuModel(GPU_COSTS, fits=16)
    monkeypatch.setattr(batch_policy.time, "perf_counter", model.clock)
    tuned = batch_policy.tune_batch_size(model, AUTO)  # type: ignore[arg-type]
    assert tuned.max_batch_size == 16  # cheapest image among the sizes that fit; loading went on
    assert max(model.sizes) == 32  # 32 was tried once, ran out of memory, and was dropped
    assert batch_policy.auto_batch_limit(AUTO, "cuda:0") == batch_policy.GPU_AUTO_BATCH_LIMIT == 32
    assert batch_policy.auto_batch_limit(AUTO, "cpu") == AUTO_BATCH_LIMIT == 8


def test_out_of_memory_measures_as_infinitely_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ClockedGpuModel(GPU_COSTS, fits=2)
    monkeypatch.setattr(batch_policy.time, "perf_counter", model.clock)
    measure = batch_policy.forward_timer(model, batch_policy.busy_image(48, 64))
    assert measure(2) == pytest.approx(0.022)
    assert measure(4) == float("inf")


def test_a_model_that_cannot_fit_one_image_fails_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    model = ClockedGpuModel(GPU_COSTS, fits=0)
    monkeypatch.setattr(batch_policy.time, "perf_counter", model.clock)
    with pytest.raises(MemoryError, match="a single image runs out of memory on cuda:0"):
        batch_policy.tune_batch_size(model, AUTO)  # type: ignore[arg-type]


def test_the_measurement_image_is_busy_and_deterministic() -> None:
    a, b = batch_policy.busy_image(480, 640), batch_policy.busy_image(480, 640)
    assert a.shape == (480, 640, 3) and a.dtype.name == "uint8" and (a == b).all()
    colours = {tuple(c) for c in a.reshape(-1, 3)[::97]}
    assert len(colours) > 1000  # textured, unlike the smooth warm-up ramp
