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
    assert sample("cvserve_max_batch_size", {"model": "auto", "policy": "auto"}) == 2
    assert sample("cvserve_max_batch_size", {"model": "fixed", "policy": "fixed"}) == 3


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
