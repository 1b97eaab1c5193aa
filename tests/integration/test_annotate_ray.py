"""The Ray Data engine against a local Ray: same outputs and resume as the in-process engine."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from cvserve.annotation.job import AnnotateJob, annotate
from cvserve.annotation.predictors import LocalPredictor
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Task
from tests.fixtures.fake_models import build_fake

ray = pytest.importorskip("ray")
pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
]

ROOT = Path(__file__).resolve().parents[2]
SPEC = ModelSpec(
    name="fake-det",
    task=Task.INSTANCE,
    config="unused",
    handler="tests.fixtures.fake_models:build_fake",
    max_batch_size=4,
)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # Workers inherit the environment of the Ray started here: they must import tests.fixtures.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _images(folder: Path, n: int) -> None:
    for i in range(n):
        rgb = np.zeros((24, 32, 3), np.uint8)
        rgb[:, : 8 + i % 20, i % 3] = 240
        rgb[10:, 12:, (i + 2) % 3] = 180
        path = folder / f"s{i % 3}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), rgb[..., ::-1])
    (folder / "bad.png").write_bytes(b"not a png")


def test_ray_engine_matches_local_and_resumes(tmp_path: Path, local_ray: None) -> None:
    from cvserve.annotation.ray_engine import RayPredictor

    _images(tmp_path / "in", 24)
    inputs = (str(tmp_path / "in"),)
    local_model = build_fake(SPEC)
    annotate(
        AnnotateJob(inputs=inputs, out=str(tmp_path / "local" / "r.json"), batch_size=4),
        LocalPredictor(local_model),
    )

    out = tmp_path / "ray" / "r.json"
    job = AnnotateJob(inputs=inputs, out=str(out), batch_size=4)
    with RayPredictor(SPEC, num_actors=2) as predictor:
        assert predictor.num_actors == 2 and predictor.gpus_per_actor == 0
        summary = annotate(job, predictor)
    assert ray.is_initialized()  # a Ray it did not start is left running
    assert (summary.done, summary.failed) == (24, 1)
    for name in ("r.json", "r.images.json", "r.errors.json"):
        assert (out.parent / name).read_bytes() == (tmp_path / "local" / name).read_bytes()

    # Keep the header and 10 records plus a torn line, as a kill of the driver would leave it.
    journal = out.with_name("r.journal.jsonl")
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join(lines[:11]) + b"\n" + lines[11][:7])
    kept = sum(b'"type":"image"' in line for line in lines[1:11])
    out.unlink()
    with RayPredictor(SPEC, num_actors=1) as predictor:
        resumed = annotate(job, predictor)
    assert (resumed.skipped, resumed.done) == (kept, 24 - kept)
    assert out.read_bytes() == (tmp_path / "local" / "r.json").read_bytes()
