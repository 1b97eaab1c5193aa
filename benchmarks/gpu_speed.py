"""On a CUDA GPU: the server's batched fp16 path against ``DefaultPredictor``, and fp16 vs fp32 detections.

Runs the R50-FPN Mask R-CNN (random weights unless ``--weights``) three ways over the
same images: ``DefaultPredictor`` looped (fp32, batch 1), the serving adapter
``DetectronModel`` at ``--batch`` images per forward in fp32, and the same in fp16
(autocast), with ``--concurrency`` requests kept in flight through the real server
(``max_batch_size`` = ``--batch``, ``precision: fp16``). Then it compares fp16 with
fp32 detections image by image: boxes matched by IoU, the share of fp32 detections found
again at IoU >= ``--iou`` with the same class, and the largest score difference.

Target: server >= 2.5x ``DefaultPredictor`` at concurrency 16; fp16 detections match
fp32 at IoU >= 0.9 for >= 95 % of detections, scores within 0.02.

    .venv/bin/python benchmarks/gpu_speed.py                  # needs CUDA
    .venv/bin/python benchmarks/gpu_speed.py --device cpu --images 4 --concurrency 2
                                                              # the code path on a CPU (fp32 only)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
from serve_vs_predictor import load, row, time_predictor


def fail_without_cuda(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "gpu_speed.py: CUDA is not available (torch.cuda.is_available() is False); "
            "run on a machine with an NVIDIA GPU, or pass --device cpu to exercise the code path"
        )


def with_device(model: _common.BenchModel, device: str, min_size: int) -> _common.BenchModel:
    """The same model with its config moved to ``device`` at short side ``min_size``."""
    from cvserve.models.instance.adapter import load_config

    cfg = load_config(str(model.config_path))
    cfg.MODEL.DEVICE = device
    cfg.INPUT.MIN_SIZE_TEST = min_size
    model.config_path.write_text(cfg.dump())
    return model


def predictions(model: _common.BenchModel, device: str, precision: str, images: list[Any]) -> list[Any]:
    """In-process ``DetectronModel`` predictions (the server's adapter) at ``precision``."""
    from cvserve.models.instance.adapter import DetectronModel
    from cvserve.models.repository import parse_spec

    entry = {**model.spec(), "device": device, "precision": precision}
    adapter = DetectronModel(parse_spec(entry, "gpu_speed", model.config_path.parent))
    adapter.load()
    return [adapter.predict_batch([img])[0] for img in images]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def agreement(reference: list[Any], other: list[Any], threshold: float) -> tuple[float, float, int]:
    """Share of reference detections matched (same class, IoU >= threshold), max score gap, count."""
    matched, total, gap = 0, 0, 0.0
    for ref, oth in zip(reference, other, strict=True):
        for r in ref.instances:
            total += 1
            same = [o for o in oth.instances if o.category_id == r.category_id]
            best = max(same, key=lambda o: iou(r.box, o.box), default=None)
            if best is not None and iou(r.box, best.box) >= threshold:
                matched += 1
                gap = max(gap, abs(best.score - r.score))
    return (matched / total if total else 1.0), gap, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", default="480x640", help="image HxW (default: 480x640)")
    parser.add_argument("--min-size", type=int, default=None, help="MIN_SIZE_TEST (default: 800, 480 on cpu)")
    parser.add_argument("--batch", type=int, default=8, help="server max_batch_size (default: 8)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--iou", type=float, default=0.9)
    args = parser.parse_args()
    fail_without_cuda(args.device)
    cpu = args.device == "cpu"
    precision = "fp32" if cpu else "fp16"  # autocast fp16 runs on CUDA only
    height, width = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory(prefix="cvserve-gpu-") as tmp:
        work = Path(tmp)
        model = with_device(
            _common.prepare_model("r50", work), args.device, args.min_size or (480 if cpu else 800)
        )
        images = _common.make_images(args.images, height, width)
        payloads = [_common.encode_jpeg(img) for img in images]
        print(f"machine: {_common.machine()}")
        print(f"R50-FPN Mask R-CNN, weights {model.weights_note}, {args.device}, images {height}x{width}")
        base = time_predictor(model, images, args.requests)
        reference = len(base) / sum(base)
        entry = {**model.spec(args.batch, 5.0), "device": args.device, "precision": precision}
        with _common.serve([entry], work) as server:
            load(server.address, model.name, payloads, 2, 4)
            wall, latencies = load(server.address, model.name, payloads, args.concurrency, args.requests)
        print(f"\n{'':28s} {'images/s':>8s} {'p50 ms':>9s} {'p95 ms':>9s} {'p99 ms':>9s}  ratio")
        print(row("DefaultPredictor fp32", sum(base), base, None))
        label = f"server {precision} c={args.concurrency} b={args.batch}"
        print(row(label, wall, latencies, reference))
        fp32 = predictions(model, args.device, "fp32", images)
        low = predictions(model, args.device, precision, images)
        share, gap, total = agreement(fp32, low, args.iou)
        print(
            f"\n{precision} vs fp32: {share:.1%} of {total} fp32 detections matched "
            f"(same class, IoU >= {args.iou}), largest score difference {gap:.4f}"
        )
        if cpu:
            print("(on the CPU both runs are fp32: this checks the code path, not fp16 accuracy)")


if __name__ == "__main__":
    main()
