"""Shared set-up of the serving benchmarks: models with saved weights, images, a server process.

Both sides of every comparison load the same weights file and the same config (same
input size, thresholds and detection cap), so only the serving path differs.

Models:
    ``demo``: the demo repository's trained instance model (its ``config.yaml`` and
        ``model.pth``; build it with ``cvserve demo build``), at its own score threshold.
        Fed synthetic shapes images (:func:`make_images` with ``shapes=True``), the
        kind it was trained on, so it finds what it would find in use.
    ``tiny``: the demo's config (``models/instance/tiny_mask_rcnn.yaml``, 256 px short
        side) with random weights.
    ``r50``: model-zoo R50-FPN Mask R-CNN, random weights, ``MIN_SIZE_TEST`` 480.
    ``fake``: the weight-free fake detector (the serving path alone).

Random weights score every proposal alike, so a low score threshold plus a detection
cap of 20 gives each image a realistic number of masks to paste and encode.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MAX_DETECTIONS = 20


@dataclass(frozen=True)
class BenchModel:
    """A model written to disk for both the in-process predictor and the server."""

    name: str
    config_path: Path
    weights_path: Path | None
    weights_note: str  # "random" or where trained weights came from
    options: dict[str, Any]

    def cfg(self, device: str = "cpu") -> Any:
        """The detectron2 config ``DefaultPredictor`` uses, with the server's options applied."""
        from cvserve.models.instance.config import load_config

        cfg = load_config(str(self.config_path))
        cfg.MODEL.WEIGHTS = str(self.weights_path or "")
        cfg.MODEL.DEVICE = device
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = self.options["score_threshold"]
        cfg.TEST.DETECTIONS_PER_IMAGE = self.options["max_detections"]
        return cfg

    def spec(
        self,
        max_batch_size: int | str = 1,
        max_wait_ms: float = 0.0,
        instances: int | str = 1,
        device: str = "cpu",
    ) -> dict[str, Any]:
        """A repository entry for this model."""
        entry: dict[str, Any] = {
            "name": self.name,
            "task": "instance",
            "config": str(self.config_path),
            "device": device,
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_queue": 256,
            "instances": instances,
            "options": dict(self.options),
        }
        if self.weights_path is not None:
            entry["weights"] = str(self.weights_path)
        return entry


def demo_instance_entry() -> tuple[Path, Path]:
    """``(config, weights)`` of the built demo repository's instance model.

    Raises:
        FileNotFoundError: the demo repository is not built.
    """
    from cvserve.models.demo.build import INSTANCE_NAME
    from cvserve.models.paths import default_repository_path
    from cvserve.models.repository import load_repository

    path = default_repository_path()
    if not path.is_file():
        raise FileNotFoundError(f"no demo repository at {path}: build it with `cvserve demo build`")
    for spec in load_repository(path):
        if spec.name == INSTANCE_NAME and spec.weights:
            return Path(spec.config), Path(spec.weights)
    raise FileNotFoundError(f"{path} has no {INSTANCE_NAME!r} model with weights")


def prepare_model(kind: str, workdir: Path) -> BenchModel:
    """Write ``kind``'s config and weights (see the module docstring) under ``workdir``."""
    import torch

    if kind == "fake":
        return BenchModel("fake", workdir / "none.yaml", None, "no weights", {})
    from cvserve.models import compat

    compat.apply()  # before the first detectron2 import
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from cvserve.models.data.synthetic import CATEGORIES
    from cvserve.models.instance.config import load_config

    trained: Path | None = None
    if kind == "demo":
        config, trained = demo_instance_entry()
        cfg = load_config(str(config))
        threshold = float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)
    elif kind == "tiny":
        cfg = load_config(str(ROOT / "models/instance/tiny_mask_rcnn.yaml"))
        threshold = 0.2  # random weights: every class scores about 1/6
    else:
        cfg = load_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
        cfg.INPUT.MIN_SIZE_TEST = 480
        threshold = 0.01  # random weights: about 1/81 per class
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    config_path = workdir / f"{kind}.yaml"
    config_path.write_text(cfg.dump())
    weights = trained
    if weights is None:
        torch.manual_seed(0)
        weights = workdir / f"{kind}_random.pth"
        DetectionCheckpointer(build_model(cfg), save_dir=str(workdir)).save(weights.stem)
    options: dict[str, Any] = {"score_threshold": threshold, "max_detections": MAX_DETECTIONS}
    if kind in ("demo", "tiny"):
        options["class_names"] = list(CATEGORIES)
    note = f"trained ({weights})" if trained else "random (seed 0)"
    return BenchModel(kind, config_path, weights, note, options)


