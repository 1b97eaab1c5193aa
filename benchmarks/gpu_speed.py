"""On a CUDA GPU: the server against ``DefaultPredictor`` on the same GPU and precision, and fp16 vs fp32.

Speed: the model (``--model``: R50-FPN Mask R-CNN at random weights by default, or
``--config`` / ``--weights`` of your own) runs as ``DefaultPredictor`` looped in this process
(batch 1) and through the real server (``max_batch_size`` = ``--batch``, ``--concurrency``
requests in flight), both on ``--device``, first in fp32, then both in ``--precision``
(``torch.autocast`` around ``DefaultPredictor``; the server's ``precision:`` setting). Rounds
alternate between the two sides so drifts in machine speed hit both alike.

Accuracy: fp16 (or bf16) detections against fp32 on *trained* weights (``--weights`` and
``--config``, default the demo repository's detector on the demo's kind of images), image by
image through the serving adapter: the share of fp32 detections found again with the same
class at IoU >= ``--iou``, and the largest score difference. Random weights would make this
check meaningless, so without trained weights it is skipped with a message.

Target: server >= 2.5x ``DefaultPredictor`` at concurrency 16 in the same precision; fp16
detections match fp32 at IoU >= 0.9 for >= 95 % of detections, scores within 0.02.

    .venv/bin/python benchmarks/gpu_speed.py                  # needs CUDA
    .venv/bin/python benchmarks/gpu_speed.py --config my.yaml --weights model_final.pth
    .venv/bin/python benchmarks/gpu_speed.py --device cpu --model tiny --images 4 --requests 8 --concurrency 2
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
from serve_vs_predictor import PredictorLoop, load, row


def fail_without_cuda(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        from cvserve.models.device import cuda_status

        why = cuda_status().problem
        sys.exit(
            "gpu_speed.py: CUDA is not available"
            + (f" (CUDA present but unusable: {why})" if why else " (torch.cuda.is_available() is False)")
            + "; run on a machine with an NVIDIA GPU, or pass --device cpu to exercise the code path"
        )


def user_model(config: str, weights: str, workdir: Path) -> _common.BenchModel:
    """A model from the user's config and trained weights, at its own score threshold."""
    from cvserve.models.instance.config import load_config

    cfg = load_config(config)
    path = workdir / "user.yaml"
    path.write_text(cfg.dump())
    options = {"score_threshold": float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST), "max_detections": 100}
    return _common.BenchModel("user", path, Path(weights), f"trained ({weights})", options)


def predictions(model: _common.BenchModel, device: str, precision: str, images: list[Any]) -> list[Any]:
    """In-process ``DetectronModel`` predictions (the server's adapter) at ``precision``."""
    from cvserve.models.instance.adapter import DetectronModel
    from cvserve.models.repository import parse_spec

    entry = {**model.spec(device=device), "precision": precision}
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


def compare_speed(
    args: argparse.Namespace, model: _common.BenchModel, images: list[Any], work: Path, precision: str
) -> None:
    """DefaultPredictor and the server at one precision on one device, rounds alternating."""
    payloads = [_common.encode_jpeg(img) for img in images]
    loop = PredictorLoop(model, images, args.device, precision)
    entry = {**model.spec(args.batch, 5.0, device=args.device), "precision": precision}
    base_wall, base_lat, wall, lat = 0.0, [], 0.0, []
    with _common.serve([entry], work) as server:
        load(server.address, model.name, payloads, 2, 4)  # warm the server's pools
        per_round = max(args.requests // args.rounds, args.concurrency)
        for _ in range(args.rounds):
            w, latencies = loop.run(per_round)
            base_wall, base_lat = base_wall + w, base_lat + latencies
            w, latencies = load(server.address, model.name, payloads, args.concurrency, per_round)
            wall, lat = wall + w, lat + latencies
    reference = len(base_lat) / base_wall
    print(row(f"DefaultPredictor {precision}", base_wall, base_lat, None))
    print(row(f"server {precision} c={args.concurrency} b={args.batch}", wall, lat, reference), flush=True)


def compare_precision(args: argparse.Namespace, precision: str, work: Path) -> None:
    """fp32 against ``precision`` detections on trained weights."""
    if args.weights:
        model = user_model(args.config, args.weights, work)
        images = _common.make_images(args.images, *args.hw)
    else:
        try:
            model = _common.prepare_model("demo", work)
        except FileNotFoundError as e:
            print(f"\n{precision} vs fp32: skipped, no trained weights ({e}; or pass --config and --weights)")
            return
        images = _common.make_images(args.images, *args.hw, shapes=True)
    fp32 = predictions(model, args.device, "fp32", images)
    low = predictions(model, args.device, precision, images)
    share, gap, total = agreement(fp32, low, args.iou)
    print(
        f"\n{precision} vs fp32, weights {model.weights_note}: {share:.1%} of {total} fp32 detections "
        f"matched (same class, IoU >= {args.iou}), largest score difference {gap:.4f}"
    )
    if precision == "fp32":
        print("(on the CPU both runs are fp32: this checks the code path, not fp16 accuracy)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument(
        "--model", choices=["r50", "tiny", "demo"], default="r50", help="speed model (default: r50)"
    )
    parser.add_argument("--config", help="detectron2 config of trained weights (with --weights)")
    parser.add_argument("--weights", help="trained weights: used for speed and for the fp16 check")
    parser.add_argument("--precision", choices=["fp16", "bf16"], default="fp16", help="besides fp32 (CUDA)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", default="480x640", help="image HxW (default: 480x640)")
    parser.add_argument("--min-size", type=int, default=None, help="MIN_SIZE_TEST (default: as configured)")
    parser.add_argument("--batch", type=int, default=8, help="server max_batch_size (default: 8)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96, help="per side and precision")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    parser.add_argument("--iou", type=float, default=0.9)
    args = parser.parse_args()
    if bool(args.config) != bool(args.weights):
        parser.error("--config and --weights go together")
    args.hw = tuple(int(v) for v in args.size.split("x"))
    return args


def main() -> None:
    args = parse_args()
    from cvserve.models import compat

    compat.apply()  # before the first detectron2 import
    fail_without_cuda(args.device)
    on_gpu = args.device.startswith("cuda")
    precisions = ["fp32", args.precision] if on_gpu else ["fp32"]  # autocast runs on CUDA only
    with tempfile.TemporaryDirectory(prefix="cvserve-gpu-") as tmp:
        work = Path(tmp)
        if args.weights:
            model = user_model(args.config, args.weights, work)
        else:
            model = _common.prepare_model(args.model, work)
        model = _common.with_min_size(model, args.min_size)
        images = _common.make_images(args.images, *args.hw, shapes=args.model == "demo")
        print(f"machine: {_common.machine()}")
        if on_gpu:
            import torch

            print(f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}")
        print(f"{model.name}, weights {model.weights_note}, {args.device}, images {args.size}")
        print(f"\n{'':28s} {'images/s':>8s} {'p50 ms':>9s} {'p95 ms':>9s} {'p99 ms':>9s}  ratio")
        for precision in precisions:
            compare_speed(args, model, images, work, precision)
        compare_precision(args, precisions[-1], work)


if __name__ == "__main__":
    main()
