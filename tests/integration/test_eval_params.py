"""``cvserve eval`` parameters: engines, annotation id 0, and settings recorded in report.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.coco.reference import pycocotools_eval
from tests.fixtures.coco.synth import SynthConfig, make_dataset

ROOT = Path(__file__).resolve().parents[2]
CVSERVE = [sys.executable, "-m", "cvserve"]


def _run(
    tmp_path: Path, *flags: str, check: bool = True, plots: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*CVSERVE, "eval", "--gt", "gt.json", "--results", "results.json", *([] if plots else ["--no-plots"]), *flags],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=check,
    )  # fmt: skip


@pytest.fixture
def zero_based(tmp_path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A dataset whose annotation ids start at 0, as some converters write them."""
    gt, results = make_dataset(SynthConfig(seed=42, crowd_fraction=0.0))
    for a in gt["annotations"]:
        a["id"] -= 1
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    return gt, results


def test_annotation_id_0_as_pycocotools_with_a_warning_then_renumbered(
    tmp_path: Path, zero_based: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    gt, results = zero_based
    proc = _run(tmp_path, "--iou-type", "bbox", "--out", "as-is")
    assert "1 ground-truth annotation(s) have id 0" in proc.stderr and "--renumber-ids" in proc.stderr
    report = json.loads((tmp_path / "as-is" / "report.json").read_text())
    assert list(report["metrics"]["bbox"]["stats"].values()) == pytest.approx(
        pycocotools_eval(gt, results, "bbox").stats, abs=1e-12
    )
    assert report["annotation_ids"] == {"zero": 1, "renumbered_from_1": False,
                                        "figures": "as pycocotools computes them"}  # fmt: skip

    proc = _run(tmp_path, "--iou-type", "bbox", "--renumber-ids", "--out", "fixed")
    assert "id 0" not in proc.stderr
    report = json.loads((tmp_path / "fixed" / "report.json").read_text())
    for a in gt["annotations"]:
        a["id"] += 1
    assert list(report["metrics"]["bbox"]["stats"].values()) == pytest.approx(
        pycocotools_eval(gt, results, "bbox").stats, abs=1e-12
    )
    assert report["annotation_ids"]["figures"] == "corrected: renumbered from 1"


@pytest.mark.parametrize("engine", ["pycocotools", "faster-coco-eval"])
def test_engines_give_the_same_report(
    tmp_path: Path, engine: str, zero_based: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    flags = ["--max-dets", "1,5,50", "--iou-thrs", "0.5,0.75", "--cat-ids", "1,4", "--segm-area", "box"]
    _run(tmp_path, *flags, "--out", "numpy")
    _run(tmp_path, *flags, "--engine", engine, "--out", "ref")
    ours = json.loads((tmp_path / "numpy" / "report.json").read_text())
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    for t in ("bbox", "segm"):
        assert list(ours["metrics"][t]["stats"]) == ["AP", "AP50", "AP75", "APs", "APm", "APl",
                                                     "AR1", "AR5", "AR50", "ARs", "ARm", "ARl"]  # fmt: skip
        assert list(ours["metrics"][t]["stats"].values()) == pytest.approx(
            list(ref["metrics"][t]["stats"].values()), abs=1e-9
        )
    p = ours["parameters"]
    assert p["engine"] == "numpy" and ref["parameters"]["engine"] == engine
    assert p["bbox"]["max_dets"] == [1, 5, 50] and p["bbox"]["iou_thrs"] == [0.5, 0.75]
    assert p["cat_ids"] == [1, 4] and p["img_ids"] == "all" and p["segm"]["segm_area"] == "box"
    assert [c["id"] for c in ours["metrics"]["bbox"]["per_category"]] == [1, 4]


def test_class_agnostic_and_area_ranges_recorded(
    tmp_path: Path, zero_based: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    _run(
        tmp_path,
        "--class-agnostic",
        "--area-range",
        "all=0:1e10",
        "--area-range",
        "small=0:400",
        "--out",
        "r",
    )
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["parameters"]["bbox"]["use_cats"] is False
    assert report["parameters"]["bbox"]["area_ranges"] == {"all": [0.0, 1e10], "small": [0.0, 400.0]}
    assert report["metrics"]["bbox"]["per_category"] == []
    assert report["metrics"]["bbox"]["stats"]["APm"] == -1.0  # no "medium" range given


def test_an_image_subset_is_recorded_and_evaluated_alone(
    tmp_path: Path, zero_based: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    gt, _ = zero_based
    ids = sorted(im["id"] for im in gt["images"])[:2]
    _run(tmp_path, "--img-ids", ",".join(map(str, ids)), "--out", "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["parameters"]["img_ids"] == ids and report["parameters"]["cat_ids"] == "all"
    _run(tmp_path, "--out", "all")
    everything = json.loads((tmp_path / "all" / "report.json").read_text())
    assert report["metrics"]["bbox"]["stats"] != everything["metrics"]["bbox"]["stats"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-dets", "10,1,100"], "max dets must be 3 ascending integers"),
        (["--iou-thrs", "0.5,x"], "--iou-thrs: expected comma-separated floats"),
        (["--area-range", "small=5"], "--area-range: expected NAME=LO:HI"),
        (["--cat-ids", "999"], "category id 999 is not in the ground truth"),
    ],
)
def test_bad_parameters_name_the_flag(
    tmp_path: Path, zero_based: tuple[dict[str, Any], list[dict[str, Any]]], flags: list[str], message: str
) -> None:
    proc = _run(tmp_path, *flags, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_lvis_report_names(tmp_path: Path) -> None:
    from tests.fixtures.coco.lvis_synth import make_lvis_dataset

    gt, results = make_lvis_dataset(5)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results))
    _run(tmp_path, "--lvis", "--out", "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    for t in ("bbox", "segm"):
        assert list(report["metrics"][t]["stats"]) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc",
                                                       "APf", "AR@300"]  # fmt: skip
    assert "LVISEval" in (tmp_path / "r" / "summary.md").read_text()
    proc = _run(tmp_path, "--lvis", "--max-dets", "1,10,100", check=False)
    assert proc.returncode == 2 and "--lvis evaluates with LVISEval's own parameters" in proc.stderr


def test_errors_in_report_and_summary(
    tmp_path: Path, zero_based: tuple[dict[str, Any], list[dict[str, Any]]]
) -> None:
    _run(tmp_path, "--errors", "--out", "r")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    for t in ("bbox", "segm"):
        assert list(report["errors"][t]["dAP"]) == ["classification", "localisation", "both", "duplicate",
                                                    "background", "missed", "false_positive", "false_negative"]  # fmt: skip
    assert "bbox: TIDE error breakdown" in (tmp_path / "r" / "summary.md").read_text()
    layers = report["errors"]["bbox"]["analyze_AP"]
    assert list(layers) == ["C75", "C50", "Loc", "Sim", "Oth", "BG", "FN"]
    assert list(layers.values()) == sorted(layers.values()) and layers["FN"] == 1.0
    _run(tmp_path, "--errors", "--iou-type", "segm", "--out", "p", plots=True)
    for name in ("analyze_segm.png", "analyze_segm_categories_1.png"):
        assert (tmp_path / "p" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
