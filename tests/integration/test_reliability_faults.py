"""Faults: a model that fails to load, a batch that raises, out of memory, SIGTERM under load.

Each failure must stay where it happened: the other models, the other batches and
every request the server already accepted carry on. ``serve_cli`` (a ``cvserve serve``
subprocess with its log in a file) is shared with the soak and security tests.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from cvserve._proto.inference import grpc_service_pb2 as kpb
from cvserve._proto.inference import grpc_service_pb2_grpc as kpb_grpc
from cvserve.client.client import Client, ClientError
from cvserve.config import ServerConfig
from cvserve.dataplane.plane import DataPlane
from cvserve.kserve.servicer import add_kserve_servicer
from cvserve.models.repository import ModelSpec, load_repository
from cvserve.server.build import ServerThread
from tests.fixtures.fake_models import FakeDetector
from tests.integration.test_server_ops import ROOT, red, write_repository

# ---- a cvserve serve subprocess ----------------------------------------------------------------


@dataclass
class CliServer:
    """A running ``cvserve serve`` process whose log goes to a file (a pipe could fill and block it)."""

    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def status_kib(self, field: str) -> int:
        """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of the server, in KiB."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB$", text, re.M)
        assert match, f"no {field} in /proc/{self.proc.pid}/status"
        return int(match.group(1))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve_cli(
    directory: Path, repository: Path, *flags: str, log_level: str = "INFO", timeout: float = 60
) -> Iterator[CliServer]:
    """Start ``cvserve serve`` on a free loopback port; stop it (SIGKILL if need be) on exit."""
    log_path = directory / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "cvserve.cli.main",
        "--log-level",
        log_level,
        "serve",
        "--models",
        str(repository),
    ]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--no-metrics", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        end = time.monotonic() + timeout
        while not (match := re.search(r"serving on port (\d+)", log_path.read_text(errors="replace"))):
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < end, f"server did not start:\n{log_path.read_text()}"
            time.sleep(0.05)
        yield CliServer(proc, f"127.0.0.1:{match.group(1)}", log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(address: str, model: str, timeout: float = 30, **client_kwargs: Any) -> None:
    """Poll ``GetModel`` until ``model`` is ready."""
    end = time.monotonic() + timeout
    with Client(address, timeout=5, **client_kwargs) as client:
        while True:
            try:
                if client.get_model(model)["ready"]:
                    return
            except ClientError as e:
                if e.code is not grpc.StatusCode.UNAVAILABLE:
                    raise
            assert time.monotonic() < end, f"model {model} never became ready"
            time.sleep(0.05)


# ---- in-process servers of scripted models -----------------------------------------------------


class ScriptedDetector(FakeDetector):
    """The fake detector with failures injected by the test through ``fail(batch) -> error | None``."""

    def __init__(self, spec: ModelSpec, fail: Any) -> None:
        super().__init__(spec)
        self.fail = fail
        self.batches: list[tuple[int, ...]] = []  # the pixel (0, 0) red value of each item, per call

    def forward(self, inputs: Sequence[Any]) -> list[Any]:
        with self._lock:
            self.batches.append(tuple(int(img[0, 0, 0]) for img in inputs))
        time.sleep(float(self.options.get("delay_ms", 0)) / 1000)
        error = self.fail(inputs)
        if error is not None:
            raise error
        return super().forward(inputs)


def scripted_server(tmp_path: Path, fail: Any, **spec: Any) -> tuple[ServerThread, ScriptedDetector]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    (spec_obj,) = load_repository(write_repository(tmp_path, [{"name": "det", "task": "instance", **spec}]))
    models: list[ScriptedDetector] = []

    def build(s: ModelSpec) -> ScriptedDetector:
        models.append(ScriptedDetector(s, fail))
        return models[-1]

    config = ServerConfig(port=0, metrics_port=None, worker_threads=2, warmup=False)
    server = ServerThread(config, DataPlane([spec_obj], config, builder=build)).start(wait_loaded=True)
    return server, models[0]


def tagged(tag: int) -> np.ndarray:
    """A red image whose pixel (0, 0) carries ``tag`` so the model's batches can be traced."""
    img = red(16, 16)
    img[0, 0, 0] = tag
    return img


# ---- tests -------------------------------------------------------------------------------------


class TestModelLoadFailure:
    def test_failed_model_reports_its_error_and_the_others_serve(self, tmp_path: Path) -> None:
        models = [
            {"name": "good", "task": "instance"},
            {"name": "broken", "task": "instance", "options": {"load_error": "weights file truncated"}},
            {"name": "seg", "task": "semantic"},
        ]
        (tmp_path / "repo").mkdir()
        specs = load_repository(write_repository(tmp_path / "repo", models))
        config = ServerConfig(port=0, metrics_port=None, worker_threads=2)
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        with (
            ServerThread(config, specs, servicers=[add_kserve_servicer]).start(wait_loaded=True) as srv,
            Client(srv.address, timeout=5) as client,
            grpc.insecure_channel(srv.address) as channel,
        ):
            broken = client.get_model("broken")
            assert broken["state"] == "failed" and not broken["ready"]
            assert "weights file truncated" in broken["error"]
            with pytest.raises(ClientError) as info:
                client.detect(red(), model="broken")
            assert info.value.code is grpc.StatusCode.UNAVAILABLE
            assert "weights file truncated" in info.value.message
            kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
            assert not kserve.ModelReady(kpb.ModelReadyRequest(name="broken"), timeout=5).ready
            assert kserve.ModelReady(kpb.ModelReadyRequest(name="good"), timeout=5).ready
            assert kserve.ServerReady(kpb.ServerReadyRequest(), timeout=5).ready
            index = kserve.RepositoryIndex(kpb.RepositoryIndexRequest(), timeout=5)
            reasons = {m.name: (m.state, m.reason) for m in index.models}
            assert reasons["broken"][0] == "UNAVAILABLE" and "weights file truncated" in reasons["broken"][1]
            assert client.detect(red(), model="good").instances
            assert client.segment(red(), model="seg").semantic is not None


class TestBatchFailure:
    def test_an_exception_fails_only_the_batch_it_happened_in(self, tmp_path: Path) -> None:
        poison = 99

        def fail(inputs: Sequence[np.ndarray]) -> Exception | None:
            tags = [int(img[0, 0, 0]) for img in inputs]
            return RuntimeError("kernel crashed") if poison in tags else None

        server, model = scripted_server(
            tmp_path, fail, max_batch_size=3, max_wait_ms=50, options={"delay_ms": 100}
        )
        tags = [10, 11, 12, poison, 13, 14, 15, 16, 17]
        with server as srv, Client(srv.address, timeout=10) as client, ThreadPoolExecutor(9) as pool:
            futures = {tag: pool.submit(client.detect, tagged(tag), model="det") for tag in tags}
            outcomes = {tag: f.exception() for tag, f in futures.items()}
            assert client.detect(tagged(20), model="det").instances  # still serving
        (poisoned,) = [b for b in model.batches if poison in b]
        failed = {tag for tag, error in outcomes.items() if error is not None}
        assert failed == set(poisoned)
        assert all(
            e.code is grpc.StatusCode.INTERNAL and e.message == "internal error"
            for e in outcomes.values()
            if e is not None
        )
        assert len(failed) < len(tags)  # other batches succeeded
        assert sorted(t for b in model.batches for t in b if t != 20) == sorted(tags)  # each ran once


class TestOutOfMemory:
    @pytest.mark.parametrize(
        "error",
        [MemoryError, lambda: torch.cuda.OutOfMemoryError("CUDA out of memory")],
        ids=["host", "cuda"],
    )
    def test_a_batch_out_of_memory_is_split_and_retried(self, tmp_path: Path, error: Any) -> None:
        def fail(inputs: Sequence[np.ndarray]) -> Exception | None:
            return error() if len(inputs) > 1 else None

        server, model = scripted_server(
            tmp_path, fail, max_batch_size=4, max_wait_ms=300, options={"delay_ms": 20}
        )
        tags = [30, 31, 32, 33]
        with server as srv, Client(srv.address, timeout=10) as client, ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda t: client.detect(tagged(t), model="det"), tags))
        assert all(r.instances for r in results)
        assert max(len(b) for b in model.batches) > 1  # a real batch was tried first
        succeeded = [b for b in model.batches if len(b) == 1]
        assert sorted(t for (t,) in succeeded) == tags  # then every image alone, exactly once

    def test_out_of_memory_on_a_single_image_fails_it_and_serving_goes_on(self, tmp_path: Path) -> None:
        def fail(inputs: Sequence[np.ndarray]) -> Exception | None:
            return MemoryError() if any(int(img[0, 0, 0]) == 66 for img in inputs) else None

        server, _ = scripted_server(tmp_path, fail, max_batch_size=1)
        with server as srv, Client(srv.address, timeout=10) as client:
            with pytest.raises(ClientError) as info:
                client.detect(tagged(66), model="det")
            assert info.value.code is grpc.StatusCode.INTERNAL and info.value.message == "internal error"
            assert client.detect(tagged(67), model="det").instances


