"""On a CUDA host: a real out-of-memory batch split, and the server on the GPU end to end."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from cvserve.client.client import Client
from cvserve.config import ServerConfig
from cvserve.dataplane.memory import run_splitting_on_oom
from cvserve.models.checkpoint import save_checkpoint
from cvserve.models.instance.adapter import DetectronModel
from cvserve.models.instance.config import tiny_instance_config
from cvserve.models.repository import load_repository, parse_spec
from cvserve.server.build import ServerThread

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
CLASSES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Mask R-CNN that keeps every detection (the most work per image)."""
    from detectron2.modeling import build_model

    root = tmp_path_factory.mktemp("tiny")
    cfg = tiny_instance_config(len(CLASSES), input_size=1024)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    save_checkpoint(build_model(cfg), root / "model.pth", extra={"class_names": list(CLASSES)})
    (root / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    return root


def entry(**overrides: Any) -> dict[str, Any]:
    return {"name": "tiny", "task": "instance", "config": "config.yaml", "weights": "model.pth", **overrides}


def scene(seed: int, side: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (side, side, 3), dtype=np.uint8)


@pytest.fixture
def memory_cap() -> Iterator[Any]:
    """``cap(bytes)`` limits this process's CUDA allocator to ``bytes`` more than it holds now."""
    device = torch.device("cuda:0")

    def cap(extra: int) -> None:
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, (torch.cuda.memory_reserved(device) + extra) / total)
        )

    yield cap
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def test_a_batch_that_runs_out_of_gpu_memory_is_split_and_answered(tiny: Path, memory_cap: Any) -> None:
    model = DetectronModel(parse_spec(entry(device="cuda:0"), "test", tiny))
    model.load()
    inputs = [model.preprocess(scene(s)) for s in range(8)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model.forward(inputs[:1])
    one_image = torch.cuda.max_memory_allocated() - before
    memory_cap(int(2.5 * one_image))  # one image fits, eight do not
    sizes: list[int] = []

    def forward(batch: list[Any]) -> list[Any]:
        sizes.append(len(batch))
        return model.forward(batch)

    results = run_splitting_on_oom(forward, inputs, "tiny")
    assert sizes[0] == 8 and len(sizes) > 1  # the whole batch ran out of memory, then halves ran
    assert len(results) == 8 and not any(isinstance(r, Exception) for r in results)


def test_the_server_serves_on_the_gpu(tiny: Path) -> None:
    devices = [f"cuda:{i}" for i in range(min(2, torch.cuda.device_count()))]
    entries = [
        entry(device="auto", max_batch_size="auto", max_wait_ms=5, precision="fp16"),
        entry(name="tiny-multi", devices=devices, max_batch_size=4, max_wait_ms=5),
    ]
    (tiny / "models.yaml").write_text(yaml.safe_dump({"models": entries}))
    config = ServerConfig(port=0, metrics_port=None, worker_threads=2)
    specs = load_repository(tiny / "models.yaml")
    with (
        ServerThread(config, specs).start(wait_loaded=True) as srv,
        Client(srv.address, timeout=120) as client,
    ):
        info = client.get_model("tiny")
        assert info["ready"] and info["device"] == "cuda"
        assert client.get_model("tiny-multi")["device"] == ",".join(devices)
        for name in ("tiny", "tiny-multi"):
            with ThreadPoolExecutor(8) as pool:
                preds = list(pool.map(lambda s, m=name: client.detect(scene(s, 512), model=m), range(16)))
            assert all(p.image_size == (512, 512) and p.instances for p in preds)
            assert all(i.mask is not None for p in preds for i in p.instances)
