"""Semantic segmentation metrics with detectron2's ``SemSegEvaluator`` conventions (v0.6).

A ``(N + 1) x (N + 1)`` confusion matrix counts pixels, rows = prediction, columns =
ground truth; ground-truth pixels equal to the ignore label go to the extra last column
and so count nowhere. From it, in percent as detectron2 reports them:

* ``IoU-<class>`` / ``ACC-<class>``: NaN (``None`` in JSON) for classes absent from the
  ground truth;
* ``mIoU``: the sum of the valid IoUs divided by the number of classes present in the
  ground truth *or* the prediction -- a class only ever predicted lowers the mean;
* ``fwIoU`` (weighted by ground-truth frequency), ``mACC``, ``pACC``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cvserve.models.evaluation.errors import EvaluationInputError

__all__ = ["IMAGE_SUFFIXES", "evaluate_semantic", "read_label_png", "semantic_metrics", "update_confusion"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def update_confusion(
    conf: np.ndarray, pred: np.ndarray, gt: np.ndarray, ignore_label: int, where: str = "prediction"
) -> None:
    """Add one image's pixels to ``conf`` (shape ``(N + 1, N + 1)``) in place.

    Raises:
        EvaluationInputError: shapes differ, or a label is out of range.
    """
    n = conf.shape[0] - 1
    if pred.shape != gt.shape:
        raise EvaluationInputError(
            f"{where}: prediction is {pred.shape[0]}x{pred.shape[1]} but the label map is {gt.shape[0]}x{gt.shape[1]}"
        )
    pred = pred.astype(np.int64, copy=False)
    gt = gt.astype(np.int64, copy=True)
    if pred.size and (pred.min() < 0 or pred.max() >= n):
        raise EvaluationInputError(f"{where}: predicted label {int(pred.max())} outside 0..{n - 1}")
    gt[gt == ignore_label] = n
    bad = (gt < 0) | (gt > n)
    if bad.any():
        raise EvaluationInputError(
            f"{where}: label value {int(gt[bad][0])} is neither a class (0..{n - 1}) nor the ignore label {ignore_label}"
        )
    conf += np.bincount((n + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=conf.size).reshape(conf.shape)


def semantic_metrics(conf: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """detectron2's SemSegEvaluator figures from a confusion matrix (percent; NaN where undefined)."""
    n = len(class_names)
    acc = np.full(n, np.nan)
    iou = np.full(n, np.nan)
    tp = conf.diagonal()[:-1].astype(np.float64)
    pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(np.float64)
    pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        class_weights = pos_gt / np.sum(pos_gt)
        acc_valid = pos_gt > 0
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        iou_valid = (pos_gt + pos_pred) > 0
        union = pos_gt + pos_pred - tp
        iou[acc_valid] = tp[acc_valid] / union[acc_valid]
        macc = np.sum(acc[acc_valid]) / np.sum(acc_valid)
        miou = np.sum(iou[acc_valid]) / np.sum(iou_valid)
        fiou = np.sum(iou[acc_valid] * class_weights[acc_valid])
        pacc = np.sum(tp) / np.sum(pos_gt)
    res: dict[str, Any] = {"mIoU": 100 * float(miou), "fwIoU": 100 * float(fiou)}
    res.update({f"IoU-{name}": 100 * float(iou[i]) for i, name in enumerate(class_names)})
    res["mACC"] = 100 * float(macc)
    res["pACC"] = 100 * float(pacc)
    res.update({f"ACC-{name}": 100 * float(acc[i]) for i, name in enumerate(class_names)})
    return res


def read_label_png(path: Path) -> np.ndarray:
    """A label PNG as a 2-D integer array (palette indices for paletted PNGs, like detectron2)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except (OSError, UnidentifiedImageError) as e:
        raise EvaluationInputError(f"{path}: cannot read label image: {e}") from None
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise EvaluationInputError(
            f"{path}: a label map must be a single-channel integer image, got shape {arr.shape} {arr.dtype}"
        )
    return arr


def label_files(labels_dir: str | os.PathLike[str]) -> list[Path]:
    """Label PNGs of a directory, sorted by name."""
    root = Path(labels_dir)
    if not root.is_dir():
        raise EvaluationInputError(f"{root}: labels directory not found")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise EvaluationInputError(f"{root}: no label PNGs found")
    return files


def _pairs_from_dirs(pred_dir: Path, labels_dir: Path) -> Iterable[tuple[np.ndarray, np.ndarray, str]]:
    for label in label_files(labels_dir):
        pred = pred_dir / label.name
        if not pred.is_file():
            raise EvaluationInputError(f"{pred}: no prediction for label map {label}")
        yield read_label_png(pred), read_label_png(label), str(label)


def evaluate_semantic(
    predictions: str | os.PathLike[str] | Sequence[np.ndarray],
    labels: str | os.PathLike[str] | Sequence[np.ndarray],
    class_names: Sequence[str],
    ignore_label: int = 255,
) -> dict[str, Any]:
    """Semantic segmentation metrics of predicted label maps against ground-truth label maps.

    Args:
        predictions: a directory of predicted label PNGs (named like the ground truth's) or
            a sequence of ``(H, W)`` integer arrays.
        labels: a directory of ground-truth label PNGs or a sequence of arrays, same order.
        class_names: class names, index = label value.
        ignore_label: ground-truth value excluded from every figure.

    Returns:
        detectron2's figures (``mIoU``, ``fwIoU``, ``IoU-<class>``, ``mACC``, ``pACC``,
        ``ACC-<class>``, in percent) plus ``confusion_matrix`` (rows: prediction, columns:
        ground truth, last column: ignored pixels) and ``num_images``.

    Raises:
        EvaluationInputError: a file is missing or unreadable, or a label is out of range.
    """
    n = len(class_names)
    conf = np.zeros((n + 1, n + 1), np.int64)
    if isinstance(predictions, (str, os.PathLike)) or isinstance(labels, (str, os.PathLike)):
        if not (isinstance(predictions, (str, os.PathLike)) and isinstance(labels, (str, os.PathLike))):
            raise TypeError("predictions and labels must both be directories or both be sequences of arrays")
        pairs = list(_pairs_from_dirs(Path(predictions), Path(labels)))
    else:
        if len(predictions) != len(labels):
            raise EvaluationInputError(f"{len(predictions)} predictions for {len(labels)} label maps")
        pairs = [
            (np.asarray(p), np.asarray(g), f"image {i}")
            for i, (p, g) in enumerate(zip(predictions, labels, strict=True))
        ]
    for pred, gt, where in pairs:
        update_confusion(conf, pred, gt, ignore_label, where)
    return {
        **semantic_metrics(conf, class_names),
        "confusion_matrix": conf.tolist(),
        "num_images": len(pairs),
    }