def with_min_size(model: BenchModel, min_size: int | None) -> BenchModel:
    """The same model with its config's ``INPUT.MIN_SIZE_TEST`` set (None or 0: as configured)."""
    if min_size:
        from cvserve.models.instance.config import load_config

        cfg = load_config(str(model.config_path))
        cfg.INPUT.MIN_SIZE_TEST = min_size
        model.config_path.write_text(cfg.dump())
    return model


def forward_parser(description: str | None) -> argparse.ArgumentParser:
    """The options of the scripts comparing two ways of running the instance adapter's forward."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["demo", "tiny", "r50"], default="demo")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-size", type=int, default=0, help="INPUT.MIN_SIZE_TEST (default: the model's)")
    return parser


def instance_adapter(model: BenchModel, precision: str) -> Any:
    """The server's instance adapter (``DetectronModel``) for ``model`` at ``precision``, loaded."""
    from cvserve.models.instance.adapter import DetectronModel
    from cvserve.models.repository import parse_spec

    adapter = DetectronModel(parse_spec({**model.spec(), "precision": precision}, "benchmark", Path(".")))
    adapter.load()
    return adapter


@contextlib.contextmanager
def forward_session(
    description: str | None,
) -> Iterator[tuple[argparse.Namespace, BenchModel, Any, list[Any]]]:
    """For the scripts comparing forwards: parse :func:`forward_parser`'s options, print the
    machine, and give the model (in a temporary directory for the block), its loaded adapter
    and the prepared images."""
    import tempfile

    args = forward_parser(description).parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="cvserve-bench-") as tmp:
        model = prepare_model(args.model, Path(tmp))
        with_min_size(model, args.min_size)
        adapter = instance_adapter(model, args.precision)
        print(f"model {args.model} ({model.weights_note}), precision {adapter.precision}")
        items = [adapter.prepare(image) for image in make_images(args.images, 480, 640, shapes=True)]
        yield args, model, adapter, items


def alternate_forwards(
    adapter: Any,
    items: Sequence[Any],
    variants: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]],
    rounds: int,
    size: tuple[int, int] = (480, 640),
) -> tuple[bool, dict[str, list[float]]]:
    """Time ``adapter.forward`` on each item under each variant, variants alternating round by round.

    Args:
        variants: name -> a function giving the context that variant's forwards run in.
        size: the image size the detections are postprocessed to for the comparison.

    Returns:
        Whether every variant gave the same detections (boxes, classes, scores, mask RLEs;
        one warm-up forward per item), and each variant's seconds per forward.
    """
    outputs = []
    for context in variants.values():
        with context():
            raw = [adapter.forward([item])[0] for item in items]
        outputs.append([adapter.postprocess(r, size).instances for r in raw])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, context in variants.items():
            with context():
                for item in items:
                    start = time.perf_counter()
                    adapter.forward([item])
                    times[name].append(time.perf_counter() - start)
    return all(o == outputs[0] for o in outputs), times


