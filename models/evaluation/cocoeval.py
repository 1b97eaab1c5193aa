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


@dataclass(frozen=True)
class _Matches:
    """Matching outcome for the kept detections, in (category, score, image, rank) order."""

    cat: np.ndarray  # (N,) category index
    rank: np.ndarray  # (N,) rank within its (image, category)
    score: np.ndarray  # (N,)
    matched: np.ndarray  # (A, T, N) bool
    ignored: np.ndarray  # (A, T, N) bool
    npig: np.ndarray  # (K, A) non-ignored ground truths per category and area range


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
    return _accumulate(params, num_cats, _match(params, num_cats, gt, dt, pair_iou))


def _group_detections(
    params: EvalParams, num_cats: int, dt: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort detections by (image, category, -score) stably; keep the first max(maxDets) of each group."""
    key = dt["img"].astype(np.int64) * num_cats + dt["cat"]
    order = np.lexsort((-dt["score"], key))
    skey = key[order]
    starts = np.flatnonzero(np.r_[True, skey[1:] != skey[:-1]]) if len(skey) else np.zeros(0, np.int64)
    rank = np.arange(len(skey)) - np.repeat(starts, np.diff(np.r_[starts, len(skey)]))
    keep = rank < params.max_dets[-1]
    return order[keep], skey[keep], rank[keep]


def _pairs(dkey: np.ndarray, gkey: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (detection, ground truth) pairs sharing a group key, detection-major.

    Both key arrays must be sorted. Returns positions into them and group boundaries.
    """
    if len(dkey) == 0 or len(gkey) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros((0, 3), np.int64)
    gkeys, gstart, gcount = np.unique(gkey, return_index=True, return_counts=True)
    pos = np.searchsorted(gkeys, dkey)
    pos = np.minimum(pos, len(gkeys) - 1)
    has = gkeys[pos] == dkey
    d_idx = np.flatnonzero(has)
    ng = gcount[pos[d_idx]]
    total = int(ng.sum())
    pd = np.repeat(d_idx, ng)
    offs = np.arange(total) - np.repeat(np.cumsum(ng) - ng, ng)
    pg = np.repeat(gstart[pos[d_idx]], ng) + offs
    # Groups in pair space: a group is every pair of one key.
    dk = dkey[pd]
    starts = np.flatnonzero(np.r_[True, dk[1:] != dk[:-1]]) if total else np.zeros(0, np.int64)
    groups = np.stack([starts, np.r_[starts[1:], total], np.repeat(ng, ng)[starts]], axis=1)
    return pd, pg, groups.astype(np.int64)


@dataclass(frozen=True)
class _PairSet:
    """(detection, ground truth) pairs with their IoU, indexed for rank-by-rank matching."""

    pd: np.ndarray  # detection position (sorted detection order)
    pg: np.ndarray  # ground-truth position (sorted ground-truth order)
    ious: np.ndarray
    by_rank: np.ndarray  # pair indices ordered by detection rank (stable)
    rank_starts: np.ndarray  # start of each rank in ``by_rank``


def _match(
    params: EvalParams,
    num_cats: int,
    gt: dict[str, np.ndarray],
    dt: dict[str, np.ndarray],
    pair_iou: PairIoU,
) -> _Matches:
    dorder, dkey, rank = _group_detections(params, num_cats, dt)
    gkey_raw = gt["img"].astype(np.int64) * num_cats + gt["cat"]
    gorder = np.argsort(gkey_raw, kind="stable")
    pd, pg, groups = _pairs(dkey, gkey_raw[gorder])
    by_rank = np.argsort(rank[pd], kind="stable")
    pairs = _PairSet(
        pd,
        pg,
        pair_iou(dorder[pd], gorder[pg], groups) if len(pd) else np.zeros(0),
        by_rank,
        np.searchsorted(rank[pd][by_rank], np.arange(params.max_dets[-1] + 1)),
    )
    d_area, g_area = dt["area"][dorder], gt["area"][gorder]
    n_a, n_t, n_d = len(params.area_rngs), len(params.iou_thrs), len(dorder)
    matched = np.zeros((n_a, n_t, n_d), bool)
    ignored = np.zeros((n_a, n_t, n_d), bool)
    npig = np.zeros((num_cats, n_a), np.int64)
    for a, (lo, hi) in enumerate(params.area_rngs):
        g_ig = gt["ignore"][gorder] | (g_area < lo) | (g_area > hi)
        npig[:, a] = np.bincount(gt["cat"][gorder][~g_ig], minlength=num_cats)
        _greedy(params, pairs, gt["crowd"][gorder], g_ig, matched[a], ignored[a])
        ignored[a] |= ~matched[a] & ((d_area < lo) | (d_area > hi))[None, :]
    cat = dt["cat"][dorder]
    # Accumulation order: category, then score (stable) over images in id order, then rank.
    acc = np.lexsort((rank, dt["img"][dorder], -dt["score"][dorder], cat))
    return _Matches(
        cat=cat[acc],
        rank=rank[acc],
        score=dt["score"][dorder][acc],
        matched=matched[:, :, acc],
        ignored=ignored[:, :, acc],
        npig=npig,
    )


def _greedy(
    params: EvalParams,
    pairs: _PairSet,
    crowd: np.ndarray,
    g_ig: np.ndarray,
    matched: np.ndarray,
    ignored: np.ndarray,
) -> None:
    """pycocotools' greedy matching for one area range, filling ``(T, N)`` ``matched`` / ``ignored``.

    Pairs go rank by rank: each step holds one detection per (image, category), so the
    detections of a step never compete for a ground truth and can be matched together.
    """
    thr = np.minimum(params.iou_thrs, 1 - 1e-10)[:, None]
    taken = np.zeros((len(thr), len(crowd)), bool)
    for r in range(params.max_dets[-1]):
        sel = pairs.by_rank[pairs.rank_starts[r] : pairs.rank_starts[r + 1]]
        if len(sel) == 0:
            break
        best = _best_gt(sel, pairs.pd, pairs.pg, pairs.ious, thr, taken, crowd, g_ig)
        t_idx, p_idx = np.nonzero(best >= 0)
        chosen = sel[best[t_idx, p_idx]]
        gi, di = pairs.pg[chosen], pairs.pd[chosen]
        taken[t_idx, gi] = True
        matched[t_idx, di] = True
        ignored[t_idx, di] = g_ig[gi]


def _best_gt(
    sel: np.ndarray,
    pd: np.ndarray,
    pg: np.ndarray,
    ious: np.ndarray,
    thr: np.ndarray,
    taken: np.ndarray,
    crowd: np.ndarray,
    g_ig: np.ndarray,
) -> np.ndarray:
    """For each detection of this rank and each threshold, the pair (index into ``sel``) it matches.

    Returns a ``(T, len(sel))`` array holding, at the position of each detection's first
    pair, the chosen pair's index into ``sel`` or -1; other positions are -1.
    """
    gi = pg[sel]
    iou = ious[sel]
    valid = (iou[None, :] >= thr) & ~(taken[:, gi] & ~crowd[gi][None, :])
    starts = np.flatnonzero(np.r_[True, pd[sel][1:] != pd[sel][:-1]])
    seg = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(sel)]))
    nonig = ~g_ig[gi]
    # A free non-ignored ground truth always wins over an ignored one (pycocotools' break).
    has_nonig = np.logical_or.reduceat(valid & nonig[None, :], starts, axis=1)
    eligible = valid & (nonig[None, :] == has_nonig[:, seg])
    best_iou = np.maximum.reduceat(np.where(eligible, iou[None, :], -1.0), starts, axis=1)
    is_best = eligible & (iou[None, :] == best_iou[:, seg])
    # Ties go to the later ground truth: pairs of a detection are in ground-truth file order.
    pos = np.arange(len(sel))[None, :]
    choice = np.maximum.reduceat(np.where(is_best, pos, -1), starts, axis=1)
    out = np.full((len(thr), len(sel)), -1, np.int64)
    out[:, starts] = choice
    return out


def _accumulate(params: EvalParams, num_cats: int, m: _Matches) -> Accumulated:
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
