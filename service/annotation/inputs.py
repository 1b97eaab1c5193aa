"""Expand annotation inputs into an ordered, de-duplicated list of images.

An input is a folder (searched recursively), a glob pattern, an image file, a text file
listing one path per line, or a COCO json whose ``images`` give ids and file names.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["IMAGE_SUFFIXES", "ImageEntry", "ImageSet", "InputError", "collect_images"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
_GLOB_CHARS = frozenset("*?[")


class InputError(ValueError):
    """An annotation input does not exist or cannot be read; the message names it."""


@dataclass(frozen=True)
class ImageEntry:
    """One image to annotate.

    Attributes:
        path: absolute path, the key of the image in the journal.
        rel: path relative to the image root, used as COCO ``file_name`` and to name
            overlay and label files.
        image_id: COCO image id.
    """

    path: str
    rel: str
    image_id: int


@dataclass(frozen=True)
class ImageSet:
    """The images of a job and, for a COCO json input, its categories and root."""

    images: tuple[ImageEntry, ...]
    root: str
    coco_categories: tuple[dict[str, Any], ...] | None = None


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES


def _walk(folder: str) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if _is_image(f) and not f.startswith("."))
    return sorted(found)


def _read_list(list_file: str) -> list[str]:
    base = os.path.dirname(list_file)
    try:
        with open(list_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{list_file}: cannot read list of image paths: {e}") from None
    return [os.path.join(base, line) for line in lines if line and not line.startswith("#")]


def _expand(item: str) -> list[str]:
    """Image paths (not yet absolute) for one non-COCO input, in a stable order."""
    if os.path.isdir(item):
        return _walk(item)
    if os.path.isfile(item):
        return [item] if _is_image(item) else _read_list(item)
    if _GLOB_CHARS & set(item):
        matches = sorted(glob.glob(item, recursive=True))
        paths = []
        for m in matches:
            paths.extend(_walk(m) if os.path.isdir(m) else [m] if _is_image(m) else [])
        if not paths:
            raise InputError(f"{item}: the pattern matches no image files")
        return paths
    raise InputError(f"{item}: no such file or folder")


def _load_coco(path: str, image_root: str | None) -> ImageSet:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read COCO json: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path}: not a COCO json: needs an 'images' list")
    root = os.path.abspath(image_root if image_root else os.path.dirname(path))
    entries: list[ImageEntry] = []
    seen_ids: set[int] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
            raise InputError(f"{path}: images[{i}].file_name: required, must be a string")
        image_id = img.get("id")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise InputError(f"{path}: images[{i}].id: required, must be an integer")
        if image_id in seen_ids:
            raise InputError(f"{path}: images[{i}].id: duplicate image id {image_id}")
        seen_ids.add(image_id)
        full = os.path.normpath(os.path.join(root, img["file_name"]))
        entries.append(ImageEntry(path=full, rel=img["file_name"], image_id=image_id))
    categories = data.get("categories") or []
    if not isinstance(categories, list) or not all(
        isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str)
        for c in categories
    ):
        raise InputError(f"{path}: categories: each needs an integer 'id' and a string 'name'")
    return ImageSet(images=tuple(entries), root=root, coco_categories=tuple(categories))


def _is_coco_json(item: str) -> bool:
    return os.path.isfile(item) and item.lower().endswith(".json")


def collect_images(inputs: Sequence[str], image_root: str | None = None) -> ImageSet:
    """Expand inputs into the images of a job.

    Without a COCO json, image ids are 1..N in input order (each folder or glob sorted),
    so the same inputs always give the same ids; duplicates are kept once.

    Args:
        inputs: folders, globs, image files, text files of paths, or one COCO json.
        image_root: folder the COCO json's ``file_name`` values are relative to
            (default: the json's folder). Only valid with a COCO json.

    Raises:
        InputError: an input is missing or unreadable, a COCO json is mixed with other
            inputs, or no image was found.
    """
    if not inputs:
        raise InputError("no inputs given")
    coco = [item for item in inputs if _is_coco_json(item)]
    if coco:
        if len(inputs) != 1:
            raise InputError(
                f"{coco[0]}: a COCO json must be the only input (its ids would clash with others)"
            )
        image_set = _load_coco(coco[0], image_root)
    else:
        if image_root:
            raise InputError("--image-root only applies to a COCO json input")
        paths: dict[str, None] = {}
        for item in inputs:
            for p in _expand(item):
                paths.setdefault(os.path.abspath(p), None)
        ordered = list(paths)
        root = os.path.commonpath([os.path.dirname(p) for p in ordered]) if ordered else os.getcwd()
        entries = tuple(
            ImageEntry(path=p, rel=Path(os.path.relpath(p, root)).as_posix(), image_id=i)
            for i, p in enumerate(ordered, start=1)
        )
        image_set = ImageSet(images=entries, root=root)
    if not image_set.images:
        raise InputError(f"no images found in {', '.join(inputs)}")
    return image_set
