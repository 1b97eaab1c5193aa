"""Scoring a model on a registered dataset, in one process or shared over a process group."""

from __future__ import annotations

import contextlib
import io
import logging

# isort: split

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, SemSegEvaluator, inference_on_dataset

from cvserve.models.training.history import flatten_results

__all__ = ["dataset_classes", "evaluate"]

logger = logging.getLogger(__name__)


def dataset_classes(name: str) -> tuple[bool, list[str]]:
    """``(is_semantic, class names)`` of a registered dataset."""
    if name not in DatasetCatalog.list():
        raise ValueError(f"dataset {name!r} is not registered (see models.data.datasets)")
    meta = MetadataCatalog.get(name)
    if meta.get("evaluator_type") == "sem_seg":
        return True, list(meta.get("stuff_classes", []))
    return False, list(meta.get("thing_classes", []))


def _build_evaluator(cfg: CfgNode, dataset: str, distributed: bool) -> DatasetEvaluator:
    if MetadataCatalog.get(dataset).get("evaluator_type") == "sem_seg":
        return SemSegEvaluator(dataset, distributed=distributed)
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    # use_fast_impl=False: detectron2's fast COCOeval needs its C++ extension.
    return COCOEvaluator(dataset, tasks=tasks, distributed=distributed, use_fast_impl=False)


def evaluate(
    cfg: CfgNode, model: torch.nn.Module, dataset: str, *, distributed: bool = False
) -> dict[str, float]:
    """Evaluate ``model`` on a registered dataset; returns flat metrics like ``segm/AP``.

    ``distributed``: every rank of a process group calls this with its own share of
    the images (detectron2's test loader shards them); rank 0 gets the metrics, the
    others an empty dict.
    """
    evaluator = _build_evaluator(cfg, dataset, distributed)
    loader = build_detection_test_loader(cfg, dataset)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):  # pycocotools prints its tables
        results = inference_on_dataset(model, loader, evaluator)
    logger.debug("evaluation output:\n%s", captured.getvalue())
    return flatten_results(dict(results or {}))
