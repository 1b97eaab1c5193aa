"""A deterministic synthetic COCO-format dataset of textured shapes.

Each split is written as::

    <out>/<split>/images/000000.png        RGB images
    <out>/<split>/instances.json           COCO instances (RLE masks, crowd regions)
    <out>/<split>/semantic/000000.png      uint8 labels: 0 background, category id per
                                           object, 255 ignore (object borders, crowds)

Objects are shapes told apart by form only (all categories share colours and
textures) on gradient, noisy and cluttered backgrounds; later objects occlude earlier
ones and every mask is the visible part. Each image depends only on ``(seed, split,
index)``, so two runs give byte-identical files.

Command line::

    python -m models.data.synthetic OUT --seed 0 --train 500 --val 50 --test 100
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pycocotools.mask as mask_util

from cvserve.models.data.drawing import (
    CATEGORIES,
    draw_shape,
    random_background,
    random_colour,
    random_texture,
)

__all__ = ["CATEGORIES", "IGNORE_LABEL", "SplitPaths", "generate_dataset", "render_image"]

IGNORE_LABEL = 255
DEFAULT_SPLITS: Mapping[str, int] = {"train": 500, "val": 50, "test": 100}
_CROWD_ID = 254  # id-map value of crowd pixels; instance ids are 1..253
_MIN_VISIBLE = 0.7  # an occluded object keeps at least this fraction of its area
_MIN_CONTRAST = 90.0  # L1 distance (sum over RGB) between an object and what lies under it

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SplitPaths:
    """Where one generated split lives.

    Attributes:
        images: directory of the RGB PNG images.
        instances_json: the COCO instances file.
        semantic_labels: directory of the uint8 label PNGs (same stems as the images).
    """

    images: Path
    instances_json: Path
    semantic_labels: Path


@dataclass(frozen=True)
class _Object:
    category: int  # index into CATEGORIES
    mask: np.ndarray  # visible part, (H, W) bool
    iscrowd: bool


def _contrasting_fill(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    under = img[mask.astype(bool)].mean(axis=0)
    colour = random_colour(rng)
    for _ in range(20):
        if float(np.abs(colour - under).sum()) >= _MIN_CONTRAST:
            break
        colour = random_colour(rng)
    return random_texture(colour, mask.shape, rng)


def _place_object(
    img: np.ndarray, ids: np.ndarray, full_areas: dict[int, int], rng: np.random.Generator
) -> tuple[int, np.ndarray] | None:
    """Draws one object if a placement keeps every earlier object visible enough."""
    h, w = ids.shape
    scale = min(h, w) / 256
    category = int(rng.integers(0, len(CATEGORIES)))
    for _ in range(15):
        radius = float(rng.uniform(16, 46)) * scale
        center = (
            float(rng.uniform(0.6 * radius, w - 0.6 * radius)),
            float(rng.uniform(0.6 * radius, h - 0.6 * radius)),
        )
        mask = draw_shape(CATEGORIES[category], center, radius, (h, w), rng).astype(bool)
        if mask.sum() < 80 * scale * scale:
            continue
        covered = np.unique(ids[mask])
        if all(
            (ids == k).sum() - (ids[mask] == k).sum() >= _MIN_VISIBLE * full_areas[k]
            for k in covered
            if k not in (0, _CROWD_ID)
        ):
            img[mask] = _contrasting_fill(img, mask, rng)[mask]
            return category, mask
    return None


def _place_crowd(img: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> int:
    """A tight cluster of small shapes of one category, annotated as one crowd region."""
    h, w = ids.shape
    scale = min(h, w) / 256
    category = int(rng.integers(0, len(CATEGORIES)))
    cx, cy = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
    union = np.zeros((h, w), bool)
    for _ in range(rng.integers(5, 11)):
        center = (float(cx + rng.normal(0, 14 * scale)), float(cy + rng.normal(0, 14 * scale)))
        union |= draw_shape(CATEGORIES[category], center, float(rng.uniform(4, 7)) * scale, (h, w), rng) > 0
    img[union] = _contrasting_fill(img, union.astype(np.uint8), rng)[union]
    ids[union] = _CROWD_ID
    return category


def render_image(
    rng: np.random.Generator, size: tuple[int, int] = (256, 256)
) -> tuple[np.ndarray, list[_Object], np.ndarray]:
    """Render one image.

    Args:
        rng: the image's own random generator.
        size: ``(height, width)``.

    Returns:
        ``(image, objects, labels)``: the RGB uint8 image, its objects (visible masks,
        crowds included) and the uint8 semantic label map.
    """
    img = random_background(size, rng)
    ids = np.zeros(size, np.uint8)
    crowd_category = _place_crowd(img, ids, rng) if rng.random() < 0.12 else None
    placed: list[tuple[int, int]] = []  # (id, category)
    full_areas: dict[int, int] = {}
    for _ in range(rng.integers(2, 8)):
        result = _place_object(img, ids, full_areas, rng)
        if result is None:
            continue
        category, mask = result
        k = len(placed) + 1
        ids[mask] = k
        full_areas[k] = int(mask.sum())
        placed.append((k, category))
    if rng.random() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), 0)
    img = img + rng.normal(0, rng.uniform(0, 10), img.shape).astype(np.float32)
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)

    objects = [_Object(cat, ids == k, False) for k, cat in placed]
    labels = np.zeros(size, np.uint8)
    for obj in objects:
        labels[obj.mask] = obj.category + 1
    if crowd_category is not None and (ids == _CROWD_ID).any():
        objects.append(_Object(crowd_category, ids == _CROWD_ID, True))
        labels[ids == _CROWD_ID] = IGNORE_LABEL
    # Pixels where two regions meet are ambiguous after blur and noise: ignore them.
    kernel = np.ones((3, 3), np.uint8)
    labels[cv2.dilate(ids, kernel) != cv2.erode(ids, kernel)] = IGNORE_LABEL
    return image, objects, labels


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's crowd format: run lengths over the column-major mask, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def _annotation(obj: _Object, ann_id: int, image_id: int) -> dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
    segmentation: dict[str, Any] = (
        _uncompressed_rle(obj.mask)
        if obj.iscrowd
        else {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    )
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": obj.category + 1,
        "segmentation": segmentation,
        "area": int(mask_util.area(rle)),
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "iscrowd": int(obj.iscrowd),
    }


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _write_png(path: Path, array: np.ndarray) -> None:
    # Fast compression: noisy images barely shrink at higher levels.
    if not cv2.imwrite(str(path), array, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"cannot write {path}")


def _generate_split(
    root: Path, split: str, count: int, seed: int, size: tuple[int, int], progress: ProgressFn | None
) -> SplitPaths:
    paths = SplitPaths(root / split / "images", root / split / "instances.json", root / split / "semantic")
    paths.images.mkdir(parents=True, exist_ok=True)
    paths.semantic_labels.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        image, objects, labels = render_image(_image_rng(seed, split, index), size)
        name = f"{index:06d}.png"
        _write_png(paths.images / name, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        _write_png(paths.semantic_labels / name, labels)
        images.append({"id": index + 1, "file_name": name, "height": size[0], "width": size[1]})
        for obj in objects:
            annotations.append(_annotation(obj, len(annotations) + 1, index + 1))
        if progress is not None:
            progress(split, index + 1, count)
    coco = {
        "info": {"description": f"cvserve synthetic shapes, split {split}, seed {seed}", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)],
    }
    tmp = paths.instances_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(coco, separators=(",", ":")), encoding="utf-8")
    tmp.replace(paths.instances_json)
    return paths


def generate_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    splits: Mapping[str, int] = DEFAULT_SPLITS,
    image_size: tuple[int, int] = (256, 256),
    progress: ProgressFn | None = None,
) -> dict[str, SplitPaths]:
    """Write the synthetic dataset.

    Args:
        out_dir: root directory; one sub-directory per split.
        seed: the dataset seed; the same seed gives byte-identical files.
        splits: image count per split name.
        image_size: ``(height, width)`` of every image, each at least 64.
        progress: called as ``progress(split, done, total)`` after each image.

    Returns:
        The paths of each split.

    Raises:
        ValueError: a negative count, a bad split name or an image size below 64.
    """
    if len(image_size) != 2 or min(image_size) < 64:
        raise ValueError(f"image_size must be (height, width) with both >= 64, got {image_size!r}")
    for name, count in splits.items():
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid split name {name!r}")
        if count < 0:
            raise ValueError(f"split {name!r}: image count must be >= 0, got {count}")
    root = Path(out_dir)
    size = (int(image_size[0]), int(image_size[1]))
    return {name: _generate_split(root, name, int(n), seed, size, progress) for name, n in splits.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.data.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    for split, default in DEFAULT_SPLITS.items():
        parser.add_argument(
            f"--{split}", type=int, default=default, help=f"{split} images (default {default})"
        )
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    args = parser.parse_args(argv)

    def report(split: str, done: int, total: int) -> None:
        if done == total or done % 200 == 0:
            print(f"{split}: {done}/{total}", file=sys.stderr)

    splits = {name: getattr(args, name) for name in DEFAULT_SPLITS}
    try:
        paths = generate_dataset(
            args.out, seed=args.seed, splits=splits, image_size=tuple(args.size), progress=report
        )
    except ValueError as e:
        parser.error(str(e))
    for name, p in paths.items():
        print(f"{name}: {p.instances_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
