"""Operations: health transitions, reflection, metrics, loading / draining, auth, SIGTERM, the CLI."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cvserve.client.client import Client, ClientError
from cvserve.config import ServerConfig
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread

ROOT = Path(__file__).resolve().parents[2]
FAKE = "tests.fixtures.fake_models:build_fake"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def write_repository(directory: Path, models: list[dict]) -> Path:
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"config": "fake", "handler": FAKE, **m} for m in models]}))
    return path


def red(height: int = 24, width: int = 32) -> np.ndarray:
    img = np.zeros((height, width, 3), np.uint8)
    img[..., 0] = 220
    return img


def start(tmp_path: Path, models: list[dict], **config: object) -> ServerThread:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    specs = load_repository(write_repository(tmp_path, models))
    return ServerThread(
        ServerConfig(**{"port": 0, "metrics_port": None, "worker_threads": 2, **config}), specs
    )


def health_of(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            .status
        )


def test_health_and_unavailable_while_loading_then_serving(tmp_path: Path) -> None:
    models = [
        {"name": "slowload", "task": "instance", "options": {"load_delay_ms": 1500}},
        {"name": "broken", "task": "instance", "options": {"load_error": "no weights"}},
    ]
    with start(tmp_path, models).start() as srv, Client(srv.address, timeout=5) as client:
        assert health_of(srv.address) == NOT_SERVING
        assert health_of(srv.address, "slowload") == NOT_SERVING
        with pytest.raises(ClientError) as info:
            client.detect(red(), model="slowload")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.message
        srv.run(srv.dataplane.wait_loaded(30))
        assert health_of(srv.address) == SERVING
        assert health_of(srv.address, "cvserve.v1.VisionService") == SERVING
        assert health_of(srv.address, "slowload") == SERVING
        assert health_of(srv.address, "broken") == NOT_SERVING
        assert client.detect(red(), model="slowload").instances
        with pytest.raises(grpc.RpcError) as rpc:
            health_of(srv.address, "no-such-model")
        assert rpc.value.code() == grpc.StatusCode.NOT_FOUND


def test_unload_and_load_at_run_time(tmp_path: Path) -> None:
    server = start(tmp_path, [{"name": "det", "task": "instance"}]).start(wait_loaded=True)
    with server as srv, Client(srv.address, timeout=5) as client:
        srv.run(srv.dataplane.unload("det"))
        assert health_of(srv.address, "det") == NOT_SERVING
        with pytest.raises(ClientError) as info:
            client.detect(red(), model="det")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "unloaded" in info.value.message
        assert client.get_model("det")["state"] == "unloaded"
        srv.run(srv.dataplane.load("det"))
        assert client.detect(red(), model="det").instances
        assert health_of(srv.address, "det") == SERVING


def test_unavailable_while_draining(tmp_path: Path) -> None:
    with start(tmp_path, [{"name": "det", "task": "instance"}]).start(wait_loaded=True) as srv:
        assert srv.run(srv.dataplane.drain(1.0)) is True
        with Client(srv.address, timeout=5) as client, pytest.raises(ClientError) as info:
            client.detect(red(), model="det")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.message
        assert health_of(srv.address) == NOT_SERVING


def test_reflection_lists_services(tmp_path: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server = start(tmp_path, [{"name": "det", "task": "instance"}]).start()
    with server as srv, grpc.insecure_channel(srv.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in response.list_services_response.service}
    assert {"cvserve.v1.VisionService", "grpc.health.v1.Health"} <= names


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_metrics_endpoint_counts_requests_batches_and_errors(tmp_path: Path) -> None:
    models = [{"name": "det", "task": "instance", "max_batch_size": 2, "max_wait_ms": 5}]
    with start(tmp_path, models, metrics_port=0, metrics_host="127.0.0.1").start(wait_loaded=True) as srv:
        url = f"http://127.0.0.1:{srv.server.metrics_port}/metrics"
        before = urllib.request.urlopen(url, timeout=5).read().decode()
        with Client(srv.address, timeout=5) as client:
            client.detect(red(), model="det")
            with pytest.raises(ClientError):
                client.detect(b"junk", model="det")
        after = urllib.request.urlopen(url, timeout=5).read().decode()
    detect = 'code="{}",method="/cvserve.v1.VisionService/Detect"'
    ok, bad = detect.format("OK"), detect.format("INVALID_ARGUMENT")
    assert _metric(after, "cvserve_requests_total", ok) == _metric(before, "cvserve_requests_total", ok) + 1
    assert _metric(after, "cvserve_requests_total", bad) == _metric(before, "cvserve_requests_total", bad) + 1
    count = 'model="det"'
    assert _metric(after, "cvserve_batch_size_count", count) > _metric(
        before, "cvserve_batch_size_count", count
    )
    assert _metric(after, "cvserve_queue_latency_seconds_count", count) >= 1
    assert _metric(after, "cvserve_inference_latency_seconds_count", count) >= 1
    assert _metric(after, "cvserve_model_ready", count) == 1.0
    assert re.search(r'^cvserve_queue_depth\{model="det"\} 0\.0$', after, re.M)
    assert (
        _metric(after, "cvserve_request_latency_seconds_count", 'method="/cvserve.v1.VisionService/Detect"')
        == 2
    )


def test_auth_token_is_required_except_for_health(tmp_path: Path) -> None:
    with start(tmp_path, [{"name": "det", "task": "instance"}], auth_token="s3cret").start(
        wait_loaded=True
    ) as srv:
        with Client(srv.address, timeout=5) as anonymous, pytest.raises(ClientError) as info:
            anonymous.list_models()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(srv.address, timeout=5, token="s3cret") as client:
            assert client.detect(red(), model="det").instances
        assert health_of(srv.address) == SERVING


def _serve(repository: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``cvserve serve`` on a free port; return the process and its address."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cvserve", "serve", "--models", str(repository), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--no-metrics", *extra], env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if match := re.search(r"serving on port (\d+)", line):
            return proc, f"127.0.0.1:{match.group(1)}"
    raise AssertionError(f"server exited with {proc.wait()} before serving")


def _wait_serving(address: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while health_of(address) != SERVING:
        assert time.monotonic() < end, "server never became SERVING"
        time.sleep(0.1)


def test_sigterm_finishes_accepted_requests_and_exits_within_grace(tmp_path: Path) -> None:
    repository = write_repository(
        tmp_path, [{"name": "slow", "task": "instance", "options": {"delay_ms": 300}}]
    )
    proc, address = _serve(repository, "--grace-period", "5")
    try:
        _wait_serving(address)
        with Client(address, timeout=20) as client, ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.detect, red(), model="slow") for _ in range(4)]
            time.sleep(0.3)  # all four accepted; they need about 1.2 s of forward passes
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert all(r.instances for r in results)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 5 + 2
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_cli_client_detect_segment_and_models(tmp_path: Path) -> None:
    models = [{"name": "det", "task": "instance"}, {"name": "seg", "task": "semantic"}]
    image_path = tmp_path / "scene.png"
    Image.fromarray(red(30, 40)).save(image_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with start(tmp_path, models).start(wait_loaded=True) as srv:

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            cmd = [sys.executable, "-m", "cvserve", "client", *args, "--server", srv.address]
            return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)

        detect = cli("detect", str(image_path), "--overlay", str(tmp_path / "det.png"))
        segment = cli("segment", str(image_path), "--model", "seg", "--overlay", str(tmp_path / "seg.png"))
        listing = cli("models")
        missing = cli("detect", str(image_path), "--model", "nope")
    assert detect.returncode == 0, detect.stderr
    out = json.loads(detect.stdout)
    assert out["model"] == "det" and out["image"] == {"height": 30, "width": 40}
    assert out["detections"][0]["class_name"] == "red" and out["detections"][0]["box"] == [0, 0, 40, 30]
    assert segment.returncode == 0, segment.stderr
    assert {a["class_name"]: a["pixels"] for a in json.loads(segment.stdout)["areas"]} == {"red": 1200}
    for overlay in ("det.png", "seg.png"):
        drawn = np.asarray(Image.open(io.BytesIO((tmp_path / overlay).read_bytes())))
        assert drawn.shape == (30, 40, 3) and not np.array_equal(drawn, red(30, 40))
    assert [m["name"] for m in json.loads(listing.stdout)] == ["det", "seg"]
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_max_message_size_is_enforced(tmp_path: Path) -> None:
    models = [{"name": "det", "task": "instance"}]
    with start(tmp_path, models, max_message_bytes=64 * 1024).start(wait_loaded=True) as srv:
        with Client(srv.address, timeout=5) as client:
            assert client.detect(red(100, 100), model="det").instances  # 30 kB raw
            with pytest.raises(ClientError) as info:
                client.detect(red(200, 200), model="det")  # 120 kB raw
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.message


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_server_and_client(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    models = [{"name": "det", "task": "instance"}]
    server = start(tmp_path, models, tls_cert_file=str(cert), tls_key_file=str(key)).start(wait_loaded=True)
    with server as srv:
        with Client(srv.address, timeout=5, root_certificates=cert.read_bytes()) as client:
            assert client.detect(red(), model="det").instances
        with Client(srv.address, timeout=2) as plaintext, pytest.raises(ClientError) as info:
            plaintext.list_models()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
