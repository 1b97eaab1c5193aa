"""The client-only distribution: its metadata follows cvserve's, and its wheel, installed into a
fresh virtual environment without torch, OpenCV or Pillow, calls a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from cvserve.client import Client
from cvserve.config import ServerConfig
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DEPS = ("grpcio", "protobuf", "numpy")

# Runs inside the fresh environment: argv = server address, scene .npy, output .json.
SCRIPT = """
import asyncio, importlib.util, json, sys
import numpy as np
from cvserve.client import AsyncClient, Client, ClientError

address, scene_path, out_path = sys.argv[1:]
missing = {name: importlib.util.find_spec(name) is None for name in ("torch", "cv2", "PIL", "detectron2")}
image = np.load(scene_path)
with Client(address, timeout=30) as client:
    rle = client.detect(image, model="det", mask_format="rle")
    png = client.detect(image, model="det", mask_format="png")
    seg = client.segment(image, model="seg")
    try:
        client.detect(image, model="nope")
        error = None
    except ClientError as e:
        error = e.code.name


async def detect_async():
    async with AsyncClient(address, timeout=30) as client:
        return await client.detect(image, model="det", mask_format="png")

png_async = asyncio.run(detect_async())
out = {
    "missing": missing,
    "modules": sorted({m.split(".")[0] for m in sys.modules}),
    "rle": [[list(i.box), i.category_id, i.score, i.mask.counts.decode()] for i in rle.instances],
    "png": [[list(i.box), i.category_id, i.score, i.mask.counts.decode()] for i in png.instances],
    "png_async": [[list(i.box), i.category_id, i.score, i.mask.counts.decode()] for i in png_async.instances],
    "labels": seg.semantic.labels.tolist(),
    "class_names": list(seg.semantic.class_names),
    "error": error,
}
json.dump(out, open(out_path, "w"))
"""


def requirement(spec: str) -> tuple[str, str]:
    name = spec.split(">")[0].split("<")[0].split("=")[0].strip()
    return name, spec[len(name) :].strip()


def test_client_distribution_follows_cvserves_version_and_dependency_ranges() -> None:
    main = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "clients/python/pyproject.toml").read_text())["project"]
    assert client["version"] == main["version"]
    ranges = dict(requirement(r) for r in main["dependencies"])
    assert dict(requirement(r) for r in client["dependencies"]) == {n: ranges[n] for n in CLIENT_DEPS}
    opencv = dict(requirement(r) for r in client["optional-dependencies"]["polygons"])
    assert opencv == {"opencv-python-headless": ranges["opencv-python-headless"]}


def scene(height: int = 48, width: int = 64) -> np.ndarray:
    """Red left part, blue right part: the fake detector finds a red and a blue instance."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2 + 4, 0] = 240
    img[height // 4 :, width // 2 :, 2] = 250
    return img


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    handler = {"config": "fake", "handler": "tests.fixtures.fake_models:build_fake"}
    models = [{"name": "det", "task": "instance", **handler}, {"name": "seg", "task": "semantic", **handler}]
    path = tmp_path_factory.mktemp("repo") / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    config = ServerConfig(port=0, metrics_port=None, worker_threads=2)
    with ServerThread(config, load_repository(path)).start(wait_loaded=True) as srv:
        yield srv


def fresh_environment() -> dict[str, str]:
    """The process environment without this interpreter's path settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "CVSERVE_SRC")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_calls_a_real_server(server: ServerThread, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_client
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    wheel = build_client.build(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as archive:  # no top-level name but cvserve, and no server code
        tops = {name.split("/")[0] for name in archive.namelist()}
        version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        assert tops == {"cvserve", f"cvserve_client-{version}.dist-info"}
        assert not any(n.startswith(("cvserve/server/", "cvserve/vision/")) for n in archive.namelist())
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    env = fresh_environment()
    constraints = ROOT / "requirements" / "constraints.txt"
    install = [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), str(wheel)]
    subprocess.run(install, check=True, env=env, cwd=tmp_path, timeout=600)

    np.save(tmp_path / "scene.npy", scene())
    (tmp_path / "call.py").write_text(SCRIPT)
    out = tmp_path / "out.json"
    call = [str(python), "call.py", server.address, "scene.npy", str(out)]
    subprocess.run(call, check=True, env=env, cwd=tmp_path, timeout=120)
    got = json.loads(out.read_text())

    assert got["missing"] == {"torch": True, "cv2": True, "PIL": True, "detectron2": True}
    assert not {"torch", "cv2", "PIL", "pycocotools"} & set(got["modules"])
    with Client(server.address, timeout=30) as client:  # the full distribution, in this process
        expected = client.detect(scene(), model="det", mask_format="rle")
        seg = client.segment(scene(), model="seg")
    assert seg.semantic is not None
    rows = [
        [list(i.box), i.category_id, i.score, i.mask.counts.decode()] for i in expected.instances if i.mask
    ]
    assert len(rows) == 2
    assert got["rle"] == rows
    assert got["png"] == rows  # PNG masks decoded and RLE-encoded in numpy: the server's bytes
    assert got["png_async"] == rows
    np.testing.assert_array_equal(np.asarray(got["labels"]), seg.semantic.labels)
    assert got["class_names"] == list(seg.semantic.class_names)
    assert got["error"] == "NOT_FOUND"