def report_forwards(
    adapter: Any,
    items: Sequence[Any],
    variants: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]],
    rounds: int,
    label: str,
) -> None:
    """Run :func:`alternate_forwards` and print its comparison and each variant's median forward.

    ``label`` names a variant in the output, e.g. ``"forward with {} RoIAlign"``.
    """
    import statistics

    equal, times = alternate_forwards(adapter, items, variants, rounds)
    print(f"detections equal (boxes, classes, scores, mask RLEs): {equal}")
    for name, samples in times.items():
        print(f"{label.format(name)}: median {1000 * statistics.median(samples):.1f} ms "
              f"({len(samples)} forwards, alternating rounds)")  # fmt: skip


def fake_spec(per_image_ms: float) -> dict[str, Any]:
    """The fake detector's repository entry (sleeps ``per_image_ms`` per image in forward)."""
    return {
        "name": "fake",
        "task": "instance",
        "config": "-",
        "handler": "tests.fixtures.fake_models:build_fake",
        "max_batch_size": 1,
        "max_queue": 256,
        "options": {"per_image_ms": per_image_ms} if per_image_ms else {},
    }


def make_images(n: int, height: int, width: int, seed: int = 0, *, shapes: bool = False) -> list[np.ndarray]:
    """``n`` RGB uint8 images.

    Noise with a few bright rectangles and discs (photo-like JPEG sizes), or with
    ``shapes`` the demo dataset's scenes (:func:`cvserve.models.data.synthetic.render_image`,
    seed ``1000 + seed``: not the demo's own splits).
    """
    import cv2

    if shapes:
        from cvserve.models.data.synthetic import render_image

        rngs = (np.random.default_rng([1000 + seed, i]) for i in range(n))
        return [render_image(r, (height, width))[0] for r in rngs]
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        img = (rng.random((height, width, 3)) * 80).astype(np.uint8)
        for _ in range(4):
            colour = tuple(int(c) for c in rng.integers(60, 255, 3))
            x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            s = int(rng.integers(20, max(21, min(height, width) // 3)))
            if rng.random() < 0.5:
                cv2.rectangle(img, (x, y), (x + s, y + s), colour, -1)
            else:
                cv2.circle(img, (x + s // 2, y + s // 2), s // 2, colour, -1)
        images.append(img)
    return images


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    import cv2

    ok, data = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A ``cvserve serve`` subprocess."""

    process: subprocess.Popen[bytes]
    address: str
    metrics_url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def memory_kib(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the server process, KiB."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def scrape(self) -> dict[str, float]:
        """The server's Prometheus samples, ``name{labels}`` -> value."""
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples


@contextlib.contextmanager
def serve(
    entries: list[dict[str, Any]],
    workdir: Path,
    *,
    workers: int = 4,
    extra_env: dict[str, str] | None = None,
    flags: Sequence[str] = (),
) -> Iterator[ServerProcess]:
    """Run ``cvserve serve`` on ``entries`` (plus ``flags``) until the block exits; wait until every model is ready."""
    repo = workdir / "models.yaml"
    repo.write_text(yaml.safe_dump({"models": entries}))
    port, metrics_port = free_port(), free_port()
    log_path = workdir / f"server-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    command = [sys.executable, "-m", "cvserve", "serve", "--models", str(repo), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--metrics-port", str(metrics_port), "--workers", str(workers), *flags]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(process, f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", log_path)
    try:
        _wait_ready(server, [e["name"] for e in entries])
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(server: ServerProcess, names: list[str], timeout: float = 600.0) -> None:
    from cvserve.client.client import Client, ClientError

    deadline = time.monotonic() + timeout
    with Client(server.address, timeout=5) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited ({server.process.returncode}); see {server.log_path}")
            with contextlib.suppress(ClientError):
                states = {m["name"]: m for m in client.list_models()}
                if all(states.get(n, {}).get("ready") for n in names):
                    return
                failed = [n for n in names if states.get(n, {}).get("error")]
                if failed:
                    raise RuntimeError(f"model(s) {failed} failed to load; see {server.log_path}")
            time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout:.0f} s; see {server.log_path}")


def machine() -> str:
    """One line naming the machine: CPU model, cores, RAM, torch, load average."""
    import torch

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, {ram_gib:.1f} GiB RAM, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average {load}"
    )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")
