"""A vectorised COCOeval: pycocotools' ``evaluateImg`` and ``accumulate`` in numpy.

pycocotools walks every (image, category, area range) triple in Python; this module
does the same greedy matching for all of them at once, one detection rank at a time,
and accumulates with a single sort. It reproduces pycocotools exactly, including:

* detections ordered by descending score with a stable sort (ties keep file order),
  and only the first ``max(maxDets)`` per (image, category) evaluated at all;
* a detection takes the best still-free non-ignored ground truth with IoU >= the
  threshold, else the best ignored one; crowd regions may be matched many times;
  equal IoUs go to the later ground truth, as pycocotools' ``<`` comparison does;
* unmatched detections outside the area range are ignored;
* 101-point interpolated precision with the monotone envelope and ``np.spacing(1)``
  in the denominator; -1 where a category has no ground truth.

Inputs are flat arrays (one row per ground truth / detection), already validated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cvserve.models.evaluation.matching import Matches, match

__all__ = ["Accumulated", "EvalParams", "PairIoU", "evaluate"]

# Computes one IoU per (detection, ground truth) pair, given the pair index arrays and a
# ``(G, 3)`` array of groups ``(start, stop, ground truths per detection)``: the pairs of one
# (image, category) are contiguous and detection-major.
PairIoU = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EvalParams:
    """COCOeval parameters, with pycocotools' defaults per IoU type.

    Attributes:
        iou_type: ``bbox``, ``segm`` or ``keypoints``.
        iou_thrs: IoU thresholds (T).
        rec_thrs: recall thresholds of the interpolated precision (R = 101).
        max_dets: detections per image considered (M), ascending.
        area_rngs: ``(A, 2)`` area ranges, inclusive at both ends.
        area_labels: names of the area ranges (``all`` first).
    """

    iou_type: str
    iou_thrs: np.ndarray = field(
        default_factory=lambda: np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
    )
    rec_thrs: np.ndarray = field(
        default_factory=lambda: np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
    )
    max_dets: tuple[int, ...] = (1, 10, 100)
    area_rngs: np.ndarray = field(
        default_factory=lambda: np.array([[0**2, 1e5**2], [0**2, 32**2], [32**2, 96**2], [96**2, 1e5**2]])
    )
    area_labels: tuple[str, ...] = ("all", "small", "medium", "large")

    @classmethod
    def for_type(cls, iou_type: str) -> EvalParams:
        """pycocotools' default parameters for ``iou_type``."""
        if iou_type == "keypoints":
            return cls(
                iou_type,
                max_dets=(20,),
                area_rngs=np.array([[0**2, 1e5**2], [32**2, 96**2], [96**2, 1e5**2]]),
                area_labels=("all", "medium", "large"),
            )
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"unknown IoU type {iou_type!r}")
        return cls(iou_type)


@dataclass(frozen=True)
class Accumulated:
    """What pycocotools' ``accumulate`` leaves in ``COCOeval.eval``.

    Attributes:
        params: the parameters used.
        precision: ``(T, R, K, A, M)`` interpolated precision, -1 where undefined.
        recall: ``(T, K, A, M)`` maximum recall, -1 where undefined.
        scores: ``(T, R, K, A, M)`` detection score at each recall threshold.
    """

    params: EvalParams
    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray


def evaluate(
    params: EvalParams,
    num_images: int,
    num_cats: int,
    gt: dict[str, np.ndarray],
    dt: dict[str, np.ndarray],
    pair_iou: PairIoU,
) -> Accumulated:
    """Evaluate and accumulate like ``COCOeval.evaluate(); COCOeval.accumulate()``.

    Args:
        params: evaluation parameters.
        num_images: number of ground-truth images (indices are 0..num_images-1, in
            ascending image-id order).
        num_cats: number of categories (indices in ascending category-id order).
        gt: ground-truth arrays ``img``, ``cat`` (int), ``area`` (float), ``crowd`` and
            ``ignore`` (bool; ``ignore`` includes crowd), in file order.
        dt: detection arrays ``img``, ``cat`` (int), ``score``, ``area`` (float), in file order.
        pair_iou: computes the IoU of (detection, ground truth) index pairs.

    Returns:
        The accumulated precision / recall / scores.
    """
    del num_images  # image indices only order the accumulation; their count is implied
    return _accumulate(params, num_cats, match(params, num_cats, gt, dt, pair_iou))


