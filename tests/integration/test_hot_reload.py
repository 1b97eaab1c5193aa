"""Reloading a served model under load, over real channels: no request fails.

Clients of both APIs call a model without pause while its weights and options change
and the server reloads it (``RepositoryModelLoad``, ``cvserve.v1`` ``LoadModel``, and the
poll mode). Every call must succeed; every call sent after a reload returned must show
the new behaviour; the replaced model must be freed (one copy in memory).
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve.config import ServerConfig
from cvserve.kserve.servicer import add_kserve_servicer
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread
from tests.integration.test_kserve import FAKE, ROOT, scene, uint8_input

tc = pytest.importorskip("tritonclient.grpc")

# The fake detector scores the scene's red instance at this (mean red / 255), times score_scale.
BASE_SCORE = round(float(scene()[..., 0].mean()) / 255.0, 6)


def write_entry(directory: Path, scale: float, **fields: object) -> Path:
    """The repository: one fake detector whose "weights" set its score scale."""
    (directory / "det.pth").write_text(json.dumps({"score_scale": scale}))
    entry = {"name": "det", "task": "instance", "config": "fake", "handler": FAKE, "weights": "det.pth"}
    entry.update(
        {"max_batch_size": 4, "max_wait_ms": 5, "options": {"delay_ms": 20, "preprocess_ms": 10}}, **fields
    )
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return path


@dataclass
class Traffic:
    """Callers of both APIs recording (generation when sent, score or error) per call."""

    address: str
    generation: int = 0
    results: list[tuple[int, float | str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, callers_per_api: int = 2) -> Traffic:
        for call in [self._vision_caller] * callers_per_api + [self._kserve_caller] * callers_per_api:
            thread = threading.Thread(target=self._loop, args=(call(),), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _vision_caller(self) -> Callable[[], float]:
        stub = pb_grpc.VisionServiceStub(grpc.insecure_channel(self.address))
        array = scene()
        image = types_pb.Image(
            raw=types_pb.RawImage(
                height=array.shape[0], width=array.shape[1], channels=3, data=array.tobytes()
            )
        )

        def call() -> float:
            response = stub.Detect(pb.DetectRequest(model="det", image=image), timeout=10)
            return max(d.score for d in response.detections)

        return call

    def _kserve_caller(self) -> Callable[[], float]:
        client = tc.InferenceServerClient(self.address)

        def call() -> float:
            return float(
                client.infer("det", [uint8_input(scene())], client_timeout=10).as_numpy("scores").max()
            )

        return call

    def _loop(self, call: Callable[[], float]) -> None:
        while not self._stop.is_set():
            generation = self.generation
            try:
                outcome: float | str = call()
            except Exception as e:  # counted, never raised: the test asserts there are none
                outcome = f"{type(e).__name__}: {e}"
            self.results.append((generation, outcome))

    def wait_for_calls(self, count: int, timeout: float = 20) -> None:
        target, end = len(self.results) + count, time.monotonic() + timeout
        while len(self.results) < target and time.monotonic() < end:
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return write_entry(tmp_path, 1.0)


def serve(repository: Path, **config: object) -> ServerThread:
    settings = ServerConfig(port=0, metrics_port=None, worker_threads=2, **config)  # type: ignore[arg-type]
    specs = load_repository(repository)
    return ServerThread(settings, specs, servicers=[add_kserve_servicer], repository=repository)


def test_reloads_under_load_fail_no_request(repository: Path) -> None:
    with serve(repository).start(wait_loaded=True) as srv:
        triton = tc.InferenceServerClient(srv.address)
        vision = pb_grpc.VisionServiceStub(grpc.insecure_channel(srv.address))
        traffic = Traffic(srv.address).start()
        expected = {0: BASE_SCORE}
        reloads: list[Callable[[], object]] = [
            lambda: triton.load_model("det"),
            lambda: vision.LoadModel(pb.LoadModelRequest(name="det"), timeout=30),
        ] * 2
        try:
            traffic.wait_for_calls(20)
            for generation, reload in enumerate(reloads, start=1):
                old = weakref.ref(srv.dataplane.model_object("det"))
                scale = 1.0 / (generation + 1)
                # New weights and new options (batching and forward time) for the same entry.
                write_entry(
                    repository.parent,
                    scale,
                    max_batch_size=generation + 1,
                    options={"delay_ms": 10 * generation, "preprocess_ms": 10},
                )
                reload()
                expected[generation] = round(BASE_SCORE * scale, 6)
                traffic.generation = generation
                assert srv.dataplane.get("det").spec.max_batch_size == generation + 1
                gc.collect()
                assert old() is None, "the replaced model is still referenced"
                traffic.wait_for_calls(20)
        finally:
            traffic.stop()
            triton.close()
    failures = [r for _, r in traffic.results if isinstance(r, str)]
    assert failures == [], failures[:5]
    assert len(traffic.results) >= 20 * (len(reloads) + 1)
    for generation, score in traffic.results:
        # A call sent after a reload returned ran on the new load; one sent before ran on
        # the load it found (the old one, or the new one if the swap came first).
        allowed = {expected[generation], expected.get(generation + 1, expected[generation])}
        assert any(score == pytest.approx(a, abs=1e-5) for a in allowed), (generation, score)
    assert {g for g, _ in traffic.results} == set(range(len(reloads) + 1))


def test_poll_mode_applies_changes_by_itself_under_load(repository: Path) -> None:
    with serve(repository, poll_repository_s=0.2).start(wait_loaded=True) as srv:
        traffic = Traffic(srv.address).start(callers_per_api=1)
        try:
            traffic.wait_for_calls(10)
            write_entry(repository.parent, 0.5)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not _scaled(srv):
                time.sleep(0.05)
            assert _scaled(srv)
            traffic.generation = 1
            traffic.wait_for_calls(10)
        finally:
            traffic.stop()
    assert [r for _, r in traffic.results if isinstance(r, str)] == []
    after = [score for generation, score in traffic.results if generation == 1]
    assert after and all(s == pytest.approx(BASE_SCORE * 0.5, abs=1e-5) for s in after)


def _scaled(srv: ServerThread) -> bool:
    model = srv.dataplane.model_object("det")
    return model is not None and getattr(model, "options", {}).get("score_scale") == 0.5


def _serve_cli(repository: Path, *extra: str) -> tuple[subprocess.Popen[str], str, list[str]]:
    """``cvserve serve`` on a free port: the process, its address and its log lines (kept reading)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "cvserve", "serve", "--models", str(repository), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--no-metrics", *extra],
        env={**os.environ, "PYTHONPATH": path},
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if match := re.search(r"serving on port (\d+)", line):
            threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True).start()
            return proc, f"127.0.0.1:{match.group(1)}", lines
    raise AssertionError(f"server exited with {proc.wait()} before serving: {''.join(lines)}")


