"""``cvserve annotate --server`` against a real server on an ephemeral port with the fake models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from cvserve.cli.main import main
from cvserve.models.repository import load_repository

server_module = pytest.importorskip("cvserve.server.build")
ROOT = Path(__file__).resolve().parents[2]
FAKE = "tests.fixtures.fake_models:build_fake"
MODELS = [
    {"name": "det", "task": "instance", "max_batch_size": 4, "max_wait_ms": 5},
    {"name": "seg", "task": "semantic", "max_batch_size": 2, "max_wait_ms": 5},
]

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repo") / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [{"config": "fake", "handler": FAKE, **m} for m in MODELS]}))
    return path


@pytest.fixture(scope="module")
def address(repo: Path) -> Iterator[str]:
    from cvserve.config import ServerConfig

    config = ServerConfig(port=0, metrics_port=None, worker_threads=2, warmup=False)
    with server_module.ServerThread(config, load_repository(repo)).start(wait_loaded=True) as srv:
        yield srv.address


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for i in range(10):
        rgb = np.zeros((30, 40, 3), np.uint8)
        rgb[:, : 10 + i, i % 3] = 230
        rgb[12:, 20:, (i + 1) % 3] = 250
        cv2.imwrite(str(tmp_path / f"{i:02d}.png"), rgb[..., ::-1])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return tmp_path


@pytest.mark.parametrize("model", ["det", "seg"])
def test_server_results_equal_in_process_results(
    images: Path, repo: Path, address: str, tmp_path_factory: pytest.TempPathFactory, model: str
) -> None:
    out = tmp_path_factory.mktemp("out")
    common = [str(images), "--model", model, "--quiet"]
    remote = [*common, "--server", address, "--concurrency", "3", "--out", str(out / "remote.json")]
    assert main(["annotate", *remote]) == 0
    assert main(["annotate", *common, "--models", str(repo), "--out", str(out / "local.json")]) == 0
    for suffix in (".json", ".images.json"):
        remote_doc = json.loads((out / f"remote{suffix}").read_text())
        local_doc = json.loads((out / f"local{suffix}").read_text())
        if suffix == ".images.json":
            remote_doc["info"].pop("labels_dir", None)
            local_doc["info"].pop("labels_dir", None)
        else:  # scores travel as float32 on the wire
            for result in local_doc:
                result["score"] = pytest.approx(result["score"], rel=1e-6)
        assert remote_doc == local_doc
    [error] = json.loads((out / "remote.errors.json").read_text())
    assert error["path"].endswith("broken.jpg")


def test_unknown_model_on_the_server_is_a_cli_error(
    images: Path, address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "annotate",
        str(images),
        "--model",
        "nope",
        "--server",
        address,
        "--out",
        str(tmp_path / "r.json"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--server {address}: model 'nope'" in err and "NOT_FOUND" in err
