"""Soak: 10,000 requests from concurrent clients, no unexpected error, bounded server memory.

A ``cvserve serve`` subprocess with the fake model and small images; eight client
threads. The server's resident memory is read from ``/proc`` after a warm-up and at
the end: growth beyond a few tens of MiB over thousands of requests would be a leak.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cvserve.client.client import Client, ClientError
from tests.integration.test_reliability_faults import serve_cli, wait_ready
from tests.integration.test_server_ops import write_repository

TOTAL, CLIENTS, WARMUP = 10_000, 8, 1_000
MAX_GROWTH_MIB = 48


@pytest.mark.slow
def test_ten_thousand_requests_without_errors_or_growing_memory(tmp_path: Path) -> None:
    models = [{"name": "det", "task": "instance", "max_batch_size": 8, "max_wait_ms": 2, "max_queue": 256}]
    repository = write_repository(tmp_path, models)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(16)]
    codes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    warmed = threading.Barrier(CLIENTS + 1)
    resume = threading.Event()

    def client_loop(index: int, count: int) -> None:
        with Client(server.address, timeout=30) as client:
            for i in range(count):
                if i == WARMUP // CLIENTS:
                    warmed.wait(60)
                    resume.wait(60)
                try:
                    client.detect(images[(index + i) % len(images)], model="det", mask_format="none")
                    code = "OK"
                except ClientError as e:
                    code = e.code.name
                with lock:
                    codes[code] += 1

    with serve_cli(tmp_path, repository, "--workers", "2") as server:
        wait_ready(server.address, "det")
        with ThreadPoolExecutor(CLIENTS) as pool:
            loops = [pool.submit(client_loop, k, TOTAL // CLIENTS) for k in range(CLIENTS)]
            warmed.wait(120)
            rss_warm = server.status_kib("VmRSS")
            resume.set()
            for loop in loops:
                loop.result(timeout=300)
        rss_end = server.status_kib("VmRSS")
        errors = [line for line in server.log().splitlines() if " ERROR " in line]
    growth_mib = (rss_end - rss_warm) / 1024
    print(
        f"soak: {dict(codes)}; server RSS {rss_warm} KiB after {WARMUP} requests, {rss_end} KiB after {TOTAL}"
    )
    assert codes == {"OK": TOTAL}
    assert not errors, errors[:5]
    assert growth_mib < MAX_GROWTH_MIB, f"server RSS grew {growth_mib:.1f} MiB over {TOTAL - WARMUP} requests"
