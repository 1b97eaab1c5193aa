"""The demo models on a device against the same models on the CPU, and the server on CUDA.

Each comparison runs the CPU reference and the model on ``device``. With ``device=cuda``
(marked ``gpu``: a CUDA host runs it) that is the real check: boxes to a pixel, masks at
IoU >= 0.98, AP within 0.3 on the demo's test split, in fp32 and in fp16. With
``device=cpu`` the same code runs here against a toy demo build, so the comparison itself
is exercised on every run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from cvserve.models.base import VisionModel
from cvserve.models.build import build_model
from cvserve.models.demo.build import (
    INSTANCE_NAME,
    SEMANTIC_NAME,
    build_demo_repository,
    read_report,
    toy_scale,
)
from cvserve.models.evaluation.coco import evaluate_coco
from cvserve.models.evaluation.coco_io import parse_ground_truth
from cvserve.models.evaluation.inference import PredictFiles, instance_results, semantic_confusion
from cvserve.models.evaluation.semantic import semantic_metrics
from cvserve.models.paths import default_repository_path
from cvserve.models.repository import ModelSpec, load_repository
from cvserve.models.types import Instance, Prediction

pytestmark = pytest.mark.slow
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PRECISIONS = ["fp32", "fp16"]
SCORE_MARGIN = 0.05  # detections this close to the threshold may fall either side of it


@dataclasses.dataclass(frozen=True)
class Demo:
    specs: dict[str, ModelSpec]
    test: Any  # SplitPaths of the regenerated test split


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The demo repository (built if missing) on a CUDA host; a toy build on a CPU."""
    from cvserve.models.data.synthetic import generate_dataset
    from cvserve.models.demo.build import ensure_demo_repository

    if torch.cuda.is_available():
        path = ensure_demo_repository(default_repository_path(), progress=logging.getLogger(__name__).info)
    else:
        path = build_demo_repository(
            tmp_path_factory.mktemp("demo") / "repo", scale=toy_scale(), progress=lambda _: None
        )
    data = read_report(path.parent)["dataset"]
    side = int(data["image_size"])
    splits = generate_dataset(
        tmp_path_factory.mktemp("data"),
        seed=int(data["seed"]),
        splits=data["images"],
        image_size=(side, side),
    )
    return Demo({s.name: s for s in load_repository(path)}, splits["test"])


def loaded(spec: ModelSpec, device: str, precision: str) -> VisionModel:
    model = build_model(dataclasses.replace(spec, device=device, precision=precision))
    model.load()
    return model


def box_gap(a: Instance, b: Instance) -> float:
    return max(abs(x - y) for x, y in zip(a.box, b.box, strict=True))


def mask_iou(a: Instance, b: Instance) -> float:
    assert a.mask is not None and b.mask is not None
    rle = [m.to_coco() for m in (a.mask, b.mask)]
    return float(mask_util.iou([rle[0]], [rle[1]], [0])[0, 0])


def confident(pred: Prediction, threshold: float) -> list[Instance]:
    return [i for i in pred.instances if i.score >= threshold + SCORE_MARGIN]


def compare_instances(reference: list[Prediction], other: list[Prediction], threshold: float) -> list[str]:
    """Reference detections (clear of the threshold) not found again to a pixel with masks at IoU >= 0.98."""
    problems = []
    for k, (ref, oth) in enumerate(zip(reference, other, strict=True)):
        for r in confident(ref, threshold):
            same = [o for o in oth.instances if o.category_id == r.category_id]
            best = min(same, key=lambda o: box_gap(r, o), default=None)
            if best is None or box_gap(r, best) > 1.0:
                problems.append(f"image {k}: {r.box} class {r.category_id} not found within a pixel")
            elif mask_iou(r, best) < 0.98:
                problems.append(f"image {k}: mask IoU {mask_iou(r, best):.3f} for box {r.box}")
    return problems


def average_precision(model: VisionModel, demo: Demo) -> dict[str, float]:
    gt = parse_ground_truth(str(demo.test.instances_json))
    results = instance_results(gt, demo.test.images, in_process_predictor(model), model.class_names)
    metrics = evaluate_coco(str(demo.test.instances_json), results, ("bbox", "segm")) if results else {}
    return {
        t: 100 * float(metrics[t]["stats"]["AP"]) if t in metrics else 0.0 for t in ("bbox", "segm")
    }  # points


@pytest.fixture(scope="module")
def cpu_instance(demo: Demo) -> Iterator[tuple[VisionModel, list[Prediction], dict[str, float]]]:
    model = loaded(demo.specs[INSTANCE_NAME], "cpu", "fp32")
    images = sorted(demo.test.images.glob("*.png"))[:20]
    preds = in_process_predictor(model)(images)
    yield model, preds, average_precision(model, demo)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_the_detector_on_the_device_agrees_with_the_cpu(
    demo: Demo,
    cpu_instance: tuple[VisionModel, list[Prediction], dict[str, float]],
    device: str,
    precision: str,
) -> None:
    _, reference, reference_ap = cpu_instance
    model = loaded(demo.specs[INSTANCE_NAME], device, precision)
    assert str(model.device).startswith(device)
    images = sorted(demo.test.images.glob("*.png"))[:20]
    threshold = min((i.score for p in reference for i in p.instances), default=0.0)  # the score floor
    assert sum(len(confident(p, threshold)) for p in reference) > 0  # something to compare
    problems = compare_instances(reference, in_process_predictor(model)(images), threshold)
    assert not problems, "\n".join(problems[:20])
    ap = average_precision(model, demo)
    for kind in ("bbox", "segm"):
        assert abs(ap[kind] - reference_ap[kind]) <= 0.3, (kind, ap, reference_ap)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_the_segmenter_on_the_device_agrees_with_the_cpu(demo: Demo, device: str, precision: str) -> None:
    spec = demo.specs[SEMANTIC_NAME]
    reference, model = loaded(spec, "cpu", "fp32"), loaded(spec, device, precision)
    images = sorted(demo.test.images.glob("*.png"))[:20]
    ref_preds, preds = in_process_predictor(reference)(images), in_process_predictor(model)(images)
    same = [np.mean(a.semantic.labels == b.semantic.labels) for a, b in zip(ref_preds, preds, strict=True)]  # type: ignore[union-attr]
    assert min(same) >= 0.99, same
    miou = []
    for m in (reference, model):
        conf, _ = semantic_confusion(
            demo.test.images, demo.test.semantic_labels, in_process_predictor(m), len(m.class_names)
        )
        miou.append(semantic_metrics(conf, m.class_names)["mIoU"])
    assert abs(miou[0] - miou[1]) <= 0.3, miou
    # On a GPU only the label map leaves the device: forward returns it, upsampled and argmaxed there.
    (raw,) = model.forward([model.preprocess(np.asarray(_rgb(images[0])))])
    on_device = str(model.device).startswith("cuda")
    assert (raw.ndim, raw.dtype) == ((2, torch.uint8) if on_device else (3, torch.float32))


def _rgb(path: Path) -> np.ndarray:
    import cv2

    return np.ascontiguousarray(cv2.imread(str(path), cv2.IMREAD_COLOR)[:, :, ::-1])


def in_process_predictor(model: VisionModel) -> PredictFiles:
    """Predict image files with ``model`` in this process."""

    def predict(paths: Sequence[Path]) -> list[Prediction]:
        return model.predict_batch([_rgb(p) for p in paths])

    return predict
