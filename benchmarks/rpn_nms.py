"""The RPN's test-time NMS: detectron2's (every candidate) against cvserve's (stops at post_nms_topk).

``cvserve.models.instance.proposals`` runs each level's NMS over a growing prefix of its
candidates and stops once the level has kept ``POST_NMS_TOPK_TEST`` boxes; the proposals are
the same, and each level's candidates come from ``topk`` rather than a full sort where
that takes the same anchors. The levels' NMS runs in a C kernel (``_nms.c``: torchvision's
arithmetic, stopping at ``POST_NMS_TOPK_TEST`` kept boxes, the levels over the pass's OpenMP
threads), or in torchvision's ``nms`` over growing prefixes where that is not built. This
loads the instance adapter (the demo detector by default), then times its forward with the
RPN's own selection, with cvserve's on torchvision's nms and with cvserve's on the kernel,
alternating, and checks that every output is equal.

    .venv/bin/python benchmarks/rpn_nms.py --model demo
    .venv/bin/python benchmarks/rpn_nms.py --model r50 --min-size 800 --images 2
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

from cvserve.models import compat

compat.apply()  # before detectron2's first import: the shims of cvserve.models.compat

from cvserve.models.instance import proposals  # noqa: E402


def main() -> None:
    with _common.forward_session(__doc__) as (args, _, adapter, items):
        rpn = adapter._model.proposal_generator
        ours = rpn.predict_proposals  # the instance's method, set at load
        print(f"RPN: pre_nms_topk {rpn.pre_nms_topk[False]}, post_nms_topk {rpn.post_nms_topk[False]}")

        def selection(use: Callable[[], object]) -> Callable[[], contextlib.AbstractContextManager[None]]:
            return lambda: (use(), contextlib.nullcontext())[1]

        kernel = proposals._nms

        def cvserve(nms: object) -> Callable[[], contextlib.AbstractContextManager[None]]:
            return selection(
                lambda: (setattr(rpn, "predict_proposals", ours), setattr(proposals, "_nms", nms))
            )

        variants = {
            "detectron2's selection": selection(lambda: vars(rpn).pop("predict_proposals", None)),
            "cvserve's selection, torchvision's nms": cvserve(None),
            "cvserve's selection, NMS kernel": cvserve(kernel),
        }
        _common.report_forwards(adapter, items, variants, args.rounds, "forward, {}")
        for name in list(variants)[1:]:
            with variants[name]():
                ms = [_nms_ms(adapter, items) for _ in range(args.rounds)]
            print(f"time in batched_nms_first, {name}: median {statistics.median(ms):.2f} ms per image")
        proposals._nms = kernel


def _nms_ms(adapter: Any, items: list[Any]) -> float:
    """Milliseconds per image inside the RPN's ``batched_nms_first`` over one forward per item."""
    spent = [0.0]
    original = proposals.batched_nms_first

    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args)
        finally:
            spent[0] += time.perf_counter() - start

    proposals.batched_nms_first = timed
    try:
        for item in items:
            adapter.forward([item])
    finally:
        proposals.batched_nms_first = original
    return 1000 * spent[0] / len(items)


if __name__ == "__main__":
    main()