def _accumulate(params: EvalParams, num_cats: int, m: Matches) -> Accumulated:
    n_t, n_r, n_a, n_m = (
        len(params.iou_thrs),
        len(params.rec_thrs),
        len(params.area_rngs),
        len(params.max_dets),
    )
    precision = -np.ones((n_t, n_r, num_cats, n_a, n_m))
    recall = -np.ones((n_t, num_cats, n_a, n_m))
    scores = -np.ones((n_t, n_r, num_cats, n_a, n_m))
    for a in range(n_a):
        npig = m.npig[:, a]
        cats = np.flatnonzero(npig > 0)  # pycocotools leaves -1 where a category has no ground truth
        for mi, max_det in enumerate(params.max_dets):
            keep = np.flatnonzero(m.rank < max_det)
            p, r, s = _pr_curves(
                params, m.cat[keep], m.matched[a][:, keep], m.ignored[a][:, keep], m.score[keep], npig
            )
            precision[:, :, cats, a, mi] = p[:, :, cats]
            recall[:, cats, a, mi] = r[:, cats]
            scores[:, :, cats, a, mi] = s[:, :, cats]
    return Accumulated(params, precision, recall, scores)


def _segment_cumsum(flags: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Running count of ``flags`` along axis 1, restarting at every segment start (exact, integer)."""
    total = np.cumsum(flags, axis=1, dtype=np.int64)
    before = np.concatenate([np.zeros((len(flags), 1), np.int64), total], axis=1)[:, starts]
    return total - np.repeat(before, counts, axis=1)


def _first_tp_reaching(params: EvalParams, npig: np.ndarray) -> np.ndarray:
    """``(K, R)``: the least true-positive count whose recall ``tp / npig`` reaches each recall threshold.

    Recall is monotone in the count, so pycocotools' ``searchsorted(rc, recThrs)`` equals a
    search on the integer counts for this value; candidates around ``thr * npig`` are checked
    with the same float division pycocotools does.
    """
    n = np.maximum(npig, 1).astype(np.float64)[:, None]
    base = np.floor(params.rec_thrs[None, :] * n) - 1
    best = np.full(base.shape, np.inf)
    for step in (3, 2, 1, 0):
        cand = np.maximum(base + step, 0)
        best = np.where(cand / n >= params.rec_thrs[None, :], cand, best)
    return best


def _pr_curves(
    params: EvalParams,
    cat: np.ndarray,
    matched: np.ndarray,
    ignored: np.ndarray,
    score: np.ndarray,
    npig: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interpolated precision ``(T, R, K)``, recall ``(T, K)`` and scores for every category at once.

    ``cat`` is sorted; within a category detections are in accumulation order.
    """
    n_t, n_r, n_k, nd = matched.shape[0], len(params.rec_thrs), len(npig), len(cat)
    starts = np.searchsorted(cat, np.arange(n_k))
    counts = np.diff(np.r_[starts, nd])
    tp = _segment_cumsum(matched & ~ignored, starts, counts)
    fp = _segment_cumsum(~matched & ~ignored, starts, counts)
    with np.errstate(divide="ignore", invalid="ignore"):
        rc = tp / npig[cat][None, :]
        pr = tp / (fp + tp + np.spacing(1))
    for k in np.flatnonzero(counts):
        seg = pr[:, starts[k] : starts[k] + counts[k]]
        # pycocotools' backward loop making precision monotone is a reverse running maximum.
        seg[:] = np.maximum.accumulate(seg[:, ::-1], axis=1)[:, ::-1]
    last = starts + counts - 1
    recall = np.where(counts[None, :] > 0, rc[:, np.maximum(last, 0)] if nd else 0.0, 0.0)
    # searchsorted per (threshold, category) done once on integer keys made globally sorted.
    big = nd + 2
    row = np.arange(n_t)[:, None] * n_k + np.repeat(np.arange(n_k), counts)[None, :]
    keys = (row * big + tp).ravel()
    need = _first_tp_reaching(params, npig)  # (K, R), may be inf
    need = np.minimum(need, big - 1).astype(np.int64)
    qrow = np.arange(n_t)[:, None, None] * n_k + np.arange(n_k)[None, :, None]
    found = np.searchsorted(keys, (qrow * big + need[None]).ravel()).reshape(n_t, n_k, n_r)
    pos = found - np.arange(n_t)[:, None, None] * nd
    ok = pos < (starts + counts)[None, :, None]
    pos = np.where(ok, pos, 0)
    q = np.where(ok, pr.reshape(n_t, nd)[np.arange(n_t)[:, None, None], pos] if nd else 0.0, 0.0)
    ss = np.where(ok, score[pos] if nd else 0.0, 0.0)
    return q.transpose(0, 2, 1), recall, ss.transpose(0, 2, 1)
