"""Build the COCO results file and its images/categories file from journal records."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cvserve.annotation.inputs import ImageEntry

__all__ = ["CategoryMap", "build_categories", "coco_documents"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CategoryMap:
    """COCO categories of the output and the model label -> COCO category id mapping."""

    categories: tuple[dict[str, Any], ...]
    label_to_id: Mapping[int, int]


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def build_categories(
    class_names: Sequence[str], coco_categories: Sequence[Mapping[str, Any]] | None
) -> CategoryMap:
    """Map model labels to COCO category ids.

    Without COCO categories, label ``i`` becomes category ``i + 1`` named after the
    class. With them, labels map by name (case, spaces and underscores ignored) and
    labels with no matching category are dropped from the results.

    Raises:
        ValueError: no model class matches any of the COCO categories.
    """
    if coco_categories is None:
        cats = tuple({"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(class_names))
        return CategoryMap(categories=cats, label_to_id={i: i + 1 for i in range(len(class_names))})
    by_name = {_norm(str(c["name"])): int(c["id"]) for c in coco_categories}
    mapping = {i: by_name[_norm(n)] for i, n in enumerate(class_names) if _norm(n) in by_name}
    if not mapping:
        raise ValueError(
            f"none of the model's classes ({', '.join(class_names)}) matches a category of the COCO json "
            f"({', '.join(str(c['name']) for c in coco_categories) or 'none'})"
        )
    unmatched = [n for i, n in enumerate(class_names) if i not in mapping]
    if unmatched:
        logger.warning("classes with no COCO category, left out of the results: %s", ", ".join(unmatched))
    return CategoryMap(categories=tuple(dict(c) for c in coco_categories), label_to_id=mapping)


def coco_documents(
    images: Sequence[ImageEntry],
    done: Mapping[str, Mapping[str, Any]],
    categories: CategoryMap,
    info: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The COCO results list and the ``images`` + ``categories`` document.

    Images come in job order, each annotated image exactly once; images without a
    record (failed, or not reached) are left out of both.

    Args:
        images: the job's images.
        done: the latest ``image`` journal record per path.
        categories: the category mapping.
        info: the images document's ``info`` block.

    Returns:
        ``(results, images_document)``.
    """
    results: list[dict[str, Any]] = []
    image_docs: list[dict[str, Any]] = []
    for entry in images:
        record = done.get(entry.path)
        if record is None:
            continue
        doc: dict[str, Any] = {
            "id": entry.image_id,
            "file_name": entry.rel,
            "height": record["height"],
            "width": record["width"],
        }
        if "labels_png" in record:
            doc["labels_file"] = record["labels_png"]
        image_docs.append(doc)
        for inst in record["instances"]:
            category_id = categories.label_to_id.get(int(inst["label"]))
            if category_id is None:
                continue
            result = {"image_id": entry.image_id, "category_id": category_id, "bbox": inst["bbox"]}
            result["score"] = inst["score"]
            if "segmentation" in inst:
                result["segmentation"] = inst["segmentation"]
            results.append(result)
    document = {"info": dict(info), "images": image_docs, "categories": list(categories.categories)}
    return results, document
