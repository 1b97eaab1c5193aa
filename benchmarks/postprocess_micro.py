"""Vectorised against naive per-instance postprocessing: mask pasting, RLE, polygons, PNG masks.

For N detections on an HxW image (28x28 mask logits, boxes of realistic sizes), times:

* pasting: one full-image ``grid_sample`` per instance (naive), detectron2's CPU path
  (``paste_masks_in_image``: each mask sampled inside its box only, what ``DetectronModel``
  and ``DefaultPredictor`` run) and all instances in one full-image call (the GPU path);
* RLE encoding: ``mask.encode`` per instance against one call on the ``(H, W, N)`` stack;
* paste + RLE as served: N full-image masks then one RLE call, against each mask pasted
  and encoded inside its box (``cvserve.models.instance.outputs``, what ``DetectronModel`` runs);
* polygons and PNG masks as ``service/codec.py`` builds them: per instance (decode the
  RLE, trace / encode the full image) against the codec's batched decode with contours
  traced inside each mask's box and bit-packed PNGs.

    .venv/bin/python benchmarks/postprocess_micro.py --instances 20 --size 480x640
"""

# ruff: noqa: E402  (detectron2 is imported after the compatibility layer is applied)
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cvserve.models import compat

compat.apply()  # detectron2 v0.6 needs it before its first import

# isort: split

import cv2
import numpy as np
import torch
from detectron2.layers.mask_ops import _do_paste_mask, paste_masks_in_image
from pycocotools import mask as mask_util

from cvserve.imaging import encode_png
from cvserve.models.instance.outputs import box_rle, paste_rles
from cvserve.models.types import Instance, Mask, Prediction
from cvserve.vision import codec


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inputs(n: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask probabilities (blobs) and boxes 5-40 % of the image side."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
    masks = torch.sigmoid(6 * (0.6 - (xx**2 + yy**2)) + torch.randn(n, 28, 28, generator=gen))
    side = torch.rand(n, 2, generator=gen) * 0.35 + 0.05
    corner = torch.rand(n, 2, generator=gen) * (1 - side)
    scale = torch.tensor([width, height], dtype=torch.float32)
    boxes = torch.cat([corner * scale, (corner + side) * scale], dim=1)
    return masks, boxes


def naive_paste(masks: torch.Tensor, boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    out = [
        _do_paste_mask(masks[i : i + 1, None], boxes[i : i + 1], h, w, skip_empty=False)[0]
        for i in range(len(masks))
    ]
    return torch.cat(out) >= 0.5


def full_paste_and_encode(masks: torch.Tensor, boxes: torch.Tensor, h: int, w: int) -> list[bytes]:
    """detectron2's paste into N full-image masks, then one RLE call on the stack."""
    binary = paste_masks_in_image(masks, boxes, (h, w)).numpy().view(np.uint8)
    return [r["counts"] for r in mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))]


def per_box_paste_and_encode(masks: torch.Tensor, boxes: torch.Tensor, h: int, w: int) -> list[bytes]:
    """The served path before chunking: one ``_do_paste_mask`` and one RLE per box."""
    rles = []
    for i in range(len(masks)):
        chunk, (rows, cols) = _do_paste_mask(masks[i : i + 1, None], boxes[i : i + 1], h, w)
        rles.append(box_rle((chunk[0] >= 0.5).numpy(), int(rows.start), int(cols.start), h, w))
    return rles


def naive_polygons(pred: Prediction) -> list[list[np.ndarray]]:
    out = []
    for inst in pred.instances:
        binary = mask_util.decode({"size": list(inst.mask.size), "counts": inst.mask.counts})
        contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        out.append([c for c in contours if len(c) >= 3])
    return out


def naive_png(pred: Prediction) -> list[bytes]:
    out = []
    for inst in pred.instances:
        binary = mask_util.decode({"size": list(inst.mask.size), "counts": inst.mask.counts})
        out.append(encode_png(binary.astype(bool)))
    return out


def respond(pred: Prediction, fmt: str) -> object:
    options = codec.DetectOptions(mask_format=fmt)
    return codec.detect_response(pred, model="m", version="1", class_names=["a"], options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--size", default="480x640", help="image HxW (default: 480x640)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split("x"))
    masks, boxes = inputs(args.instances, h, w)
    binary = paste_masks_in_image(masks, boxes, (h, w)).numpy()
    assert np.array_equal(binary, naive_paste(masks, boxes, h, w).numpy()), "paste paths disagree"
    assert full_paste_and_encode(masks, boxes, h, w) == paste_rles(masks, boxes, h, w), "RLE paths disagree"
    assert per_box_paste_and_encode(masks, boxes, h, w) == paste_rles(masks, boxes, h, w), (
        "RLE paths disagree"
    )
    stack = np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8))
    rles = mask_util.encode(stack)
    pred = Prediction(
        image_size=(h, w),
        instances=tuple(Instance((0.0, 0.0, 1.0, 1.0), 0, 1.0, Mask((h, w), r["counts"])) for r in rles),
    )
    rows = [
        (
            "paste masks",
            lambda: naive_paste(masks, boxes, h, w),
            lambda: paste_masks_in_image(masks, boxes, (h, w)),
        ),
        (
            "  all at once, full image",
            lambda: naive_paste(masks, boxes, h, w),
            lambda: _do_paste_mask(masks[:, None], boxes, h, w, skip_empty=False),
        ),
        (
            "RLE encode",
            lambda: [mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in binary],
            lambda: mask_util.encode(stack),
        ),
        (
            "paste + RLE (served path)",
            lambda: full_paste_and_encode(masks, boxes, h, w),
            lambda: paste_rles(masks, boxes, h, w),
        ),
        (
            "  box by box, then chunked",
            lambda: per_box_paste_and_encode(masks, boxes, h, w),
            lambda: paste_rles(masks, boxes, h, w),
        ),
        ("polygon response", lambda: naive_polygons(pred), lambda: respond(pred, "polygon")),
        ("PNG mask response", lambda: naive_png(pred), lambda: respond(pred, "png")),
    ]
    print(
        f"{args.instances} instances on a {h}x{w} image, torch threads {args.threads}, median of {args.repeats}"
    )
    print(f"{'step':28s} {'naive ms':>10s} {'vectorised ms':>14s} {'speed-up':>9s}")
    for name, naive, fast in rows:
        a, b = timed(naive, args.repeats), timed(fast, args.repeats)
        print(f"{name:28s} {a * 1000:10.2f} {b * 1000:14.2f} {a / b:8.1f}x", flush=True)
    png = sum(len(d.png) for d in respond(pred, "png").detections)  # type: ignore[attr-defined]
    print(f"PNG bytes per response: naive {sum(len(p) for p in naive_png(pred))}, codec {png}")


if __name__ == "__main__":
    main()
