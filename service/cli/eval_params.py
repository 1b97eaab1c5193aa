"""``cvserve eval``'s COCO parameter flags and the :class:`EvalSettings` they ask for.

Each flag maps to one pycocotools ``Params`` field (or to the engine / area rule); the
settings are recorded in report.json (see docs/evaluation.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from cvserve.cli.common import CLIError
from cvserve.models.evaluation.params import ENGINES, SEGM_AREA_RULES

__all__ = ["add_coco_parameters", "eval_settings"]


def add_coco_parameters(parser: argparse.ArgumentParser) -> None:
    """Add the COCO parameter group (pycocotools' defaults when absent)."""
    params = parser.add_argument_group("COCO parameters (default: pycocotools')")
    params.add_argument(
        "--engine",
        choices=ENGINES,
        default="numpy",
        help="numpy (default), or run faster-coco-eval / pycocotools itself on the same inputs",
    )
    params.add_argument(
        "--renumber-ids",
        action="store_true",
        help="renumber ground-truth annotation ids from 1 (pycocotools counts a match to id 0 as a false positive)",
    )
    params.add_argument(
        "--max-dets", metavar="A,B,C", help="three ascending detections-per-image limits (1,10,100)"
    )
    params.add_argument("--iou-thrs", metavar="T,...", help="IoU thresholds (0.50:0.05:0.95)")
    params.add_argument(
        "--area-range",
        action="append",
        metavar="NAME=LO:HI",
        help="repeatable, replaces all ranges; the summary reads all, small, medium, large",
    )
    params.add_argument("--img-ids", metavar="ID,...", help="evaluate only these image ids")
    params.add_argument("--cat-ids", metavar="ID,...", help="evaluate only these category ids")
    params.add_argument(
        "--errors",
        action="store_true",
        help="add TIDE's error breakdown (dAP per error type, bbox and segm) to the report",
    )
    params.add_argument(
        "--lvis",
        action="store_true",
        help="LVIS v1 ground truth: federated AP (APr/APc/APf, AR@300) by the official lvis package",
    )
    params.add_argument(
        "--class-agnostic", action="store_true", help="ignore categories (pycocotools' useCats=0)"
    )
    params.add_argument(
        "--segm-area",
        choices=SEGM_AREA_RULES,
        default="mask",
        help="a segm result's area: its mask's (detectron2, default) or its box's (plain loadRes)",
    )


def _numbers(args: argparse.Namespace, name: str, kind: type) -> tuple[Any, ...] | None:
    text = getattr(args, name)
    if text is None:
        return None
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise CLIError(
            f"--{name.replace('_', '-')}: expected comma-separated {kind.__name__}s, got {text!r}"
        ) from None


def _area_ranges(args: argparse.Namespace) -> tuple[tuple[str, float, float], ...] | None:
    if not args.area_range:
        return None
    out = []
    for text in args.area_range:
        try:
            name, rng = text.split("=")
            lo, hi = (float(v) for v in rng.split(":"))
        except ValueError:
            raise CLIError(f"--area-range: expected NAME=LO:HI (areas in pixels), got {text!r}") from None
        out.append((name, lo, hi))
    return tuple(out)


def eval_settings(args: argparse.Namespace) -> Any:
    """The :class:`EvalSettings` the flags ask for."""
    from cvserve.models.evaluation.params import EvalSettings

    try:
        return EvalSettings(
            max_dets=_numbers(args, "max_dets", int),  # type: ignore[arg-type]
            iou_thrs=_numbers(args, "iou_thrs", float),
            area_ranges=_area_ranges(args),
            img_ids=_numbers(args, "img_ids", int),
            cat_ids=_numbers(args, "cat_ids", int),
            use_cats=not args.class_agnostic,
            segm_area=args.segm_area,
            engine=args.engine,
            renumber_ids=args.renumber_ids,
        )
    except ValueError as e:
        raise CLIError(str(e)) from None
