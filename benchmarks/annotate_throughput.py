"""Images per second of ``cvserve annotate``: in-process, through a local server, and on a local Ray.

Generates small synthetic images, then annotates them with each engine and prints one
row per (model, engine). Models: the weight-free fake detector (measures the pipeline:
reading, decoding, journal, outputs) and, with ``--real``, the tiny Mask R-CNN of
``models/configs/tiny_mask_rcnn.yaml`` with random weights (a real network's cost).

``images/s`` is for the whole run, including, for Ray, starting the actors and loading
the model in each (Ray's own start-up, ``ray.init``, is not counted); ``steady/s`` is the
rate after the first batch arrived. Run from the repository root::

    .venv/bin/python benchmarks/annotate_throughput.py --images 300 --real
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from cvserve.annotation.job import AnnotateJob, AnnotateSummary, annotate  # noqa: E402
from cvserve.annotation.predictors import LocalPredictor, Predictor, ServerPredictor  # noqa: E402
from cvserve.models.repository import ModelSpec, load_repository  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        rgb[y : y + size // 2, x : x + size // 2, i % 3] = 230
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), rgb[..., ::-1])


def write_repository(path: Path, real: bool, fake_ms: float) -> list[ModelSpec]:
    models: list[dict[str, Any]] = [
        {"name": "fake", "task": "instance", "config": "-", "max_batch_size": 8, "max_wait_ms": 2}
    ]
    models[0]["handler"] = "tests.fixtures.fake_models:build_fake"
    if fake_ms:
        models[0]["options"] = {"per_image_ms": fake_ms}
    if real:
        models.append(
            {
                "name": "tiny-maskrcnn",
                "task": "instance",
                "config": str(ROOT / "models/configs/tiny_mask_rcnn.yaml"),
                "max_batch_size": 1,
                "max_wait_ms": 0,
                # Random weights score every proposal alike: cap the detections at a realistic count.
                "options": {
                    "class_names": ["circle", "square", "triangle", "star", "ring"],
                    "max_detections": 20,
                },
            }
        )
    path.write_text(yaml.safe_dump({"models": models}))
    return load_repository(path)


class Timed(Predictor):
    """Delegates to a predictor and notes when each batch arrives, to tell start-up from steady rate."""

    def __init__(self, inner: Predictor) -> None:
        self.inner = inner
        self.info = inner.info
        self.arrivals: list[tuple[float, int]] = []

    def map_batches(self, batches: Any, render: Any) -> Iterator[list[dict[str, Any]]]:
        for records in self.inner.map_batches(batches, render):
            self.arrivals.append((time.perf_counter(), len(records)))
            yield records

    def steady_rate(self) -> float:
        """Images/s after the first batch arrived (actors started, models loaded)."""
        if len(self.arrivals) < 2:
            return float("nan")
        images = sum(n for _, n in self.arrivals[1:])
        return images / (self.arrivals[-1][0] - self.arrivals[0][0])

    def close(self) -> None:
        self.inner.close()


def run_engine(
    engine: str, spec: ModelSpec, job: AnnotateJob, args: argparse.Namespace, server: Any
) -> tuple[AnnotateSummary, float]:
    """Annotate the job with one engine; returns the summary and the steady rate."""
    inner: Predictor
    if engine == "local":
        inner = LocalPredictor.from_repository(args.repo, spec.name, concurrency=2)
    elif engine == "server":
        inner = ServerPredictor(server.address, spec.name, concurrency=args.concurrency)
    else:
        from cvserve.annotation.ray_engine import RayPredictor

        inner = RayPredictor(spec, num_actors=args.num_actors)
    with Timed(inner) as predictor:
        return annotate(job, predictor, progress=False), predictor.steady_rate()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=300, help="images for the fake model")
    parser.add_argument("--real-images", type=int, default=40, help="images for the tiny real model")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--engines", default="local,server,ray", help="comma-separated subset")
    parser.add_argument("--batch-size", type=int, default=8, help="images per journal write / Ray call")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight to the server")
    parser.add_argument("--num-actors", type=int, default=2, help="Ray actors")
    parser.add_argument("--real", action="store_true", help="also time the tiny Mask R-CNN (random weights)")
    parser.add_argument("--fake-ms", type=float, default=0.0, help="simulated compute per image, fake model")
    return parser.parse_args(argv)


def prepare(tmp: Path, args: argparse.Namespace) -> list[ModelSpec]:
    """Write the repository and one image folder per model (hard links to one image set)."""
    args.repo = str(tmp / "models.yaml")
    specs = write_repository(Path(args.repo), args.real, args.fake_ms)
    make_images(tmp / "images", max(args.images, args.real_images), args.size)
    counts = {"fake": args.images, "tiny-maskrcnn": args.real_images}
    for spec in specs:
        (tmp / spec.name).mkdir()
        for i in range(counts[spec.name]):
            os.link(tmp / "images" / f"{i:05d}.jpg", tmp / spec.name / f"{i:05d}.jpg")
    return specs


def start_backends(engines: list[str], specs: list[ModelSpec]) -> Any:
    """Start the server (returned) and Ray, as the engines need."""
    server = None
    if "ray" in engines:  # first: Ray's start-up times out on a machine busy with a server
        from cvserve.annotation.ray_engine import import_ray

        ray = import_ray()
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if "server" in engines:
        from cvserve.config import ServerConfig
        from cvserve.server.build import ServerThread

        server = ServerThread(ServerConfig(port=0, metrics_port=None, worker_threads=2), specs)
        server.start(wait_loaded=True)
    return server


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="annotate-bench-"))
    specs = prepare(tmp, args)
    server = start_backends(engines, specs)
    print(f"{'model':<15} {'engine':<7} {'images':>6} {'seconds':>8} {'images/s':>9} {'steady/s':>9}")
    try:
        for spec in specs:
            for engine in engines:
                out = tmp / "out" / f"{spec.name}-{engine}.json"
                job = AnnotateJob(inputs=(str(tmp / spec.name),), out=str(out), batch_size=args.batch_size)
                try:
                    s, steady = run_engine(engine, spec, job, args, server)
                except Exception as e:  # a broken model or engine must not hide the other rows
                    print(f"{spec.name:<15} {engine:<7} failed: {str(e).splitlines()[0][:120]}", flush=True)
                    continue
                row = f"{spec.name:<15} {engine:<7} {s.done:>6} {s.elapsed_s:>8.2f} {s.images_per_s:>9.1f}"
                print(f"{row} {steady:>9.1f}" + (f"  ({s.failed} failed)" if s.failed else ""), flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
