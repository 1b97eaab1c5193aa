"""``docs/kserve.md``: its tritonclient examples run against ``cvserve serve`` as written.

This also checks that the ``serve`` command exposes the Open Inference Protocol.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.integration.test_kserve import ROOT, scene, write_repository

tc = pytest.importorskip("tritonclient.grpc")

DOC = ROOT / "docs" / "kserve.md"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """``cvserve serve`` on a free port with a fake instance model; yields its address."""
    repository = write_repository(tmp_path, [{"name": "shapes", "task": "instance", "max_batch_size": 2}])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cvserve", "serve", "--models", str(repository), "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--no-metrics"], env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stderr is not None
    try:
        address = None
        for line in proc.stderr:
            if match := re.search(r"serving on port (\d+)", line):
                address = f"127.0.0.1:{match.group(1)}"
                break
        assert address, f"server exited with {proc.poll()} before serving"
        client = tc.InferenceServerClient(address)
        end = time.monotonic() + 60
        while not client.is_server_ready():
            assert time.monotonic() < end, "server never became ready"
            time.sleep(0.1)
        client.close()
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_documented_examples_run(served: str, tmp_path: Path) -> None:
    image_path = tmp_path / "street.png"
    Image.fromarray(scene()).save(image_path)
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 2
    settings = {"URL": served, "MODEL": "shapes", "IMAGE_PATH": str(image_path)}
    first = blocks[0]
    for name, value in settings.items():
        first, count = re.subn(rf'^{name} = ".*"$', f"{name} = {value!r}", first, flags=re.M)
        assert count == 1, f"the example no longer sets {name}"
    out = io.StringIO()
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(out):
        for block in (first, *blocks[1:]):
            exec(compile(block, str(DOC), "exec"), namespace)
    lines = out.getvalue().splitlines()
    # The fake detector scores the red region 0.53 and the blue one 0.37: the example's
    # score_threshold of 0.5 keeps only red (class 0). The batch has one red frame.
    detections = [line for line in lines if line.startswith("class ")]
    assert [line.split()[1] for line in detections] == ["0"]
    assert all(int(re.search(r"mask (\d+) px", line).group(1)) > 0 for line in detections)
    assert lines[-2] == "frame 0: 1 detections [[8.0, 8.0, 88.0, 56.0]]"
    assert lines[-1] == "frame 1: 0 detections []"