class TestSigterm:
    def test_sigterm_under_load_finishes_accepted_requests_and_refuses_later_ones(
        self, tmp_path: Path
    ) -> None:
        models = [{"name": "slow", "task": "instance", "max_batch_size": 2, "max_queue": 256,
                   "options": {"delay_ms": 150}}]  # fmt: skip
        repository = write_repository(tmp_path, models)
        grace = 8.0
        with serve_cli(tmp_path, repository, "--grace-period", str(grace)) as server:
            wait_ready(server.address, "slow")
            signalled = threading.Event()
            signal_time: list[float] = []
            outcomes: list[tuple[float, str]] = []  # (sent at, status name)
            lock = threading.Lock()

            def client_loop() -> None:
                with Client(server.address, timeout=30) as client:
                    for _ in range(200):  # bounded; the server stops long before
                        sent = time.monotonic()
                        try:
                            client.detect(red(), model="slow")
                            code = "OK"
                        except ClientError as e:
                            code = e.code.name
                        with lock:
                            outcomes.append((sent, code))
                        if code != "OK" and signalled.is_set():
                            return

            with ThreadPoolExecutor(6) as pool:
                loops = [pool.submit(client_loop) for _ in range(6)]
                time.sleep(1.0)  # several batches served, six requests queued or running
                signal_time.append(time.monotonic())
                server.proc.send_signal(signal.SIGTERM)
                signalled.set()
                for loop in loops:
                    loop.result(timeout=60)
            exit_code = server.proc.wait(timeout=grace + 10)
            stopped = time.monotonic()
        (at,) = signal_time
        before = [code for sent, code in outcomes if sent < at - 0.05]
        after = [code for sent, code in outcomes if sent > at + 0.05]
        assert len(before) >= 6 and set(before) == {"OK"}  # accepted before SIGTERM: all answered
        assert set(after) <= {"OK", "UNAVAILABLE"} and "UNAVAILABLE" in after
        assert {code for _, code in outcomes} <= {"OK", "UNAVAILABLE"}
        assert exit_code == 0 and stopped - at < grace + 5
