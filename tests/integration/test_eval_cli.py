"""``cvserve eval --gt --results``: the report folder, its files and their figures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from cvserve.models.evaluation import evaluate_coco
from tests.fixtures.coco.synth import SynthConfig, make_dataset

ROOT = Path(__file__).resolve().parents[2]
CVSERVE = [sys.executable, "-m", "cvserve"]


def test_report_in_default_folder(tmp_path: Path) -> None:
    gt, results = make_dataset(SynthConfig(seed=40, num_categories=18, num_images=30))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*CVSERVE, "eval", "--gt", "gt.json", "--results", "results.json"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=True,
    )  # fmt: skip
    match = re.search(r"report written to (\S+)", proc.stdout)
    assert match, proc.stdout
    out = Path(match.group(1))
    assert out.parent == tmp_path and re.fullmatch(r"eval-\d{8}-\d{6}", out.name)

    report = json.loads((out / "report.json").read_text())
    expected = evaluate_coco(gt, results)
    assert list(expected) == ["bbox", "segm"]  # default: every type the results carry
    assert report["metrics"] == expected  # every figure exactly, no rounding
    assert report["num_detections"] == len(results)

    summary = (out / "summary.md").read_text()
    for cat in gt["categories"]:
        assert f"| {cat['id']} | {cat['name']} |" in summary
    # 18 categories: the mean curve plus two pages of per-category grids, per IoU type.
    for iou_type in ("bbox", "segm"):
        for name in (
            f"pr_{iou_type}.png",
            f"pr_{iou_type}_categories_1.png",
            f"pr_{iou_type}_categories_2.png",
        ):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_iou_type_selects(tmp_path: Path) -> None:
    gt, results = make_dataset(SynthConfig(seed=41))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [*CVSERVE, "eval", "--gt", "gt.json", "--results", "results.json", "--iou-type", "segm", "--out", "r", "--no-plots"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=True,
    )  # fmt: skip
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert list(report["metrics"]) == ["segm"]
    assert not list((tmp_path / "r").glob("*.png"))
