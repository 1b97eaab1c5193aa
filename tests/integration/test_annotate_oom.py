"""``annotate --server`` against a real server whose model runs out of memory."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cvserve.annotation.job import AnnotateJob, annotate
from cvserve.annotation.predictors import ServerPredictor
from tests.integration.test_reliability_faults import scripted_server

TAGS = [60, 61, 62, 63, 64, 65]


def _write_images(folder: Path) -> None:
    folder.mkdir()
    for tag in TAGS:  # pixel (0, 0) carries the tag, as the scripted model reads it
        cv2.imwrite(str(folder / f"{tag}.png"), np.full((16, 16, 3), tag, np.uint8))


def test_an_image_out_of_memory_is_retried_and_a_hopeless_one_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cvserve.annotation.predictors.time.sleep", lambda s: None)
    _write_images(tmp_path / "in")
    tries: Counter[int] = Counter()
    lock = threading.Lock()

    def fail(inputs: Sequence[np.ndarray]) -> Exception | None:
        tags = [int(img[0, 0, 0]) for img in inputs]
        with lock:
            for t in tags:
                tries[t] += 1
            # 61 fits once the device has room again (third try); 64 never fits.
            if 64 in tags or (61 in tags and tries[61] < 3):
                return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
        return None

    server, _ = scripted_server(tmp_path, fail, max_batch_size=1)
    with server as srv:
        predictor = ServerPredictor(srv.address, "det", concurrency=2, retries=3)
        with predictor:
            job = AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "out" / "r.json"))
            summary = annotate(job, predictor)
    assert (summary.done, summary.failed) == (len(TAGS) - 1, 1)  # the run went on to the end
    assert tries[61] == 3 and tries[64] == 4  # retried, each time as RESOURCE_EXHAUSTED
    [error] = json.loads((tmp_path / "out" / "r.errors.json").read_text())
    assert error["path"].endswith("64.png")
    assert "RESOURCE_EXHAUSTED" in error["reason"] and "out of memory" in error["reason"]
