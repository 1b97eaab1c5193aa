"""The server's resident memory stays flat over 2000 requests after warm-up (fake model).

Memory, not time, is asserted: RSS of a ``cvserve serve`` subprocess read from /proc.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cvserve.client.client import Client, ClientError

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = """models:
  - name: fake
    task: instance
    config: "-"
    handler: tests.fixtures.fake_models:build_fake
    max_batch_size: 4
    max_wait_ms: 1
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc"),
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    (tmp_path / "models.yaml").write_text(REPOSITORY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "cvserve", "serve", "--models", str(tmp_path / "models.yaml")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-metrics"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    address = f"127.0.0.1:{port}"
    try:
        with Client(address, timeout=5) as client:
            for _ in range(240):
                try:
                    if client.list_models()[0]["ready"]:
                        break
                except ClientError:
                    pass
                time.sleep(0.25)
        yield address, process.pid
    finally:
        process.terminate()
        process.wait(30)


def test_rss_grows_less_than_50_mb_over_2000_requests(server: tuple[str, int]) -> None:
    address, pid = server
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(8)]

    def send(n: int) -> None:
        with Client(address, timeout=60) as client:
            for i in range(n):
                assert client.detect_response(images[i % len(images)], model="fake").image_height == 96

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, [50] * 4))  # warm-up: pools, channels, allocator arenas
        before = rss_mib(pid)
        list(pool.map(send, [500] * 4))
    growth = rss_mib(pid) - before
    assert growth < 50, f"RSS grew {growth:.1f} MiB over 2000 requests"
