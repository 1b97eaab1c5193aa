"""A model placed on several GPUs (``devices:``), simulated with fake models that only record their device."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from cvserve.config import ServerConfig
from cvserve.dataplane.plane import DataPlane
from cvserve.dataplane.replicas import ReplicaSet
from cvserve.kserve.metadata import model_config
from cvserve.metrics import Metrics
from cvserve.models.base import VisionModel
from cvserve.models.repository import ModelSpec, RepositoryError, load_repository
from cvserve.models.types import Task
from cvserve.vision.servicer import model_info
from tests.fixtures.fake_models import build_fake


def write(tmp_path: Path, entry: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  - {{name: m, task: instance, config: c.yaml, {entry}}}\n")
    return path


def test_repository_reads_a_device_list(tmp_path: Path) -> None:
    (spec,) = load_repository(write(tmp_path, "devices: [cuda:0, cuda:1], instances: 2"))
    assert spec.devices == ("cuda:0", "cuda:1") and spec.device == "cuda:0" and spec.instances == 2
    (single,) = load_repository(write(tmp_path, "device: cuda:1"))
    assert single.devices == () and single.device == "cuda:1"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("devices: [cuda:0, cuda:0]", "names a GPU twice"),
        ("devices: [cuda:0, cpu]", "each entry must be cuda:N, got 'cpu'"),
        ("devices: [cuda]", "each entry must be cuda:N, got 'cuda'"),
        ("devices: []", "must be a non-empty list"),
        ("devices: cuda:0", "must be a non-empty list"),
        ("device: cuda:0, devices: [cuda:1]", "give device or devices, not both"),
    ],
)
def test_bad_device_lists_name_the_field(tmp_path: Path, entry: str, message: str) -> None:
    with pytest.raises(RepositoryError, match=rf"models\.yaml: models\[0\].*{message}"):
        load_repository(write(tmp_path, entry))


class Copy:
    def __init__(self, device: str) -> None:
        self.device, self.batches = device, 0

    def forward(self, batch: list[int]) -> list[int]:
        self.batches += 1
        return batch


def test_consecutive_batches_alternate_between_free_copies() -> None:
    copies = [Copy("cuda:0"), Copy("cuda:1")]
    seen: list[str] = []
    replicas = ReplicaSet(copies, per_model=2, on_batch=seen.append)  # type: ignore[arg-type]
    assert replicas.slots == 4 and replicas.devices == ("cuda:0", "cuda:1")
    for i in range(6):
        assert replicas.forward([i]) == [i]
    assert seen == ["cuda:0", "cuda:1"] * 3
    with pytest.raises(ValueError, match="at least one model"):
        ReplicaSet([], per_model=1)


def test_a_model_on_two_gpus_spreads_requests_and_reports_its_placement() -> None:
    built: list[VisionModel] = []
    lock = threading.Lock()

    def build(spec: ModelSpec) -> VisionModel:
        model = build_fake(spec)
        model.device = spec.device  # what a real adapter resolves
        with lock:
            built.append(model)
        return model

    spec = ModelSpec(
        name="det", task=Task.INSTANCE, config="fake", devices=("cuda:0", "cuda:1"), device="cuda:0",
        instances="auto", max_batch_size=2, max_wait_ms=1, options={"delay_ms": 40},
    )  # fmt: skip
    metrics, config = Metrics(), ServerConfig(worker_threads=2)
    image = np.full((8, 8, 3), 200, np.uint8)

    async def main() -> None:
        dp = DataPlane([spec], config, builder=build, metrics=metrics)
        await dp.start()
        await dp.wait_loaded(10)
        assert [m.batch_sizes for m in built] == [[2], [2]]  # warm-up: a full batch on each GPU
        await asyncio.gather(*(dp.infer("det", [image]) for _ in range(16)))
        status = dp.get("det")
        assert status.device == "cuda:0,cuda:1" and status.spec.instances == 1  # auto: 1 per GPU
        assert model_info(status, config).device == "cuda:0,cuda:1"
        (group,) = model_config(status).instance_group
        assert (group.count, list(group.gpus), group.kind) == (1, [0, 1], group.KIND_GPU)
        await dp.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert sorted(m.device for m in built) == ["cuda:0", "cuda:1"]
    assert all(sum(m.batch_sizes) >= 4 for m in built)  # both GPUs took a share of the traffic
    assert max(m.max_running for m in built) == 1  # one batch at a time on each
    sample = metrics.registry.get_sample_value
    counts = [
        sample("cvserve_device_batches_total", {"model": "det", "version": "1", "device": d})
        for d in ("cuda:0", "cuda:1")
    ]
    assert all(c and c > 0 for c in counts)
    assert sample("cvserve_model_instances", {"model": "det", "version": "1", "device": "cuda:1"}) == 1
