"""Per-stage times of the instance adapter in fp32 and bf16, with and without masks.

In process, on ``DetectronModel`` (the server's adapter): preprocess, forward and
postprocess per image for each precision, and for requests that ask for masks and for
those that do not (``masks=False`` skips the mask head and the pasting). Rounds alternate
between the variants so drifts in the machine's speed hit all alike; medians are printed.
Run from the repository root::

    .venv/bin/python benchmarks/precision_stages.py --model r50 --min-size 800
    .venv/bin/python benchmarks/precision_stages.py --model tiny --size 3024x4032 --detections 100
    .venv/bin/python benchmarks/precision_stages.py --model demo --ops 12

``--ops N`` then profiles the forward (torch.profiler, with masks) in each precision and
prints the N operators with the most time of their own, per image.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


def _stages(adapter: Any, image: Any, masks: bool) -> tuple[float, float, float]:
    size = (int(image.shape[0]), int(image.shape[1]))
    t0 = time.perf_counter()
    item = adapter.prepare(image, masks=masks)
    t1 = time.perf_counter()
    (raw,) = adapter.forward([item])
    t2 = time.perf_counter()
    adapter.postprocess(raw, size)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def _op_times(adapter: Any, images: list[Any]) -> dict[str, float]:
    """Self CPU time of each operator over one forward per image, ms per image."""
    from torch.profiler import ProfilerActivity, profile

    items = [adapter.prepare(image, masks=True) for image in images]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for item in items:
            adapter.forward([item])
    return {e.key: e.self_cpu_time_total / 1000 / len(items) for e in prof.key_averages()}


def _print_ops(adapters: dict[str, Any], images: list[Any], top: int) -> None:
    ops = {p: _op_times(a, images) for p, a in adapters.items()}
    first = next(iter(ops))
    names = sorted(ops[first], key=lambda k: -max(o.get(k, 0.0) for o in ops.values()))[:top]
    print(f"\n{'operator, self CPU ms per image':36s}" + "".join(f"{p:>9s}" for p in ops))
    for name in names:
        print(f"{name:36s}" + "".join(f"{o.get(name, 0.0):9.2f}" for o in ops.values()))
    print(f"{'all operators':36s}" + "".join(f"{sum(o.values()):9.2f}" for o in ops.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["demo", "tiny", "r50"], default="r50")
    parser.add_argument("--size", default="480x640", help="image HxW (default: 480x640)")
    parser.add_argument("--min-size", type=int, default=0, help="INPUT.MIN_SIZE_TEST (default: the model's)")
    parser.add_argument("--detections", type=int, default=_common.MAX_DETECTIONS)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--ops", type=int, default=0, help="also print the N costliest operators")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="cvserve-bench-") as tmp:
        model = _common.prepare_model(args.model, Path(tmp))
        model.options["max_detections"] = args.detections
        _common.with_min_size(model, args.min_size)
        images = _common.make_images(args.images, height, width, shapes=args.model in ("demo", "tiny"))
        print(f"machine: {_common.machine()}")
        print(f"model {args.model}, weights {model.weights_note}, images {height}x{width}, {model.options}")
        adapters = {p: _common.instance_adapter(model, p) for p in args.precisions.split(",")}
        variants = [(p, m) for p in adapters for m in (True, False)]
        times: dict[tuple[str, bool], list[tuple[float, float, float]]] = {v: [] for v in variants}
        for p, m in variants:
            _stages(adapters[p], images[0], m)  # warm-up
        for _ in range(args.rounds):
            for p, m in variants:
                times[(p, m)] += [_stages(adapters[p], img, m) for img in images]
        print(
            f"\n{'per image, ms (median)':32s} {'preprocess':>10s} {'forward':>9s} {'postprocess':>11s} {'total':>8s}"
        )
        for (p, m), rows in times.items():
            med = [statistics.median(r[k] for r in rows) * 1000 for k in range(3)]
            label = f"{p} ({adapters[p].precision}), {'masks' if m else 'no masks'}"
            print(f"{label:32s} {med[0]:10.1f} {med[1]:9.1f} {med[2]:11.1f} {sum(med):8.1f}")
        if args.ops:
            _print_ops(adapters, images, args.ops)
        print(f"load average at the end: {_common.machine().rsplit('load average ', 1)[1]}")


if __name__ == "__main__":
    main()
