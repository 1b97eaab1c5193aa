"""Register datasets with detectron2 and derive semantic labels from COCO instances.

Registration is idempotent: registering a name again with the same arguments is a
no-op, with different arguments a ``ValueError`` (detectron2 itself raises on any
second registration, which breaks notebooks and repeated CLI calls in one process).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# isort: split

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg, register_coco_instances

from cvserve.models.data.synthetic import SplitPaths

__all__ = ["coco_category_names", "coco_to_semantic_labels", "register_coco_split", "register_semantic_split"]

logger = logging.getLogger(__name__)


def _read_coco(instances_json: str | Path) -> dict[str, Any]:
    path = Path(instances_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read COCO instances file: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise ValueError(f"{path}: not a COCO instances file (no 'categories' list)")
    return data


def coco_category_names(instances_json: str | Path) -> tuple[str, ...]:
    """Category names of a COCO file in ascending category-id order (detectron2's contiguous order)."""
    cats = sorted(_read_coco(instances_json)["categories"], key=lambda c: c["id"])
    return tuple(str(c["name"]) for c in cats)


def _already_registered(name: str, expected: dict[str, Any]) -> bool:
    """True if ``name`` exists with the same metadata; raises if it exists with other metadata."""
    if name not in DatasetCatalog.list():
        return False
    meta = MetadataCatalog.get(name).as_dict()
    differing = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if differing:
        raise ValueError(f"dataset {name!r} is already registered with different settings: {differing}")
    return True


def split_name(role: str, *identity: object) -> str:
    """A catalog name for a split from what identifies it (paths, classes): stable, collision-free.

    detectron2's catalogs are process-global; one name per distinct split keeps repeated
    runs with other files apart, and the same files map to the same name.
    """
    digest = hashlib.sha1(repr(tuple(str(x) for x in identity)).encode()).hexdigest()[:10]
    return f"cvserve_{role}_{digest}"


def register_coco_split(name: str, split: SplitPaths) -> None:
    """Register a COCO instances split (e.g. one written by :func:`generate_dataset`).

    Sets ``thing_classes`` right away (detectron2 would only set it when the dataset
    is first loaded, too late for evaluators and model heads built before that).

    Args:
        name: dataset name, e.g. ``shapes_train``.
        split: the split's paths; only ``images`` and ``instances_json`` are used.

    Raises:
        ValueError: the JSON is unreadable, or ``name`` is registered with other files.
    """
    json_file, image_root = str(Path(split.instances_json).resolve()), str(Path(split.images).resolve())
    classes = list(coco_category_names(json_file))
    if _already_registered(
        name, {"json_file": json_file, "image_root": image_root, "thing_classes": classes}
    ):
        return
    register_coco_instances(name, {}, json_file, image_root)
    MetadataCatalog.get(name).set(thing_classes=classes)
    logger.debug("registered COCO dataset %s (%d classes) from %s", name, len(classes), json_file)


def register_semantic_split(
    name: str,
    image_dir: str | Path,
    label_dir: str | Path,
    class_names: Sequence[str],
    ignore_label: int = 255,
    *,
    image_ext: str = "png",
) -> None:
    """Register a semantic segmentation split of images and same-stem label PNGs.

    Args:
        name: dataset name.
        image_dir: directory of the images.
        label_dir: directory of uint8 label PNGs; label value = index into ``class_names``.
        class_names: names of the label values (``stuff_classes``), background included.
        ignore_label: label value excluded from training loss and evaluation.
        image_ext: extension of the images.

    Raises:
        ValueError: a directory is missing, or ``name`` is registered with other settings.
    """
    image_root, label_root = str(Path(image_dir).resolve()), str(Path(label_dir).resolve())
    for what, d in (("image_dir", image_root), ("label_dir", label_root)):
        if not Path(d).is_dir():
            raise ValueError(f"{what}: {d} is not a directory")
    expected = {
        "image_root": image_root,
        "sem_seg_root": label_root,
        "stuff_classes": list(class_names),
        "ignore_label": int(ignore_label),
        "evaluator_type": "sem_seg",
    }
    if _already_registered(name, expected):
        return
    DatasetCatalog.register(
        name, lambda: load_sem_seg(label_root, image_root, gt_ext="png", image_ext=image_ext)
    )
    MetadataCatalog.get(name).set(**expected)


def _annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    segm = ann["segmentation"]
    if isinstance(segm, list):  # polygons
        rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):  # uncompressed RLE
        rle = mask_util.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_util.decode(rle).astype(bool)


def coco_to_semantic_labels(
    instances_json: str | Path, out_dir: str | Path, *, ignore_label: int = 255
) -> Path:
    """Write one uint8 label PNG per image of a COCO instances file.

    Label 0 is background, ``i + 1`` the ``i``-th category in ascending id order,
    ``ignore_label`` crowd regions. Larger objects are painted first so a smaller one
    lying on top stays visible where masks overlap.

    Args:
        instances_json: COCO instances file.
        out_dir: where the PNGs go, named like the images with a ``.png`` suffix.
        ignore_label: value of crowd pixels.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: the JSON is unreadable or not COCO instances.
    """
    data = _read_coco(instances_json)
    label_of = {c["id"]: i + 1 for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for img in data.get("images", []):
        h, w = int(img["height"]), int(img["width"])
        labels = np.zeros((h, w), np.uint8)
        anns = sorted(by_image.get(img["id"], []), key=lambda a: -float(a.get("area", 0)))
        for ann in anns:
            if ann.get("iscrowd", 0):
                continue
            labels[_annotation_mask(ann, h, w)] = label_of[ann["category_id"]]
        for ann in anns:
            if ann.get("iscrowd", 0):
                labels[_annotation_mask(ann, h, w)] = ignore_label
        target = out / (Path(img["file_name"]).stem + ".png")
        if not cv2.imwrite(str(target), labels):
            raise OSError(f"cannot write {target}")
    return out
