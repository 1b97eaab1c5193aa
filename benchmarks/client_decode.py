#!/usr/bin/env python3
"""The client's numpy PNG decoder and RLE encoder against Pillow and pycocotools.

Times decoding a label map PNG written by the server (``encode_label_map``) and a 1-bit
mask PNG, and encoding that mask as COCO RLE, with the client's numpy code and with the
libraries the full distribution uses. Rounds alternate between the two sides so drift of
the machine's speed hits both alike. Prints the median milliseconds per call, the PNG
filter types of each image and the load average.

Usage: python benchmarks/client_decode.py [--rounds N] [--size HxW]
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import statistics
import time
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from cvserve.client.png import decode_png
from cvserve.client.rle import encode_mask
from cvserve.imaging import encode_label_map, encode_png


def label_map(height: int, width: int) -> np.ndarray:
    """Discs and rectangles of 12 classes with noisy borders, as a segmenter's output looks."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width]
    labels = np.zeros((height, width), np.int64)
    for label in range(1, 13):
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(height // 10, height // 3)
        wobble = rng.integers(-3, 4, (height, width))
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < (r + wobble) ** 2] = label
    return labels


def filter_types(data: bytes, rowbytes: int) -> dict[int, int]:
    """How many rows use each PNG filter type."""
    idat, pos = b"", 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return dict(sorted(collections.Counter(zlib.decompress(idat)[:: rowbytes + 1]).items()))


def median_ms(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():  # alternate sides within each round
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--size", default="1080x1920", help="HxW of the images")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    labels = label_map(height, width)
    label_png = encode_label_map(labels)
    mask = labels == 3
    mask_png = encode_png(mask)
    assert (decode_png(label_png) == labels).all() and (decode_png(mask_png) == mask).all()
    print(f"{height}x{width}, {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}")
    print(f"label map filter types (type: rows): {filter_types(label_png, width)}")
    print(f"mask filter types (type: rows): {filter_types(mask_png, (width + 7) // 8)}")
    cases = {
        "label map PNG decode": {
            "numpy": lambda: decode_png(label_png),
            "Pillow": lambda: np.asarray(Image.open(io.BytesIO(label_png))),
        },
        "mask PNG decode": {
            "numpy": lambda: decode_png(mask_png),
            "Pillow": lambda: np.asarray(Image.open(io.BytesIO(mask_png)), dtype=bool),
        },
        "mask RLE encode": {
            "numpy": lambda: encode_mask(mask),
            "pycocotools": lambda: mask_util.encode(np.asfortranarray(mask.astype(np.uint8))),
        },
    }
    print(f"{'':24} {'numpy ms':>10} {'library ms':>11}")
    for case, calls in cases.items():
        ours, theirs = median_ms(calls, args.rounds).values()
        print(f"{case:24} {ours:10.1f} {theirs:11.1f}")


if __name__ == "__main__":
    main()
