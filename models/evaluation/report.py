"""Evaluation reports: ``report.json`` (every figure, full precision), ``summary.md`` and PNG figures."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cvserve.models.evaluation.cocoeval import Accumulated

__all__ = ["default_out_dir", "write_coco_report", "write_semantic_report"]


def default_out_dir(base: Path | None = None) -> Path:
    """A new ``eval-YYYYmmdd-HHMMSS`` folder name under ``base`` (default: the working directory)."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = base or Path.cwd()
    path = root / f"eval-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = root / f"eval-{stamp}-{n}"
    return path


def _jsonable(value: Any) -> Any:
    """Replace NaN by None (JSON has no NaN); floats otherwise keep every digit."""
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def _write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")


def _fmt(v: float | None, scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v == -1:
        return "n/a"
    return f"{v * scale:.4f}" if scale == 1.0 else f"{v:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _coco_markdown(report: dict[str, Any]) -> list[str]:
    lines = []
    for iou_type, res in report["metrics"].items():
        names = list(res["stats"])
        lines += [
            "",
            f"## {iou_type}",
            "",
            "Summary (pycocotools' `COCOeval.stats`; n/a = no ground truth):",
            "",
        ]
        lines += _table(names, [[_fmt(res["stats"][n]) for n in names]])
        lines += ["", f"Per category ({iou_type}):", ""]
        rows = [[str(c["id"]), c["name"], *(_fmt(c[n]) for n in names)] for c in res["per_category"]]
        lines += _table(["id", "category", *names], rows)
        lines += ["", f"Precision-recall curves: `pr_{iou_type}.png`, `pr_{iou_type}_categories_*.png`."]
    return lines


def _header(report: dict[str, Any]) -> list[str]:
    lines = ["# Evaluation report", ""]
    for key in (
        "task",
        "ground_truth",
        "results",
        "labels",
        "images",
        "model",
        "server",
        "num_images",
        "num_detections",
    ):
        if report.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: `{report[key]}`")
    lines.append(f"- created: {report['created']}")
    return lines


def write_coco_report(
    out_dir: Path,
    report: dict[str, Any],
    arrays: dict[str, Accumulated],
    cat_names: Sequence[str],
    plots: bool = True,
) -> list[Path]:
    """Write the report of a COCO evaluation.

    Args:
        out_dir: created if needed.
        report: JSON-able description; must hold ``metrics`` as :func:`evaluate_coco` returns them.
        arrays: accumulated arrays per IoU type, for the curves.
        cat_names: category names in ascending id order.
        plots: also draw the PNG figures.

    Returns:
        The files written.
    """
    from cvserve.models.evaluation.plots import plot_pr_curves

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"created": dt.datetime.now().isoformat(timespec="seconds"), **report}
    written = [out_dir / "report.json", out_dir / "summary.md"]
    _write_json(written[0], report)
    written[1].write_text("\n".join(_header(report) + _coco_markdown(report)) + "\n")
    if plots:
        for iou_type, acc in arrays.items():
            written += plot_pr_curves(acc, cat_names, out_dir, f"pr_{iou_type}")
    return written


def write_semantic_report(
    out_dir: Path, report: dict[str, Any], class_names: Sequence[str], plots: bool = True
) -> list[Path]:
    """Write the report of a semantic evaluation; ``report["metrics"]`` as :func:`evaluate_semantic` returns it."""
    from cvserve.models.evaluation.plots import plot_confusion

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"created": dt.datetime.now().isoformat(timespec="seconds"), **report}
    written = [out_dir / "report.json", out_dir / "summary.md"]
    _write_json(written[0], report)
    m = report["metrics"]
    lines = [
        *_header(report),
        "",
        "## Semantic segmentation (percent, detectron2 SemSegEvaluator conventions)",
        "",
    ]
    lines += _table(
        ["mIoU", "fwIoU", "mACC", "pACC"], [[_fmt(m[k], 100) for k in ("mIoU", "fwIoU", "mACC", "pACC")]]
    )
    lines += ["", "Per class (n/a = class absent from the ground truth):", ""]
    rows = [
        [str(i), n, _fmt(m[f"IoU-{n}"], 100), _fmt(m[f"ACC-{n}"], 100)] for i, n in enumerate(class_names)
    ]
    lines += _table(["label", "class", "IoU", "ACC"], rows)
    lines += ["", "Confusion matrix: `confusion_matrix.png` (rows: ground truth, columns: prediction)."]
    written[1].write_text("\n".join(lines) + "\n")
    if plots:
        written.append(
            plot_confusion(np.asarray(m["confusion_matrix"]), class_names, out_dir / "confusion_matrix.png")
        )
    return written
