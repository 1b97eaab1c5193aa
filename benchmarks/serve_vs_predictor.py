"""The server against detectron2's ``DefaultPredictor``, same model, weights, images and thresholds.

Prints, for each concurrency: images/s and p50 / p95 / p99 latency of ``cvserve serve``
(a subprocess, called over gRPC with JPEG images, masks returned as RLE) next to
``DefaultPredictor`` looped in this process over the same decoded images, and their
ratio; the per-stage breakdown from the server's ``cvserve_stage_seconds`` metric; a
batch-size sweep (a fresh server per ``max_batch_size``, ``auto`` included); the
server's peak RSS. Run from the repository root::

    .venv/bin/python benchmarks/serve_vs_predictor.py                  # the built demo model
    .venv/bin/python benchmarks/serve_vs_predictor.py --model r50 --images 12 --requests 24
    .venv/bin/python benchmarks/serve_vs_predictor.py --model r50 --min-size 800 --bf16-predictor \
        --concurrency 1,4 --sweep "" --rounds 3 --requests 12

The server runs on its defaults (``precision: auto``: bf16 on a CPU with native bf16);
``--bf16-predictor`` adds ``DefaultPredictor`` under bf16 autocast to every round, the
serving layer's cost at equal precision.

Each concurrency runs ``--rounds`` rounds of the predictor followed by the server (idle
while the predictor runs), and its ratio is over those same rounds, so drifts in the
machine's speed (it is shared) hit both sides alike. The sweep's ratios are against all
predictor rounds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

from cvserve.metrics import STAGES


class PredictorLoop:
    """``DefaultPredictor`` called in a loop in this process over the benchmark's images.

    ``precision`` fp16 / bf16: each call runs under the project's one autocast context
    (``cvserve.models.precision.autocast``), as the server's adapter does: CUDA fp16 / bf16,
    or CPU bf16 with channels-last weights, the plain way to run detectron2 in bf16 on a
    CPU. On a GPU the detections are copied to the host (as the server's are before
    encoding), so both sides finish the same work.
    """

    def __init__(
        self, model: _common.BenchModel, images: list[Any], device: str = "cpu", precision: str = "fp32"
    ) -> None:
        import torch
        from detectron2.engine import DefaultPredictor

        from cvserve.models.precision import autocast

        self.predictor = DefaultPredictor(model.cfg(device))
        self.on_gpu = device.startswith("cuda")
        if precision == "bf16" and not self.on_gpu:
            self.predictor.model.to(memory_format=torch.channels_last)
        self.autocast = lambda: autocast(device, precision)
        self.bgr = [img[:, :, ::-1].copy() for img in images]
        self._call(self.bgr[0])  # warm-up
        self.next = 0

    def _call(self, image: Any) -> None:
        with self.autocast():
            out = self.predictor(image)
        if self.on_gpu:
            out["instances"].to("cpu")  # waits for the GPU, like the server's copy to the host

    def run(self, requests: int) -> tuple[float, list[float]]:
        """Wall seconds and per-call latencies of ``requests`` calls."""
        latencies = []
        start = time.perf_counter()
        for _ in range(requests):
            t = time.perf_counter()
            self._call(self.bgr[self.next % len(self.bgr)])
            self.next += 1
            latencies.append(time.perf_counter() - t)
        return time.perf_counter() - start, latencies


def load(
    address: str, model: str, payloads: list[bytes], concurrency: int, requests: int
) -> tuple[float, list[float]]:
    """Send ``requests`` Detect calls from ``concurrency`` threads; wall seconds and latencies."""
    from cvserve.client.client import Client

    latencies: list[float] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def worker(client: Client) -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            client.detect_response(payloads[i % len(payloads)], model=model)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    clients = [Client(address, timeout=600) for _ in range(concurrency)]
    for c in clients:  # connect before the clock starts
        c.list_models()
    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in clients:
        c.close()
    return wall, latencies


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def stage_means(before: dict[str, float], after: dict[str, float], model: str) -> dict[str, float]:
    """Mean seconds per image in each stage between two scrapes."""
    out = {}
    for stage in STAGES:
        labels = f'{{model="{model}",stage="{stage}",version="1"}}'
        count = delta(before, after, f"cvserve_stage_seconds_count{labels}")
        total = delta(before, after, f"cvserve_stage_seconds_sum{labels}")
        out[stage] = total / count if count else float("nan")
    return out


def row(label: str, wall: float, latencies: list[float], reference: float | None) -> str:
    rate = len(latencies) / wall
    ms = [v * 1000 for v in latencies]
    ratio = f"{rate / reference:6.2f}x" if reference else "      -"
    p50, p95, p99 = (_common.percentile(ms, q) for q in (50, 95, 99))
    return f"{label:28s} {rate:8.2f} {p50:9.1f} {p95:9.1f} {p99:9.1f} {ratio}"


@dataclass
class Measured:
    """Both sides at one concurrency, summed over the interleaved rounds."""

    concurrency: int
    predictor_wall: float = 0.0
    predictor_latencies: list[float] = field(default_factory=list)
    server_wall: float = 0.0
    server_latencies: list[float] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    bf16_wall: float = 0.0
    bf16_latencies: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        server = len(self.server_latencies) / self.server_wall
        return server / (len(self.predictor_latencies) / self.predictor_wall)

    @property
    def bf16_ratio(self) -> float:
        server = len(self.server_latencies) / self.server_wall
        return server / (len(self.bf16_latencies) / self.bf16_wall)


def run_concurrency(
    args: argparse.Namespace,
    model: _common.BenchModel,
    predictor: PredictorLoop,
    payloads: list[bytes],
    work: Path,
    bf16: PredictorLoop | None = None,
) -> tuple[list[Measured], dict[str, int]]:
    """Per concurrency, ``args.rounds`` rounds of the predictor then the server (the server
    idles while the predictor runs), so drifts in machine speed hit both sides alike."""
    results = []
    spec = model.spec(args.max_batch_size, args.max_wait_ms, args.instances)
    with _common.serve([spec], work, workers=args.workers, flags=args.server_flag) as server:
        load(server.address, model.name, payloads, 2, 4)  # warm the server's pools
        for c in args.concurrency:
            m = Measured(c)
            per_round = max(args.requests // args.rounds, 2 * c)
            before = server.scrape()
            for _ in range(args.rounds):
                wall, latencies = predictor.run(per_round)
                m.predictor_wall += wall
                m.predictor_latencies += latencies
                if bf16 is not None:
                    wall, latencies = bf16.run(per_round)
                    m.bf16_wall += wall
                    m.bf16_latencies += latencies
                wall, latencies = load(server.address, model.name, payloads, c, per_round)
                m.server_wall += wall
                m.server_latencies += latencies
            m.stages = stage_means(before, server.scrape(), model.name)
            results.append(m)
        memory = server.memory_kib()
        ready = [line for line in server.log_path.read_text().splitlines() if " ready in " in line]
    if ready:
        print(
            "server: " + ready[-1].split(" ready in ", 1)[1]
        )  # e.g. "1.2 s (2 instance(s), max_batch_size 4)"
    return results, memory


def run_sweep(
    args: argparse.Namespace, model: _common.BenchModel, payloads: list[bytes], work: Path, reference: float
) -> None:
    c = max(args.concurrency)
    print(f"\nbatch-size sweep at concurrency {c} (max_wait_ms {args.sweep_wait_ms})")
    print(
        f"{'max_batch_size':28s} {'images/s':>8s} {'p50 ms':>9s} {'p95 ms':>9s} {'p99 ms':>9s}  ratio  mean batch"
    )
    for size in args.sweep:
        value: int | str = size if size == "auto" else int(size)
        entry = model.spec(value, args.sweep_wait_ms, args.instances)
        with _common.serve([entry], work, workers=args.workers, flags=args.server_flag) as server:
            load(server.address, model.name, payloads, 2, 4)
            before = server.scrape()
            wall, latencies = load(server.address, model.name, payloads, c, max(args.requests, 2 * c))
            after = server.scrape()
        batches = delta(before, after, f'cvserve_batch_size_count{{model="{model.name}",version="1"}}')
        mean_batch = delta(
            before, after, f'cvserve_batch_size_sum{{model="{model.name}",version="1"}}'
        ) / max(batches, 1)
        chosen = after.get(f'cvserve_max_batch_size{{model="{model.name}",policy="auto",version="1"}}')
        label = f"auto (chose {chosen:.0f})" if size == "auto" and chosen else size
        print(f"{row(label, wall, latencies, reference)}  {mean_batch:6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["demo", "tiny", "r50"], default="demo")
    parser.add_argument("--images", type=int, default=16, help="distinct images (default: 16)")
    parser.add_argument("--size", default="480x640", help="image HxW (default: 480x640)")
    parser.add_argument(
        "--requests", type=int, default=48, help="requests per side and concurrency (default: 48)"
    )
    parser.add_argument(
        "--rounds", type=int, default=4, help="interleaved rounds per concurrency (default: 4)"
    )
    parser.add_argument("--concurrency", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--workers", type=int, default=4, help="server --workers (default: 4)")
    parser.add_argument(
        "--max-batch-size",
        default="auto",
        help="server max_batch_size: N or auto (default: auto, as the demo)",
    )
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument(
        "--instances", default="auto", help="server instances: N or auto (default: auto, as the demo)"
    )
    parser.add_argument("--sweep", type=lambda s: s.split(",") if s else [], default=["1", "2", "4", "auto"])
    parser.add_argument("--sweep-wait-ms", type=float, default=10.0)
    parser.add_argument("--min-size", type=int, default=0, help="INPUT.MIN_SIZE_TEST (default: the model's)")
    parser.add_argument(
        "--bf16-predictor",
        action="store_true",
        help="also run DefaultPredictor under bf16 autocast (channels-last) in every round",
    )
    parser.add_argument(
        "--server-flag",
        action="append",
        default=[],
        help="extra `cvserve serve` flag, e.g. --server-flag=--full-decode (repeatable)",
    )
    args = parser.parse_args()
    args.max_batch_size = args.max_batch_size if args.max_batch_size == "auto" else int(args.max_batch_size)
    args.instances = args.instances if args.instances == "auto" else int(args.instances)
    logging.basicConfig(level=logging.WARNING)
    height, width = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory(prefix="cvserve-bench-") as tmp:
        work = Path(tmp)
        model = _common.prepare_model(args.model, work)
        _common.with_min_size(model, args.min_size)
        images = _common.make_images(args.images, height, width, shapes=args.model == "demo")
        payloads = [_common.encode_jpeg(img) for img in images]
        print(f"machine: {_common.machine()}")
        print(
            f"model {args.model}, weights {model.weights_note}, images {height}x{width} JPEG, {model.options}"
        )
        predictor = PredictorLoop(model, images)
        bf16 = PredictorLoop(model, images, precision="bf16") if args.bf16_predictor else None
        results, memory = run_concurrency(args, model, predictor, payloads, work, bf16)
        print(f"\n{'':28s} {'images/s':>8s} {'p50 ms':>9s} {'p95 ms':>9s} {'p99 ms':>9s}  ratio")
        for m in results:
            print(
                row(
                    f"DefaultPredictor (c={m.concurrency} rounds)",
                    m.predictor_wall,
                    m.predictor_latencies,
                    None,
                )
            )
            server_rate = len(m.server_latencies) / m.server_wall
            reference = server_rate / m.ratio
            if m.bf16_latencies:
                print(row(f"DefaultPredictor bf16 (c={m.concurrency})", m.bf16_wall, m.bf16_latencies, None))
            print(row(f"server, concurrency {m.concurrency}", m.server_wall, m.server_latencies, reference))
            if m.bf16_latencies:
                print(f"    against DefaultPredictor under bf16 autocast: {m.bf16_ratio:.2f}x")
            print("    per image, ms: " + "  ".join(f"{k} {v * 1000:.1f}" for k, v in m.stages.items()))
        print(
            f"ratio: server images/s over DefaultPredictor's in the same {args.rounds} interleaved rounds "
            "(predictor, then server, each round)"
        )
        print(f"server RSS {memory['VmRSS'] / 1024:.0f} MiB, peak (VmHWM) {memory['VmHWM'] / 1024:.0f} MiB")
        all_predictor = [v for m in results for v in m.predictor_latencies]
        reference = len(all_predictor) / sum(m.predictor_wall for m in results)
        if args.sweep:
            run_sweep(args, model, payloads, work, reference)
        print(f"load average at the end: {_common.machine().rsplit('load average ', 1)[1]}")


if __name__ == "__main__":
    main()
