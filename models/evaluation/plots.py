"""PNG figures of an evaluation: precision-recall curves and the semantic confusion matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cvserve.models.evaluation.cocoeval import Accumulated

__all__ = ["plot_confusion", "plot_pr_curves"]

CATEGORIES_PER_PAGE = 16


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _curves(ax, acc: Accumulated, k: int | None) -> None:  # type: ignore[no-untyped-def]
    """One line per IoU threshold: precision over recall (area all, most detections)."""
    from matplotlib import colormaps

    p = acc.params
    cmap = colormaps["viridis"]
    for t, thr in enumerate(p.iou_thrs):
        prec = acc.precision[t, :, :, 0, -1]
        if k is not None:
            curve = prec[:, k]
            if curve[0] < 0:
                continue  # no ground truth of this category
        else:
            valid = prec > -1
            if not valid.any():
                continue
            curve = np.where(valid, prec, 0).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
        ax.plot(
            p.rec_thrs, curve, color=cmap(t / max(len(p.iou_thrs) - 1, 1)), lw=1.2, label=f"IoU {thr:.2f}"
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)


def plot_pr_curves(acc: Accumulated, cat_names: Sequence[str], out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.png`` (mean over categories) and ``<stem>_categories_<n>.png`` grids.

    Each panel has one curve per IoU threshold, area ``all``, the largest max-detections.
    """
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7.2, 5))
    _curves(ax, acc, None)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{acc.params.iou_type}: precision-recall, mean over categories")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    written.append(out_dir / f"{stem}.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    for page, first in enumerate(range(0, len(cat_names), CATEGORIES_PER_PAGE), start=1):
        names = cat_names[first : first + CATEGORIES_PER_PAGE]
        cols = min(4, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
        for j, ax in enumerate(axes.ravel()):
            if j >= len(names):
                ax.axis("off")
                continue
            k = first + j
            _curves(ax, acc, k)
            valid = acc.precision[:, :, k, 0, -1]
            ap = float(valid[valid > -1].mean()) if (valid > -1).any() else float("nan")
            ax.set_title(
                f"{names[j]}  AP {ap:.3f}" if not math.isnan(ap) else f"{names[j]}  (no ground truth)",
                fontsize=9,
            )
            ax.tick_params(labelsize=7)
        axes[0, 0].legend(fontsize=6, loc="best")
        fig.suptitle(f"{acc.params.iou_type}: precision (y) over recall (x) per category", fontsize=10)
        fig.tight_layout()
        written.append(out_dir / f"{stem}_categories_{page}.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)
    return written


def plot_confusion(conf: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """The confusion matrix, ground truth down and prediction across, each row normalised to 1."""
    plt = _pyplot()
    n = len(class_names)
    # Stored as rows = prediction, columns = ground truth (detectron2); the ignore column is dropped.
    m = conf[:n, :n].T.astype(np.float64)
    totals = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the ground-truth class's pixels")
    ax.set_title("semantic segmentation confusion matrix")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
