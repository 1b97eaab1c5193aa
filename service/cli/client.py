"""``cvserve client``: call a running server; print JSON, optionally draw the result on the image."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cvserve.cli.connection import add_connection_arguments, connection_from_args

HELP = "call a cvserve server: detect, segment or list models (prints JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("detect", "detect instances in an image"), ("segment", "segment an image")):
        p = sub.add_parser(action, help=text, description=text)
        p.add_argument("image", help="image file (JPEG, PNG, WebP, BMP, TIFF)")
        _common(p)
        p.add_argument("--model", help="model name (default: the first ready model of the right task)")
        p.add_argument("--overlay", metavar="OUT.png", help="write the image with the result drawn on it")
        if action == "detect":
            p.add_argument("--score-threshold", type=float, help="drop detections scoring below this")
            p.add_argument("--max-detections", type=int, help="keep the N best detections")
            p.add_argument("--classes", help="comma-separated class names to keep")
            p.add_argument("--mask-format", default="rle", choices=("none", "rle", "polygon", "png"))
        else:
            p.add_argument(
                "--label-map", metavar="OUT.png", help="write the raw label map PNG (pixel = class id)"
            )
    _common(sub.add_parser("models", help="list the server's models", description="list the server's models"))


def _common(p: argparse.ArgumentParser) -> None:
    add_connection_arguments(p)


def _pick_model(client: Any, task: str) -> str:
    from cvserve.cli.common import CLIError

    for info in client.list_models():
        if info["task"] == task and info["ready"]:
            return str(info["name"])
    raise CLIError(f"the server has no ready {task} model; pass --model")


def _detect_json(response: Any) -> dict[str, Any]:
    detections = []
    for d in response.detections:
        item: dict[str, Any] = {
            "box": [round(v, 2) for v in (d.box.x0, d.box.y0, d.box.x1, d.box.y1)],
            "class_id": d.class_id,
            "class_name": d.class_name,
            "score": round(d.score, 4),
        }
        kind = d.WhichOneof("mask")
        if kind == "rle":
            item["mask"] = {"size": [d.rle.height, d.rle.width], "counts": d.rle.counts.decode("ascii")}
        elif kind == "polygons":
            item["polygons"] = [[round(v, 1) for v in p.points] for p in d.polygons.polygons]
        elif kind == "png":
            item["mask_png_bytes"] = len(d.png)
        detections.append(item)
    return {"detections": detections}


def _segment_json(response: Any) -> dict[str, Any]:
    return {
        "class_names": list(response.class_names),
        "areas": [
            {"class_id": a.class_id, "class_name": a.class_name, "pixels": a.pixels} for a in response.areas
        ],
        "label_map_png_bytes": len(response.label_map_png),
    }


def _summary(response: Any) -> dict[str, Any]:
    t = response.timing
    return {
        "model": response.model,
        "model_version": response.model_version,
        "image": {"height": response.image_height, "width": response.image_width},
        "timing_ms": {
            "queue": round(t.queue_ms, 3),
            "inference": round(t.inference_ms, 3),
            "total": round(t.total_ms, 3),
            "batch_size": t.batch_size,
        },
    }


def _predict(client: Any, args: argparse.Namespace, data: bytes) -> tuple[dict[str, Any], Any, Any]:
    """The printed JSON, the prediction and its per-detection class names (None when segmenting)."""
    from cvserve.client import codec as client_codec

    task = "instance" if args.action == "detect" else "semantic"
    model = args.model or _pick_model(client, task)
    if args.action == "detect":
        classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
        response = client.detect_response(
            data,
            model=model,
            score_threshold=args.score_threshold,
            max_detections=args.max_detections,
            classes=classes,
            mask_format=args.mask_format,
        )
        names = [d.class_name for d in response.detections]
        return (
            _summary(response) | _detect_json(response),
            client_codec.prediction_from_detect(response),
            names,
        )
    response = client.segment_response(data, model=model)
    if args.label_map:
        Path(args.label_map).write_bytes(response.label_map_png)
    return _summary(response) | _segment_json(response), client_codec.prediction_from_segment(response), None


def run(args: argparse.Namespace) -> int:
    from cvserve.cli.common import CLIError
    from cvserve.client.client import Client, ClientError

    with Client.connect(connection_from_args(args)) as client:
        try:
            if args.action == "models":
                print(json.dumps(client.list_models(), indent=2))
                return 0
            try:
                data = Path(args.image).read_bytes()
            except OSError as e:
                raise CLIError(f"{args.image}: cannot read image: {e.strerror}") from None
            out, prediction, names = _predict(client, args, data)
        except ClientError as e:
            print(f"cvserve client: {e.code.name}: {e.message}", file=sys.stderr)
            return 1
    print(json.dumps(out, indent=2))
    if args.overlay:
        from cvserve.imaging import decode_image, draw_overlay, encode_png

        image = decode_image(data, max_pixels=1 << 40)
        Path(args.overlay).write_bytes(encode_png(draw_overlay(image, prediction, names)))
        print(f"overlay written to {args.overlay}", file=sys.stderr)
    return 0
