"""LVIS evaluation equals the official ``lvis`` package's LVISEval run from files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cvserve.models.evaluation.coco_io import parse_ground_truth, parse_results
from cvserve.models.evaluation.errors import EvaluationInputError
from cvserve.models.evaluation.lvis import LVIS_STATS, evaluate_lvis, numpy_aliases
from tests.fixtures.coco.lvis_synth import make_lvis_dataset
from tests.fixtures.coco.reference import polygons_to_rle
from tests.fixtures.coco.synth import SynthConfig, make_dataset


def _official(gt_path: Path, results: list[dict[str, Any]], iou_type: str) -> dict[str, float]:
    from lvis import LVIS, LVISEval

    res = polygons_to_rle(json.loads(gt_path.read_text()), results)
    if iou_type == "segm":
        res = [{k: v for k, v in r.items() if k != "bbox"} for r in res]
    else:
        res = [{k: v for k, v in r.items() if k != "segmentation"} for r in res]
    with numpy_aliases():
        e = LVISEval(LVIS(str(gt_path)), res, iou_type)
        e.run()
    return e.get_results()


@pytest.mark.parametrize("seed", [0, 1])
def test_lvis_equals_the_official_package(tmp_path: Path, seed: int) -> None:
    logging.getLogger("lvis").setLevel(logging.ERROR)
    gt, results = make_lvis_dataset(seed)
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(gt))
    assert max(np.unique([r["image_id"] for r in results], return_counts=True)[1]) > 300
    truth = parse_ground_truth(path)
    ours = evaluate_lvis(truth, parse_results(results, truth, ("bbox", "segm")), ("bbox", "segm"))
    for t in ("bbox", "segm"):
        ref = _official(path, results, t)
        assert list(ours[t]["stats"]) == list(LVIS_STATS)
        assert ours[t]["stats"]["AP"] > 0
        np.testing.assert_allclose([ours[t]["stats"][k] for k in LVIS_STATS], [ref[k] for k in LVIS_STATS],
                                   rtol=0, atol=1e-9)  # fmt: skip


def test_numpy_aliases_leave_numpy_as_they_found_it() -> None:
    before = {n: np.__dict__.get(n) for n in ("float", "int", "bool")}
    with numpy_aliases():
        assert np.float is not None and np.int is not None  # type: ignore[attr-defined]
    assert {n: np.__dict__.get(n) for n in ("float", "int", "bool")} == before


def test_coco_ground_truth_is_refused_with_the_field_named() -> None:
    gt, results = make_dataset(SynthConfig(seed=3))
    truth = parse_ground_truth(gt)
    with pytest.raises(EvaluationInputError, match=r"images\[0\]: field 'neg_category_ids'"):
        evaluate_lvis(truth, parse_results(results, truth, ("bbox",)), ("bbox",))
