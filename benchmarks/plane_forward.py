"""The instance forward inside the server's pipeline against the same forward called directly.

In one process, without gRPC: a ``DataPlane`` serving the model (``max_batch_size`` and
``instances`` auto, as ``serve_vs_predictor.py`` serves it). Rounds alternate between

- ``pipeline``: sequential requests through the data plane: JPEG decode in its CPU pool,
  then ``infer_timed`` (preprocess in the pool, the forward on a model thread through the
  batcher, postprocess in the pool);
- ``direct``: the adapter's forward on the same model thread, on inputs prepared beforehand.

Prints each round's median forward (timed around the adapter's ``forward``, so both sides
measure the same call), the process's minor page faults per forward, and the pipeline's
request latency and inference stage.

    .venv/bin/python benchmarks/plane_forward.py --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

from cvserve.models import compat

compat.apply()  # before detectron2's first import: the shims of cvserve.models.compat

from cvserve.dataplane.plane import DataPlane  # noqa: E402
from cvserve.imaging import decode_scaled  # noqa: E402
from cvserve.models.repository import parse_spec  # noqa: E402


async def _run(args: argparse.Namespace, workdir: Path) -> None:
    model = _common.prepare_model(args.model, workdir)
    spec = parse_spec(model.spec("auto", 0.0, "auto"), "benchmark", workdir)
    images = _common.make_images(8, 480, 640, shapes=True)
    payloads = [_common.encode_jpeg(image) for image in images]
    plane = DataPlane([spec])
    await plane.start()
    await plane.wait_loaded()
    served = plane._entries[spec.name].select(None)
    adapter, executor = served.model, served.executor
    forwards: list[float] = []
    faults: list[int] = []
    original = type(adapter).forward

    def timed(self: Any, inputs: Any) -> Any:
        start, faulted = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            return original(self, inputs)
        finally:
            forwards.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted)

    type(adapter).forward = timed
    items = [adapter.prepare(image) for image in images]
    loop = asyncio.get_running_loop()
    print(
        f"{'round':>5s} {'pipeline fwd':>13s} {'direct fwd':>11s} {'request':>8s} {'inference stage':>16s}  (ms, p50)"
    )
    for r in range(args.rounds):
        forwards.clear()
        faults.clear()
        latency, stage = [], []
        for i in range(args.requests):
            start = time.perf_counter()
            image = await plane.run_cpu(
                lambda d: decode_scaled(d, max_pixels=1 << 30, needed=None), payloads[i % 8]
            )
            (outcome,) = await plane.infer_timed(spec.name, [image])
            latency.append(time.perf_counter() - start)
            stage.append(outcome.timing.compute_s)
        pipeline, pipeline_faults = statistics.median(forwards), statistics.mean(faults)
        forwards.clear()
        faults.clear()
        for i in range(args.requests):
            await loop.run_in_executor(executor, adapter.forward, [items[i % 8]])
        direct, direct_faults = statistics.median(forwards), statistics.mean(faults)
        print(f"{r + 1:5d} {1000 * pipeline:13.1f} {1000 * direct:11.1f} "
              f"{1000 * statistics.median(latency):8.1f} {1000 * statistics.median(stage):16.1f}"
              f"  {pipeline_faults:.1f}, {direct_faults:.1f}")  # fmt: skip
    type(adapter).forward = original
    await plane.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["demo", "tiny", "r50"], default="demo")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=40, help="per round and side (default: 40)")
    args = parser.parse_args()
    print(_common.machine())
    with tempfile.TemporaryDirectory(prefix="cvserve-plane-") as tmp:
        asyncio.run(_run(args, Path(tmp)))


if __name__ == "__main__":
    main()
