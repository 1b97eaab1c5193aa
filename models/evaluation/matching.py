"""pycocotools' greedy matching (``COCOeval.evaluateImg``) for every image, category and area range at once.

Detections are grouped per (image, category), ranked by descending score (stable), and
matched one rank at a time: the detections of one rank never compete for a ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cvserve.models.evaluation.cocoeval import EvalParams, PairIoU

__all__ = ["Matches", "match"]


@dataclass(frozen=True)
class Matches:
    """Matching outcome for the kept detections, in (category, score, image, rank) order."""

    cat: np.ndarray  # (N,) category index
    rank: np.ndarray  # (N,) rank within its (image, category)
    score: np.ndarray  # (N,)
    matched: np.ndarray  # (A, T, N) bool
    ignored: np.ndarray  # (A, T, N) bool
    npig: np.ndarray  # (K, A) non-ignored ground truths per category and area range


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


def match(
    params: EvalParams,
    num_cats: int,
    gt: dict[str, np.ndarray],
    dt: dict[str, np.ndarray],
    pair_iou: PairIoU,
) -> Matches:
    """Match detections to ground truth for every area range and IoU threshold.

    Arguments are those of :func:`cvserve.models.evaluation.cocoeval.evaluate`.
    """
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
    return Matches(
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
