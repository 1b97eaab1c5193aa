"""Reading and validating COCO ground truth and results into flat numpy arrays.

Every problem raises :class:`EvaluationInputError` naming the file, the entry (index
and, for annotations, id) and the field, so a malformed file never surfaces as a
traceback from inside pycocotools or numpy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cvserve.models.evaluation.checks import BOX_HELP, box_ok, finite, is_int, load_json
from cvserve.models.evaluation.errors import EvaluationInputError, describe

__all__ = ["Detections", "GroundTruth", "load_json", "parse_ground_truth", "parse_results"]

IOU_TYPES = ("bbox", "segm", "keypoints")
_TYPE_FIELD = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}


@dataclass
class GroundTruth:
    """Validated COCO ground truth as flat arrays (annotations in file order).

    Attributes:
        source: file name (or ``<ground truth>``) for messages.
        data: the parsed JSON object.
        image_ids: image ids, ascending; ``img`` arrays index into it.
        cat_ids: category ids, ascending; ``cat`` arrays index into it.
        cat_names: category names, by index.
    """

    source: str
    data: dict[str, Any]
    image_ids: np.ndarray
    image_index: dict[int, int]
    heights: np.ndarray
    widths: np.ndarray
    file_names: list[str | None]
    cat_ids: np.ndarray
    cat_index: dict[int, int]
    cat_names: list[str]
    anns: list[dict[str, Any]]
    img: np.ndarray
    cat: np.ndarray
    area: np.ndarray
    crowd: np.ndarray
    bbox: np.ndarray
    cache: dict[str, Any] = field(default_factory=dict)

    def where(self, i: int) -> str:
        return f"{self.source}: annotations[{i}] (id {self.anns[i].get('id')!r})"


def _section(data: dict[str, Any], key: str, source: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise EvaluationInputError(f"{source}: field '{key}': expected a list, got {describe(value)}")
    return value


def _parse_images(
    images: list[Any], source: str
) -> tuple[np.ndarray, dict[int, int], np.ndarray, np.ndarray, list]:
    ids, heights, widths, names = [], [], [], []
    for i, im in enumerate(images):
        where = f"{source}: images[{i}]"
        if type(im) is not dict:
            raise EvaluationInputError(f"{where}: expected an object, got {describe(im)}")
        if not is_int(im.get("id")):
            raise EvaluationInputError(
                f"{where}: field 'id': expected an integer, got {describe(im.get('id'))}"
            )
        for key in ("height", "width"):
            if key in im and not (is_int(im[key]) and im[key] > 0):
                raise EvaluationInputError(
                    f"{where}: field '{key}': expected a positive integer, got {describe(im[key])}"
                )
        ids.append(im["id"])
        heights.append(im.get("height", -1))
        widths.append(im.get("width", -1))
        names.append(im.get("file_name"))
    order = np.argsort(np.asarray(ids, np.int64), kind="stable")
    image_ids = np.asarray(ids, np.int64)[order]
    if len(image_ids) > 1 and (dup := image_ids[1:][image_ids[1:] == image_ids[:-1]]).size:
        raise EvaluationInputError(f"{source}: images: duplicate image id {int(dup[0])}")
    index = {int(v): k for k, v in enumerate(image_ids.tolist())}
    return (
        image_ids,
        index,
        np.asarray(heights)[order],
        np.asarray(widths)[order],
        [names[j] for j in order],
    )


def _parse_categories(cats: list[Any], source: str) -> tuple[np.ndarray, dict[int, int], list[str]]:
    by_id: dict[int, str] = {}
    for i, c in enumerate(cats):
        where = f"{source}: categories[{i}]"
        if type(c) is not dict:
            raise EvaluationInputError(f"{where}: expected an object, got {describe(c)}")
        if not is_int(c.get("id")):
            raise EvaluationInputError(
                f"{where}: field 'id': expected an integer, got {describe(c.get('id'))}"
            )
        if not isinstance(c.get("name"), str):
            raise EvaluationInputError(
                f"{where}: field 'name': expected a string, got {describe(c.get('name'))}"
            )
        if c["id"] in by_id:
            raise EvaluationInputError(f"{where}: field 'id': duplicate category id {c['id']}")
        by_id[c["id"]] = c["name"]
    cat_ids = np.asarray(sorted(by_id), np.int64)
    return cat_ids, {int(v): k for k, v in enumerate(cat_ids.tolist())}, [by_id[int(v)] for v in cat_ids]


def _check_annotation(
    a: Any, where: str, image_index: dict[int, int], cat_index: dict[int, int], seen: set[int]
) -> None:
    """Validate one ground-truth annotation; ``seen`` collects the ids so far."""
    if type(a) is not dict:
        raise EvaluationInputError(f"{where}: expected an object, got {describe(a)}")
    if not is_int(a.get("id")) or a["id"] in seen:  # type check first: lists are unhashable
        what = "duplicate id" if is_int(a.get("id")) else "expected an integer, got"
        raise EvaluationInputError(f"{where}: field 'id': {what} {describe(a.get('id'))}")
    seen.add(a["id"])
    where = f"{where} (id {a['id']})"
    if not is_int(a.get("image_id")) or a["image_id"] not in image_index:
        raise EvaluationInputError(
            f"{where}: field 'image_id': {describe(a.get('image_id'))} is not an id in 'images'"
        )
    if not is_int(a.get("category_id")) or a["category_id"] not in cat_index:
        raise EvaluationInputError(
            f"{where}: field 'category_id': {describe(a.get('category_id'))} is not an id in 'categories'"
        )
    if not box_ok(a.get("bbox")):
        raise EvaluationInputError(f"{where}: field 'bbox': {BOX_HELP}, got {describe(a.get('bbox'))}")
    if not (finite(a.get("area")) and a["area"] >= 0):
        raise EvaluationInputError(
            f"{where}: field 'area': expected a finite number >= 0, got {describe(a.get('area'))}"
        )
    if a.get("iscrowd", 0) not in (0, 1):
        raise EvaluationInputError(
            f"{where}: field 'iscrowd': expected 0 or 1, got {describe(a.get('iscrowd'))}"
        )


def parse_ground_truth(source: str | os.PathLike[str] | dict[str, Any]) -> GroundTruth:
    """Load and validate COCO ground truth (a path or an already parsed dict).

    Raises:
        EvaluationInputError: naming the file, entry and field that is wrong.
    """
    data, name = load_json(source, "ground truth")
    if type(data) is not dict:
        raise EvaluationInputError(f"{name}: expected a COCO ground-truth object, got {describe(data)}")
    image_ids, image_index, heights, widths, names = _parse_images(_section(data, "images", name), name)
    cat_ids, cat_index, cat_names = _parse_categories(_section(data, "categories", name), name)
    anns = _section(data, "annotations", name)
    img, cat, area, crowd, boxes = [], [], [], [], []
    seen: set[int] = set()
    for i, a in enumerate(anns):
        _check_annotation(a, f"{name}: annotations[{i}]", image_index, cat_index, seen)
        img.append(image_index[a["image_id"]])
        cat.append(cat_index[a["category_id"]])
        area.append(a["area"])
        crowd.append(bool(a.get("iscrowd", 0)))
        boxes.append(a["bbox"])
    return GroundTruth(
        source=name, data=data, image_ids=image_ids, image_index=image_index, heights=heights,
        widths=widths, file_names=names, cat_ids=cat_ids, cat_index=cat_index, cat_names=cat_names,
        anns=anns, img=np.asarray(img, np.int64), cat=np.asarray(cat, np.int64),
        area=np.asarray(area, np.float64), crowd=np.asarray(crowd, bool),
        bbox=np.asarray(boxes, np.float64).reshape(-1, 4),
    )  # fmt: skip


@dataclass
class Detections:
    """Validated COCO results as flat arrays (file order).

    Attributes:
        source: file name (or ``<results>``) for messages.
        entries: the parsed result entries.
        iou_types: the IoU types these results can be evaluated for.
    """

    source: str
    entries: list[dict[str, Any]]
    iou_types: tuple[str, ...]
    img: np.ndarray
    cat: np.ndarray
    score: np.ndarray
    bbox: np.ndarray | None
    cache: dict[str, Any] = field(default_factory=dict)


def _infer_types(entries: list[Any]) -> tuple[str, ...]:
    if not entries or type(entries[0]) is not dict:
        return ("bbox",)
    found = tuple(t for t in IOU_TYPES if _TYPE_FIELD[t] in entries[0])
    # A keypoint detector's boxes only give the keypoint detections their area.
    return ("keypoints",) if "keypoints" in found else (found or ("bbox",))


def _check_result(r: Any, where: str, gt: GroundTruth, types: tuple[str, ...]) -> None:
    """Validate one results entry for the IoU types to evaluate."""
    if type(r) is not dict:
        raise EvaluationInputError(f"{where}: expected an object, got {describe(r)}")
    if not is_int(r.get("image_id")) or r["image_id"] not in gt.image_index:
        raise EvaluationInputError(
            f"{where}: field 'image_id': {describe(r.get('image_id'))} is not an image id of {gt.source}"
        )
    if not is_int(r.get("category_id")) or r["category_id"] not in gt.cat_index:
        raise EvaluationInputError(
            f"{where}: field 'category_id': {describe(r.get('category_id'))} is not a category id of {gt.source}"
        )
    if not finite(r.get("score")):
        raise EvaluationInputError(
            f"{where}: field 'score': expected a finite number, got {describe(r.get('score'))}"
        )
    for t in types:
        if _TYPE_FIELD[t] not in r:
            raise EvaluationInputError(
                f"{where}: field '{_TYPE_FIELD[t]}' is missing (needed for {t} evaluation)"
            )
    if "bbox" in types and not box_ok(r["bbox"]):
        raise EvaluationInputError(f"{where}: field 'bbox': {BOX_HELP}, got {describe(r['bbox'])}")


def parse_results(
    source: str | os.PathLike[str] | list[Any], gt: GroundTruth, iou_types: tuple[str, ...] | None = None
) -> Detections:
    """Load and validate a COCO results list against ``gt``.

    Args:
        source: a path or an already parsed list.
        gt: the ground truth the results refer to.
        iou_types: types to evaluate; ``None`` means every type the first entry has.

    Raises:
        EvaluationInputError: naming the file, entry index and field that is wrong.
    """
    entries, name = load_json(source, "results")
    if type(entries) is not list:
        raise EvaluationInputError(f"{name}: expected a JSON list of detections, got {describe(entries, 40)}")
    types = tuple(iou_types) if iou_types else _infer_types(entries)
    unknown = [t for t in types if t not in IOU_TYPES]
    if unknown:
        raise EvaluationInputError(f"unknown IoU type {unknown[0]!r} (choose from {', '.join(IOU_TYPES)})")
    need_box = "bbox" in types
    img, cat, score, boxes = [], [], [], []
    for i, r in enumerate(entries):
        _check_result(r, f"{name}: entry {i}", gt, types)
        img.append(gt.image_index[r["image_id"]])
        cat.append(gt.cat_index[r["category_id"]])
        score.append(r["score"])
        if need_box:
            boxes.append(r["bbox"])
    return Detections(
        source=name,
        entries=entries,
        iou_types=types,
        img=np.asarray(img, np.int64),
        cat=np.asarray(cat, np.int64),
        score=np.asarray(score, np.float64),
        bbox=np.asarray(boxes, np.float64).reshape(-1, 4) if need_box else None,
    )
