"""RoIAlign on the CPU: torchvision's kernel (NCHW fp32, after converting each map) against
cvserve's channels-last kernel (``cvserve.models.instance.nhwc_roi_align``).

Two measurements:

1. The pooling calls of one forward, captured from the served model (feature maps as the
   backbone leaves them: channels-last, bf16 under ``precision: auto`` where the CPU has
   native bf16), replayed through both kernels; the outputs are compared bit for bit.
2. The adapter's whole forward with each kernel, alternating rounds; detections (boxes,
   classes, scores, mask RLEs) compared. With the kernel the poolers make one call each
   (``cvserve.models.instance.pooler``; ``pooler_calls.py`` separates the two changes).

    .venv/bin/python benchmarks/roi_align_nhwc.py --model demo
    .venv/bin/python benchmarks/roi_align_nhwc.py --model r50 --min-size 800 --images 2
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import torch
from torchvision.ops import roi_align

from cvserve.models import compat

compat.apply()  # before detectron2's first import: the shims of cvserve.models.compat

from cvserve.models.instance import nhwc_roi_align, pooling_inputs  # noqa: E402
from cvserve.models.instance.roi_align import Fp32ROIAlign  # noqa: E402


def _capture(adapter, item) -> list[tuple[torch.Tensor, torch.Tensor, Fp32ROIAlign]]:
    calls = []
    original = Fp32ROIAlign.forward

    def record(self, input, rois):
        calls.append((input, rois.clone(), self))
        return original(self, input, rois)

    Fp32ROIAlign.forward = record
    try:
        with nhwc_roi_align.torchvision_only():  # the poolers call Fp32ROIAlign level by level
            adapter.forward([item])
    finally:
        Fp32ROIAlign.forward = original
    return calls


def _torchvision(calls) -> list[torch.Tensor]:
    with pooling_inputs.shared_pooling_inputs():  # each map converted once, as the adapter does
        return [
            roi_align(
                pooling_inputs.pooling_input(x, torch.contiguous_format),
                rois.float(),
                m.output_size,
                m.spatial_scale,
                m.sampling_ratio,
                m.aligned,
            )
            for x, rois, m in calls
        ]


def _nhwc(calls) -> list[torch.Tensor]:
    return [
        nhwc_roi_align.roi_align_nhwc(x, rois, m.output_size, m.spatial_scale, m.sampling_ratio, m.aligned)
        for x, rois, m in calls
    ]


def main() -> None:
    with _common.forward_session(__doc__) as (args, _, adapter, items):
        print(f"RoIAlign: {nhwc_roi_align.describe()}")

        captured = [_capture(adapter, item) for item in items]
        n_calls = sum(len(c) for c in captured)
        n_rois = sum(int(r.shape[0]) for c in captured for _, r, _ in c)
        first = captured[0][0][0]
        print(f"captured {n_calls} pooling calls, {n_rois} RoIs over {len(items)} images "
              f"(maps {first.dtype}, channels-last {first.is_contiguous(memory_format=torch.channels_last)})")  # fmt: skip
        equal = all(
            torch.equal(a, b) for c in captured for a, b in zip(_torchvision(c), _nhwc(c), strict=True)
        )
        print(f"outputs equal bit for bit: {equal}")
        pool_times: dict[str, list[float]] = {"torchvision": [], "nhwc": []}
        for _ in range(args.rounds):
            for name, run in (("torchvision", _torchvision), ("nhwc", _nhwc)):
                for calls in captured:
                    start = time.perf_counter()
                    run(calls)
                    pool_times[name].append(time.perf_counter() - start)
        for name, samples in pool_times.items():
            print(f"pooling of one image, {name}: median {1000 * statistics.median(samples):.2f} ms"
                  f" (map conversion included for torchvision)")  # fmt: skip

        variants = {"torchvision": nhwc_roi_align.torchvision_only, "nhwc": contextlib.nullcontext}
        _common.report_forwards(adapter, items, variants, args.rounds, "forward with {} RoIAlign")


if __name__ == "__main__":
    main()
