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
* a detection matched to ground-truth annotation id 0 counts as unmatched (pycocotools
  stores the matched id and reads 0 as "no match"), while that ground truth is taken;
* class-agnostic evaluation (``useCats=0``) sees an image's ground truths and detections
  in category order, as pycocotools concatenates them;
* 101-point interpolated precision with the monotone envelope and ``np.spacing(1)``
  in the denominator; -1 where a category has no ground truth.

Inputs are flat arrays (one row per ground truth / detection), already validated.
"""

from __future__ import annotations

import numpy as np

from cvserve.models.evaluation.matching import Matches, match
from cvserve.models.evaluation.params import Accumulated, EvalParams, PairIoU

__all__ = ["evaluate"]


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
        gt: ground-truth arrays ``img``, ``cat`` (int), ``area`` (float), ``crowd``,
            ``ignore`` (bool; ``ignore`` includes crowd) and ``zero_id`` (bool: annotation
            id is 0), in file order.
        dt: detection arrays ``img``, ``cat`` (int), ``score``, ``area`` (float), in file order.
        pair_iou: computes the IoU of (detection, ground truth) index pairs.

    Returns:
        The accumulated precision / recall / scores.
    """
    del num_images  # image indices only order the accumulation; their count is implied
    if not params.use_cats:
        gt, dt, pair_iou = _class_agnostic(gt, dt, pair_iou)
        num_cats = 1
    return _accumulate(params, num_cats, match(params, num_cats, gt, dt, pair_iou))


def _class_agnostic(
    gt: dict[str, np.ndarray], dt: dict[str, np.ndarray], pair_iou: PairIoU
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], PairIoU]:
    """One category; rows reordered by category (stable) as pycocotools' ``useCats=0`` lists them."""
    g_perm = np.argsort(gt["cat"], kind="stable")
    d_perm = np.argsort(dt["cat"], kind="stable")
    gt = {k: v[g_perm] for k, v in gt.items()}
    dt = {k: v[d_perm] for k, v in dt.items()}
    gt["cat"] = np.zeros_like(gt["cat"])
    dt["cat"] = np.zeros_like(dt["cat"])

    def iou(d: np.ndarray, g: np.ndarray, groups: np.ndarray) -> np.ndarray:
        return pair_iou(d_perm[d], g_perm[g], groups)

    return gt, dt, iou


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