def _until(condition: Callable[[], bool], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition never met"
        time.sleep(0.05)


def test_sighup_applies_the_file_and_an_invalid_file_is_logged(repository: Path) -> None:
    proc, address, log = _serve_cli(repository)
    try:
        triton = tc.InferenceServerClient(address)
        _until(lambda: triton.is_model_ready("det"))
        repository.write_text("models: [{name: det, task: instance}]")  # no config
        proc.send_signal(signal.SIGHUP)
        _until(lambda: any("models[0].config: required" in line for line in log))
        assert triton.is_model_ready("det")

        write_entry(repository.parent, 0.5)
        text = yaml.safe_load(repository.read_text())
        text["models"].append({"name": "seg", "task": "semantic", "config": "fake", "handler": FAKE})
        repository.write_text(yaml.safe_dump(text))
        proc.send_signal(signal.SIGHUP)
        _until(lambda: triton.is_model_ready("seg"))
        _until(
            lambda: float(triton.infer("det", [uint8_input(scene())]).as_numpy("scores").max()) < BASE_SCORE
        )
        assert any("SIGHUP: 2 change(s) applied" in line for line in log)
        triton.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_poll_interval_must_be_positive(repository: Path) -> None:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "cvserve", "serve", "--models", str(repository), "--poll-repository", "0"]
    done = subprocess.run(
        cmd, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "--poll-repository: must be > 0 when set, got 0.0" in done.stderr
