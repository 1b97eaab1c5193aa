"""Where the Ray engine's actors run, decided without starting Ray."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cvserve.annotation import ray_engine
from cvserve.annotation.ray_engine import ActorPlacement, RayPredictor, plan_actors
from cvserve.annotation.worker import RenderOptions, WorkItem
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Task

SPEC = ModelSpec(
    name="fake-det", task=Task.INSTANCE, config="unused", handler="tests.fixtures.fake_models:build_fake"
)


@pytest.mark.parametrize(
    ("device", "gpus", "cpus", "actors", "per_actor", "expected"),
    [
        ("cpu", 4, 16, None, None, ActorPlacement(8, 0.0, "cpu")),  # cpu reserves no GPU
        ("auto", 0, 16, None, None, ActorPlacement(8, 0.0, "cpu")),
        ("auto", 4, 16, None, None, ActorPlacement(4, 1.0, "cuda")),  # one actor per GPU
        ("auto", 4, 16, None, 0.5, ActorPlacement(8, 0.5, "cuda")),  # two actors share each GPU
        ("auto", 4, 16, None, 0, ActorPlacement(8, 0.0, "cpu")),  # GPUs declined: the CPU
        ("cuda:1", 2, 8, None, None, ActorPlacement(2, 1.0, "cuda")),  # each actor sees its GPU as cuda:0
        ("cuda", 2, 8, 1, None, ActorPlacement(1, 1.0, "cuda")),
        ("cuda", 8, 8, None, 2, ActorPlacement(4, 2.0, "cuda")),
        ("auto", 0, 1, None, None, ActorPlacement(1, 0.0, "cpu")),  # at least one actor
    ],
)
def test_plan(
    device: str,
    gpus: float,
    cpus: float,
    actors: int | None,
    per_actor: float | None,
    expected: ActorPlacement,
) -> None:
    assert plan_actors(device, gpus, cpus, actors, per_actor) == expected


@pytest.mark.parametrize(
    ("device", "gpus", "per_actor", "message"),
    [
        ("cpu", 2, 1, "device cpu uses no GPU, but 1 GPU"),
        ("cuda", 0, None, "device cuda needs GPUs, and the Ray cluster has none"),
        ("cuda:0", 2, 0, "device cuda:0 needs a GPU per actor"),
        ("auto", 2, 4, r"4 GPU\(s\) per actor asked for; the Ray cluster has 2"),
    ],
)
def test_impossible_placements_are_refused(
    device: str, gpus: float, per_actor: float | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_actors(device, gpus, 8, None, per_actor)


class FakeRay:
    """The parts of ``ray`` the predictor calls, recording the actor pool it asks for."""

    def __init__(self, resources: dict[str, float]) -> None:
        self.resources, self.initialised, self.calls = resources, False, {}
        self.data = self

    # ray
    def is_initialized(self) -> bool:
        return self.initialised

    def init(self, **kwargs: Any) -> None:
        self.initialised = True

    def shutdown(self) -> None:
        self.initialised = False

    def cluster_resources(self) -> dict[str, float]:
        return self.resources

    # ray.data
    class DataContext:
        @staticmethod
        def get_current() -> Any:
            ctx = type("Ctx", (), {})()
            ctx.execution_options = type("Opts", (), {})()
            return ctx

    def ActorPoolStrategy(self, size: int) -> int:
        return size

    def from_items(self, rows: list[dict[str, str]]) -> FakeRay:
        return self

    def map_batches(self, fn: Any, **kwargs: Any) -> FakeRay:
        self.calls = kwargs
        return self

    def iter_batches(self, **kwargs: Any) -> list[dict[str, Any]]:
        return []


@pytest.mark.parametrize(
    ("device", "resources", "gpu_args", "actor_device"),
    [
        ("cpu", {"CPU": 8, "GPU": 2}, {}, "cpu"),
        ("cuda:1", {"CPU": 8, "GPU": 2}, {"num_gpus": 1.0}, "cuda"),
        ("auto", {"CPU": 8}, {}, "cpu"),
    ],
)
def test_the_actor_pool_asks_ray_for_what_was_planned(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    resources: dict[str, float],
    gpu_args: dict[str, float],
    actor_device: str,
) -> None:
    fake = FakeRay(resources)
    monkeypatch.setattr(ray_engine, "import_ray", lambda: fake)
    with RayPredictor(dataclasses.replace(SPEC, device=device)) as predictor:
        list(predictor.map_batches([[WorkItem("a.png", "a.png")]], RenderOptions(class_names=())))
    assert predictor.spec.device == actor_device
    assert fake.calls["fn_constructor_kwargs"]["spec"].device == actor_device
    assert {k: v for k, v in fake.calls.items() if k == "num_gpus"} == gpu_args
    assert not fake.initialised  # started by the predictor, so shut down by it
