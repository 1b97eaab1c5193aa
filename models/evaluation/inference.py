"""Running a model over a dataset for evaluation, whatever carries the images to it.

A *predictor* maps a batch of image files to predictions; the CLI builds one from
annotation's predictors (in-process or through a server), which read the files with the
server's own decoder and limits. Instance predictions become a COCO results list, with the model's class names
mapped to the ground truth's category ids by name; semantic predictions are added to a
confusion matrix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cvserve.models.evaluation.coco_io import GroundTruth
from cvserve.models.evaluation.errors import EvaluationInputError
from cvserve.models.evaluation.semantic import IMAGE_SUFFIXES, label_files, read_label_png, update_confusion
from cvserve.models.types import Prediction

__all__ = [
    "PredictFiles",
    "image_for_label",
    "instance_results",
    "map_categories",
    "prediction_entries",
    "semantic_confusion",
]

logger = logging.getLogger(__name__)

PredictFiles = Callable[[Sequence[Path]], list[Prediction]]


def map_categories(class_names: Sequence[str], gt: GroundTruth) -> list[int]:
    """Ground-truth category id of each model class, matched by name.

    Raises:
        EvaluationInputError: a model class has no category of that name (or several).
    """
    by_name: dict[str, list[int]] = {}
    for cid, name in zip(gt.cat_ids.tolist(), gt.cat_names, strict=True):
        by_name.setdefault(name, []).append(cid)
    missing = [n for n in class_names if n not in by_name]
    if missing:
        raise EvaluationInputError(
            f"{gt.source}: categories: the model's class(es) {', '.join(map(repr, missing))} have no category "
            f"of that name (categories: {', '.join(map(repr, gt.cat_names))})"
        )
    ambiguous = [n for n in class_names if len(by_name[n]) > 1]
    if ambiguous:
        raise EvaluationInputError(f"{gt.source}: categories: several categories are named {ambiguous[0]!r}")
    unused = sorted(set(gt.cat_names) - set(class_names))
    if unused:
        logger.warning("ground-truth categories the model cannot predict (AP 0): %s", ", ".join(unused))
    return [by_name[n][0] for n in class_names]


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _image_paths(gt: GroundTruth, images_dir: Path) -> list[Path]:
    paths = []
    for image_id, name in zip(gt.image_ids.tolist(), gt.file_names, strict=True):
        if not isinstance(name, str) or not name:
            raise EvaluationInputError(f"{gt.source}: image {image_id}: field 'file_name' is missing")
        path = images_dir / name
        if not path.is_file():
            raise EvaluationInputError(f"{path}: image file of image {image_id} ({gt.source}) not found")
        paths.append(path)
    return paths


def prediction_entries(pred: Prediction, image_id: int, cat_map: Sequence[int]) -> list[dict[str, Any]]:
    """COCO results entries of one image's instance predictions (class ``i`` becomes ``cat_map[i]``)."""
    return [inst.coco_entry(cat_map[inst.category_id], image_id) for inst in pred.instances]


def _to_entries(
    pred: Prediction, image_id: int, cat_map: list[int], expect: tuple[int, int], path: Path
) -> list[dict[str, Any]]:
    if tuple(pred.image_size) != expect:
        raise EvaluationInputError(
            f"{path}: image is {pred.image_size[0]}x{pred.image_size[1]} but the ground truth says {expect[0]}x{expect[1]}"
        )
    return prediction_entries(pred, image_id, cat_map)


def instance_results(
    gt: GroundTruth,
    images_dir: str | os.PathLike[str],
    predict: PredictFiles,
    class_names: Sequence[str],
    batch_size: int = 1,
) -> list[dict[str, Any]]:
    """Run ``predict`` over every ground-truth image; return COCO results entries.

    Raises:
        EvaluationInputError: an image file is missing or unreadable, its size disagrees
            with the ground truth, or the class names do not map onto the categories.
    """
    cat_map = map_categories(class_names, gt)
    paths = _image_paths(gt, Path(images_dir))
    sizes = list(zip(gt.heights.tolist(), gt.widths.tolist(), strict=True))
    ids = gt.image_ids.tolist()
    results: list[dict[str, Any]] = []
    for start, batch in zip(range(0, len(paths), batch_size), _batches(paths, batch_size), strict=True):
        for k, pred in enumerate(predict(batch)):
            i = start + k
            # Ground truth without sizes cannot be checked against; its masks are not evaluated then.
            expect = sizes[i] if sizes[i][0] > 0 else (int(pred.image_size[0]), int(pred.image_size[1]))
            results.extend(_to_entries(pred, ids[i], cat_map, expect, paths[i]))
        logger.info("predicted %d/%d images", min(start + batch_size, len(paths)), len(paths))
    return results


def image_for_label(label: Path, images_dir: Path) -> Path:
    """The image named like a label PNG (any common image suffix)."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (images_dir / (label.stem + suffix), images_dir / (label.stem + suffix.upper())):
            if candidate.is_file():
                return candidate
    raise EvaluationInputError(f"{label}: no image named {label.stem}.* in {images_dir}")


def semantic_confusion(
    images_dir: str | os.PathLike[str],
    labels_dir: str | os.PathLike[str],
    predict: PredictFiles,
    num_classes: int,
    ignore_label: int = 255,
    batch_size: int = 1,
) -> tuple[np.ndarray, int]:
    """Confusion matrix of a semantic model over every label PNG and its image.

    Returns:
        ``(confusion matrix (N + 1, N + 1), number of images)``.
    """
    labels = label_files(labels_dir)
    images = [image_for_label(lab, Path(images_dir)) for lab in labels]
    conf = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for start in range(0, len(images), batch_size):
        preds = predict(images[start : start + batch_size])
        for k, pred in enumerate(preds):
            i = start + k
            if pred.semantic is None:
                raise EvaluationInputError(
                    f"{images[i]}: the model returned no label map (is it a semantic model?)"
                )
            update_confusion(
                conf,
                np.asarray(pred.semantic.labels),
                read_label_png(labels[i]),
                ignore_label,
                str(labels[i]),
            )
        logger.info("predicted %d/%d images", min(start + batch_size, len(images)), len(images))
    return conf, len(images)
