"""TIDE error analysis: equal to tidecv run from the files, and each error type attributed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cvserve.models.evaluation.coco_io import parse_ground_truth, parse_results
from cvserve.models.evaluation.tide import TIDE_NAMES, tide_errors
from tests.fixtures.coco.reference import polygons_to_rle
from tests.fixtures.coco.synth import SynthConfig, make_dataset


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_tidecv_from_files(tmp_path: Path, seed: int) -> None:
    from tidecv import TIDE, datasets

    gt, results = make_dataset(SynthConfig(seed=seed, crowd_fraction=0.15, num_images=30))
    results = polygons_to_rle(gt, results)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps(results))
    truth = parse_ground_truth(gt)
    ours = tide_errors(truth, parse_results(results, truth, ("bbox", "segm")), ("bbox", "segm"))
    for t, mode in (("bbox", TIDE.BOX), ("segm", TIDE.MASK)):
        tide = TIDE()
        run = tide.evaluate(
            datasets.COCO(str(tmp_path / "gt.json")),
            datasets.COCOResult(str(tmp_path / "res.json")),
            mode=mode,
        )
        ref = {**tide.get_main_errors()[run.preds.name], **tide.get_special_errors()[run.preds.name]}
        assert ours[t]["AP50"] == pytest.approx(run.ap, abs=1e-9)
        np.testing.assert_allclose(
            [ours[t]["dAP"][TIDE_NAMES[k]] for k in ref], list(ref.values()), atol=1e-9
        )
        assert sum(ours[t]["dAP"].values()) > 0


def _case(error: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Two objects found correctly plus one planted error of the given type."""
    gt = {"images": [{"id": 1, "width": 200, "height": 200, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
                          {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 40], "area": 1600, "iscrowd": 0},
                          {"id": 3, "image_id": 1, "category_id": 2, "bbox": [10, 120, 40, 40], "area": 1600, "iscrowd": 0}]}  # fmt: skip
    ok = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.5},
          {"image_id": 1, "category_id": 1, "bbox": [100, 100, 40, 40], "score": 0.4}]  # fmt: skip
    planted = {
        "classification": {"category_id": 1, "bbox": [10, 120, 40, 40]},  # object 3 called "a"
        "localisation": {"category_id": 2, "bbox": [30, 140, 40, 40]},  # object 3, IoU 0.14
        "both": {"category_id": 1, "bbox": [30, 140, 40, 40]},  # wrong class and badly placed
        "duplicate": {"category_id": 1, "bbox": [11, 11, 40, 40]},  # object 1 found twice
        "background": {"category_id": 1, "bbox": [150, 10, 30, 30]},  # nothing there
    }
    if error == "missed":
        return gt, ok  # object 3 never detected
    dets = [*ok, {"image_id": 1, "score": 0.9 if error != "duplicate" else 0.45, **planted[error]}]
    if error not in ("classification", "localisation"):  # object 3 found, late
        dets.append({"image_id": 1, "category_id": 2, "bbox": [10, 120, 40, 40], "score": 0.3})
    return gt, dets


@pytest.mark.parametrize(
    "error", ["classification", "localisation", "both", "duplicate", "background", "missed"]
)
def test_each_planted_error_is_attributed_to_its_type(error: str) -> None:
    gt, results = _case(error)
    truth = parse_ground_truth(gt)
    dap = tide_errors(truth, parse_results(results, truth, ("bbox",)), ("bbox",))["bbox"]["dAP"]
    main = {
        k: dap[k] for k in ("classification", "localisation", "both", "duplicate", "background", "missed")
    }
    assert main[error] > 0, main
    assert all(v == 0 for k, v in main.items() if k != error), main
    if error in ("missed", "background", "duplicate"):
        assert dap["false_negative" if error == "missed" else "false_positive"] > 0, dap
