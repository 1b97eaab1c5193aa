"""A real detectron2 model reloaded with new weights while clients call it.

The weight-free models of tests/integration/test_hot_reload.py show the swap's logic at many
reloads; this shows it with a real (tiny, random-weight) Mask R-CNN: no request fails, the
new weights answer after the load, and the old network's tensors are freed (one copy).
"""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cvserve.client.client import Client
from cvserve.config import ServerConfig
from cvserve.models.checkpoint import save_checkpoint
from cvserve.models.instance.config import tiny_instance_config
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread

pytestmark = pytest.mark.slow
CLASSES = ("circle", "square", "triangle")


def _write_weights(cfg: object, path: Path, seed: int) -> None:
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    save_checkpoint(build_model(cfg), path, extra={"class_names": list(CLASSES)})


def _scores(client: Client, image: np.ndarray) -> list[float]:
    return [round(i.score, 5) for i in client.detect(image, model="tiny").instances]


def test_new_weights_load_under_traffic_and_the_old_network_is_freed(tmp_path: Path) -> None:
    cfg = tiny_instance_config(len(CLASSES), input_size=64)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights score low; keep everything
    _write_weights(cfg, tmp_path / "model.pth", seed=0)
    (tmp_path / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    entry = {"name": "tiny", "task": "instance", "config": "config.yaml", "weights": "model.pth",
             "device": "cpu", "precision": "fp32", "max_batch_size": 2, "max_wait_ms": 5}  # fmt: skip
    (tmp_path / "models.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    image = np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    config = ServerConfig(port=0, metrics_port=None, worker_threads=2)

    with ServerThread(config, load_repository(tmp_path / "models.yaml")).start(wait_loaded=True) as srv:
        old = srv.dataplane.model_object("tiny")
        assert old is not None
        old_network = weakref.ref(old._model)  # type: ignore[attr-defined]
        old_weight = weakref.ref(next(old._model.parameters()))  # type: ignore[attr-defined]
        del old
        gc.collect()
        assert old_network() is not None  # still served
        with Client(srv.address, timeout=60) as client:
            before = _scores(client, image)
            stop, failures, calls = threading.Event(), [], [0]

            def caller() -> None:
                with Client(srv.address, timeout=60) as own:
                    while not stop.is_set():
                        try:
                            own.detect(image, model="tiny")
                            calls[0] += 1
                        except Exception as e:  # every failure counts
                            failures.append(e)

            threads = [threading.Thread(target=caller) for _ in range(2)]
            for t in threads:
                t.start()
            _write_weights(cfg, tmp_path / "model.pth", seed=1)  # new weights over the old path
            status = srv.run(srv.dataplane.load("tiny"), timeout=120)
            after_load = calls[0]
            while calls[0] < after_load + 4:  # traffic goes on after the swap
                threading.Event().wait(0.05)
            stop.set()
            for t in threads:
                t.join(60)
            after = _scores(client, image)

        assert status.ready and not failures, failures[:3]
        assert after != before  # the new weights answer
        gc.collect()
        assert old_network() is None and old_weight() is None  # the old tensors are freed
