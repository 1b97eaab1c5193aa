"""Evaluation parameters and result types shared by every COCO evaluation engine.

:class:`EvalParams` is what one engine run needs (pycocotools' ``COCOeval.params``);
:class:`EvalSettings` is what a user chooses (the CLI's flags), recorded in report.json
and turned into an :class:`EvalParams` per IoU type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "ENGINES",
    "SEGM_AREA_RULES",
    "Accumulated",
    "EvalParams",
    "EvalSettings",
    "PairIoU",
    "default_iou_thrs",
]

# Computes one IoU per (detection, ground truth) pair, given the pair index arrays and a
# ``(G, 3)`` array of groups ``(start, stop, ground truths per detection)``: the pairs of one
# (image, category) are contiguous and detection-major.
PairIoU = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

ENGINES = ("numpy", "faster-coco-eval", "pycocotools")
SEGM_AREA_RULES = ("mask", "box")
_DEFAULT_AREAS = (
    ("all", 0.0, 1e10),
    ("small", 0.0, 32.0**2),
    ("medium", 32.0**2, 96.0**2),
    ("large", 96.0**2, 1e10),
)
_KPT_AREAS = (("all", 0.0, 1e10), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, 1e10))


def default_iou_thrs() -> np.ndarray:
    """pycocotools' 0.50:0.05:0.95, built with the same ``linspace`` so values compare equal."""
    return np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)


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
        use_cats: ``False`` evaluates class-agnostically (pycocotools' ``useCats=0``).
    """

    iou_type: str
    iou_thrs: np.ndarray = field(default_factory=default_iou_thrs)
    rec_thrs: np.ndarray = field(
        default_factory=lambda: np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
    )
    max_dets: tuple[int, ...] = (1, 10, 100)
    area_rngs: np.ndarray = field(
        default_factory=lambda: np.array([[lo, hi] for _, lo, hi in _DEFAULT_AREAS])
    )
    area_labels: tuple[str, ...] = tuple(a[0] for a in _DEFAULT_AREAS)
    use_cats: bool = True

    @classmethod
    def for_type(cls, iou_type: str) -> EvalParams:
        """pycocotools' default parameters for ``iou_type``."""
        if iou_type == "keypoints":
            return cls(
                iou_type,
                max_dets=(20,),
                area_rngs=np.array([[lo, hi] for _, lo, hi in _KPT_AREAS]),
                area_labels=tuple(a[0] for a in _KPT_AREAS),
            )
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"unknown IoU type {iou_type!r}")
        return cls(iou_type)


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation choices a user can make; ``None`` means pycocotools' default.

    Attributes:
        max_dets: three ascending detections-per-image limits (bbox / segm; pycocotools'
            summary reads three). Keypoints keep pycocotools' single 20.
        iou_thrs: IoU thresholds.
        area_ranges: ``(label, low, high)`` triples, inclusive; ``all`` should come first.
        img_ids: evaluate only these image ids.
        cat_ids: evaluate only these category ids.
        use_cats: ``False`` for class-agnostic evaluation (``useCats=0``).
        segm_area: a segm result's area (for the area ranges): ``mask`` (detectron2, the
            default) or ``box`` (plain ``loadRes`` when results carry a box).
        engine: ``numpy`` (default), ``faster-coco-eval`` or ``pycocotools``.
        renumber_ids: renumber ground-truth annotation ids from 1 (pycocotools counts a
            detection matched to annotation id 0 as a false positive).
    """

    max_dets: tuple[int, int, int] | None = None
    iou_thrs: tuple[float, ...] | None = None
    area_ranges: tuple[tuple[str, float, float], ...] | None = None
    img_ids: tuple[int, ...] | None = None
    cat_ids: tuple[int, ...] | None = None
    use_cats: bool = True
    segm_area: str = "mask"
    engine: str = "numpy"
    renumber_ids: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.segm_area not in SEGM_AREA_RULES:
            raise ValueError(f"segm area rule must be mask or box, got {self.segm_area!r}")
        if self.max_dets is not None and (
            len(set(self.max_dets)) != 3
            or list(self.max_dets) != sorted(self.max_dets)
            or min(self.max_dets) < 1
        ):
            raise ValueError(f"max dets must be 3 ascending integers >= 1, got {list(self.max_dets)}")
        if self.iou_thrs is not None and (
            not self.iou_thrs
            or not all(0 < t <= 1 for t in self.iou_thrs)
            or len(set(self.iou_thrs)) != len(self.iou_thrs)
        ):
            raise ValueError(f"IoU thresholds must be distinct numbers in (0, 1], got {list(self.iou_thrs)}")
        for name, ids in (("image", self.img_ids), ("category", self.cat_ids)):
            if ids is not None and (not ids or len(set(ids)) != len(ids)):
                raise ValueError(f"{name} ids must be a non-empty list without repeats, got {list(ids)}")
        if self.area_ranges is not None:
            for label, lo, hi in self.area_ranges:
                if not (label and 0 <= lo <= hi):
                    raise ValueError(
                        f"area range {label!r}: need a name and 0 <= low <= high, got {lo}, {hi}"
                    )

    def params(self, iou_type: str) -> EvalParams:
        """The :class:`EvalParams` of ``iou_type`` under these settings.

        Raises:
            ValueError: class-agnostic keypoint evaluation (pycocotools' OKS ignores
                ``useCats=0`` and matches nothing; keypoints have one category anyway).
        """
        if iou_type == "keypoints" and not self.use_cats:
            raise ValueError("class-agnostic evaluation applies to bbox and segm, not keypoints")
        p = EvalParams.for_type(iou_type)
        kw: dict[str, Any] = {"use_cats": self.use_cats}
        if self.iou_thrs is not None:
            kw["iou_thrs"] = np.asarray(self.iou_thrs, np.float64)
        if self.max_dets is not None and iou_type != "keypoints":
            kw["max_dets"] = tuple(self.max_dets)
        for name, ids in (("image", self.img_ids), ("category", self.cat_ids)):
            if ids is not None and (not ids or len(set(ids)) != len(ids)):
                raise ValueError(f"{name} ids must be a non-empty list without repeats, got {list(ids)}")
        if self.area_ranges is not None:
            kw["area_rngs"] = np.array([[lo, hi] for _, lo, hi in self.area_ranges], np.float64)
            kw["area_labels"] = tuple(label for label, _, _ in self.area_ranges)
        return EvalParams(iou_type, **{**_fields(p), **kw})

    def to_json(self, iou_types: tuple[str, ...]) -> dict[str, Any]:
        """Every parameter actually used, for report.json."""
        out: dict[str, Any] = {"engine": self.engine, "renumber_ids": self.renumber_ids}
        for t in iou_types:
            p = self.params(t)
            out[t] = {
                "iou_thrs": p.iou_thrs.tolist(),
                "max_dets": list(p.max_dets),
                "area_ranges": {
                    lbl: rng.tolist() for lbl, rng in zip(p.area_labels, p.area_rngs, strict=True)
                },
                "use_cats": p.use_cats,
            }
            if t == "segm":
                out[t]["segm_area"] = self.segm_area
        out["img_ids"] = list(self.img_ids) if self.img_ids is not None else "all"
        out["cat_ids"] = list(self.cat_ids) if self.cat_ids is not None else "all"
        return out


def _fields(p: EvalParams) -> dict[str, Any]:
    return {
        k: getattr(p, k) for k in ("iou_thrs", "rec_thrs", "max_dets", "area_rngs", "area_labels", "use_cats")
    }


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
