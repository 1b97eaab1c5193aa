"""The server predictor's error handling, against a stand-in for ``cvserve.client.client.Client``."""

from __future__ import annotations

import enum
import json
import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from cvserve.annotation.job import AnnotateJob, annotate
from cvserve.annotation.predictors import PredictorError, ServerPredictor
from cvserve.models.types import Prediction


class Code(enum.Enum):  # the shape of grpc.StatusCode: members with a name
    INVALID_ARGUMENT = 3
    RESOURCE_EXHAUSTED = 8
    UNAVAILABLE = 14
    INTERNAL = 13


class FakeClientError(Exception):
    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


class FakeClient:
    """Answers like the contract; ``script`` maps a file's first byte to errors to raise first."""

    def __init__(self, script: dict[int, list[Code]] | None = None) -> None:
        self.script = script or {}
        self.calls = 0
        self.closed = False
        self._lock = threading.Lock()

    def get_model(self, name: str) -> dict[str, Any]:
        return {"name": name, "task": "instance", "class_names": ["a", "b"]}

    def predict(self, image: bytes, *, model: str) -> Prediction:
        assert isinstance(image, bytes)
        rgb = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
        key = int(rgb[0, 0, 0])
        with self._lock:
            self.calls += 1
            pending = self.script.get(key, [])
            if pending:
                raise FakeClientError(pending.pop(0), f"scripted for {key}")
        return Prediction(image_size=rgb.shape[:2])

    def close(self) -> None:
        self.closed = True


def _images(folder: Path, keys: list[int]) -> None:
    folder.mkdir()
    for k in keys:
        cv2.imwrite(str(folder / f"{k:03d}.png"), np.full((8, 8, 3), k, np.uint8))


def _run(tmp_path: Path, client: FakeClient) -> Any:
    predictor = ServerPredictor("unused:0", "m", concurrency=3, client=client, retries=2)
    assert predictor.info.class_names == ("a", "b")
    with predictor:
        summary = annotate(
            AnnotateJob(inputs=(str(tmp_path / "in"),), out=str(tmp_path / "r.json")), predictor
        )
    assert client.closed
    return summary


def test_invalid_image_fails_alone_and_overload_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cvserve.annotation.predictors.time.sleep", lambda s: None)
    _images(tmp_path / "in", [1, 2, 3, 4])
    client = FakeClient({2: [Code.INVALID_ARGUMENT], 3: [Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE]})
    summary = _run(tmp_path, client)
    assert (summary.done, summary.failed) == (3, 1)
    assert client.calls == 4 + 2  # two retries of image 3
    [error] = json.loads((tmp_path / "r.errors.json").read_text())
    assert error["path"].endswith("002.png") and "INVALID_ARGUMENT" in error["reason"]


def test_persistent_outage_or_internal_error_stops_the_run_and_keeps_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cvserve.annotation.predictors.time.sleep", lambda s: None)
    _images(tmp_path / "in", [1, 2])
    with pytest.raises(PredictorError, match=r"UNAVAILABLE.*rerun the same command to resume"):
        _run(tmp_path, FakeClient({2: [Code.UNAVAILABLE] * 3}))
    assert not (tmp_path / "r.json").exists()  # outputs only from a finished run
    summary = _run(tmp_path, FakeClient())  # the server is back: finish the job
    assert summary.done + summary.skipped == 2 and summary.done >= 1


def test_internal_server_error_is_not_retried_and_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cvserve.annotation.predictors.time.sleep", lambda s: None)
    _images(tmp_path / "in", [1])
    client = FakeClient({1: [Code.INTERNAL]})
    with pytest.raises(PredictorError, match="INTERNAL"):
        _run(tmp_path, client)
    assert client.calls == 1


class LoadingClient(FakeClient):
    """Reports the model loading twice, then ``final``."""

    def __init__(self, final: dict[str, Any]) -> None:
        super().__init__()
        self.states = [{"ready": False, "state": "loading"}] * 2 + [final]

    def get_model(self, name: str) -> dict[str, Any]:
        return {**super().get_model(name), **self.states.pop(0)}


def test_a_loading_model_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cvserve.annotation.predictors.time.sleep", lambda s: None)
    client = LoadingClient({"ready": True, "state": "ready"})
    assert ServerPredictor("srv:1", "m", client=client).info.class_names == ("a", "b")
    assert client.states == []


def test_a_model_that_failed_to_load_is_refused_with_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cvserve.annotation.predictors.time.sleep", lambda s: None)
    client = LoadingClient({"ready": False, "state": "failed", "error": "checkpoint is corrupt"})
    with pytest.raises(PredictorError, match=r"srv:1: model 'm' is not ready \(checkpoint is corrupt\)"):
        ServerPredictor("srv:1", "m", client=client)
