"""Pooling level by level (detectron2's ``ROIPooler``) against one kernel call per pooler.

The adapter's forward in process, three ways, rounds alternating:

- ``level by level``: detectron2's ``ROIPooler.forward`` (zeroed output; per level
  ``nonzero``, indexing, the channels-last kernel in fp32, a cast to the features' dtype,
  ``index_put_``), the kernel on the calling thread;
- ``one call``: ``NhwcROIPooler`` (``cvserve.models.instance.pooler``): all levels in one
  kernel call writing the features' dtype, on the calling thread;
- ``one call, team``: the same with the boxes spread over the pass's OpenMP team (served).

Prints whether the detections are equal, each way's median forward and the time inside
the model's poolers per image.

    .venv/bin/python benchmarks/pooler_calls.py --model demo --rounds 6
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

from cvserve.models import compat

compat.apply()  # before detectron2's first import: the shims of cvserve.models.compat

from detectron2.modeling.poolers import ROIPooler  # noqa: E402

from cvserve.models.instance import nhwc_roi_align  # noqa: E402
from cvserve.models.instance.pooler import NhwcROIPooler  # noqa: E402


def _variants(model: Any) -> dict[str, Any]:
    poolers = [m for m in model.modules() if isinstance(m, NhwcROIPooler)]

    @contextlib.contextmanager
    def level_by_level() -> Iterator[None]:
        for p in poolers:
            p.__class__ = ROIPooler
        try:
            with nhwc_roi_align.one_thread():
                yield
        finally:
            for p in poolers:
                p.__class__ = NhwcROIPooler

    return {
        "level by level": level_by_level,
        "one call": nhwc_roi_align.one_thread,
        "one call, team": contextlib.nullcontext,
    }


def _pooling_ms(adapter: Any, items: list[Any], context: Any) -> float:
    """Milliseconds per image inside the model's poolers (their forward, Python included)."""
    spent = [0.0]
    originals = {cls: cls.forward for cls in (ROIPooler, NhwcROIPooler)}

    def timed(cls: type) -> Any:
        def forward(self: Any, x: Any, box_lists: Any) -> Any:
            start = time.perf_counter()
            try:
                return originals[cls](self, x, box_lists)
            finally:
                if type(self) is cls:  # NhwcROIPooler falling back calls ROIPooler's: count once
                    spent[0] += time.perf_counter() - start

        return forward

    for cls in originals:
        cls.forward = timed(cls)
    try:
        with context():
            for item in items:
                adapter.forward([item])
    finally:
        for cls, forward in originals.items():
            cls.forward = forward
    return 1000 * spent[0] / len(items)


def main() -> None:
    with _common.forward_session(__doc__) as (args, _, adapter, items):
        print(f"RoIAlign: {nhwc_roi_align.describe()}")
        variants = _variants(adapter._model)
        _common.report_forwards(adapter, items, variants, args.rounds, "forward, pooling {}")
        pooling: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, context in variants.items():
                pooling[name].append(_pooling_ms(adapter, items, context))
        for name, samples in pooling.items():
            print(f"time in the poolers, {name}: median {statistics.median(samples):.2f} ms per image")


if __name__ == "__main__":
    main()
