"""RoIAlign's input: a channels-last bf16 map to NCHW fp32 in one pass, or in blocks of pixel rows.

torchvision's CPU ``roi_align`` reads NCHW fp32, so each forward converts the served
backbone's channels-last bf16 maps once (``cvserve.models.instance.pooling_inputs``). Maps of
at least ``_BLOCKED_MIN`` elements are copied in blocks. This prints, in alternating rounds:

1. the conversion alone, for R50-FPN's stride-4 and stride-8 maps at 800 px (256 channels,
   200x304 and 100x152) and the demo detector's stride-4 map (32 channels, 64x86);
2. with ``--forward``, the R50-FPN Mask R-CNN bf16 forward at 800 px (random weights) with
   each conversion, pooling with torchvision's kernel (``torchvision_only``: the served
   channels-last kernel reads the maps without converting them).

    .venv/bin/python benchmarks/pooling_input.py --forward
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common


def _median_ms(samples: list[float]) -> str:
    return f"{1000 * statistics.median(samples):.1f}"


def _conversions(rounds: int) -> None:
    import torch

    from cvserve.models.instance import pooling_inputs

    print("\n| map (C x H x W) | one pass | blocks | equal |")
    print("|---|---|---|---|")
    for shape in ((256, 200, 304), (256, 100, 152), (32, 64, 86)):
        x = torch.randn(1, *shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        ways: dict[str, Callable[[], torch.Tensor]] = {
            "one pass": lambda x=x: x.to(torch.float32, memory_format=torch.contiguous_format),
            "blocks": lambda x=x: pooling_inputs._convert(x, torch.float32, torch.contiguous_format),
        }
        equal = torch.equal(ways["one pass"](), ways["blocks"]())
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(rounds):
            for name, way in ways.items():
                start = time.perf_counter()
                way()
                times[name].append(time.perf_counter() - start)
        blocked = "" if x.numel() >= pooling_inputs._BLOCKED_MIN else " (below the threshold: one pass)"
        print(f"| {' x '.join(map(str, shape))} | {_median_ms(times['one pass'])} ms | "
              f"{_median_ms(times['blocks'])} ms{blocked} | {equal} |")  # fmt: skip


def _forward(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="cvserve-pooling-") as tmp:
        model = _common.with_min_size(_common.prepare_model("r50", Path(tmp)), 800)
        adapter = _common.instance_adapter(model, "auto")
        from cvserve.models.instance import nhwc_roi_align, pooling_inputs

        image = _common.make_images(1, 427, 640, shapes=True)[0]
        item = adapter.prepare(image, masks=True)
        limits = {"one pass": 1 << 62, "blocks": pooling_inputs._BLOCKED_MIN}
        times: dict[str, list[float]] = {k: [] for k in limits}
        # Only torchvision's kernel reads converted maps: the channels-last kernel reads them as they are.
        with nhwc_roi_align.torchvision_only():
            for _ in range(2):
                adapter.forward([item])
            for _ in range(rounds):
                for name, limit in limits.items():
                    pooling_inputs._BLOCKED_MIN = limit
                    start = time.perf_counter()
                    adapter.forward([item])
                    times[name].append(time.perf_counter() - start)
        pooling_inputs._BLOCKED_MIN = limits["blocks"]
        print(
            f"\nR50-FPN bf16 forward at 800 px ({adapter.precision}), medians of {rounds} alternating rounds:"
        )
        for name, samples in times.items():
            print(f"  {name}: {_median_ms(samples)} ms (min {1000 * min(samples):.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--forward", action="store_true", help="also time the R50-FPN forward")
    args = parser.parse_args()
    print(_common.machine())
    from cvserve.models import compat
    from cvserve.server.allocator import keep_freed_memory

    # As `cvserve serve` does at start: freed tensors stay in the heap, so neither way pays
    # for mapping fresh pages.
    print("malloc thresholds raised:", keep_freed_memory())

    compat.apply()
    _conversions(args.rounds)
    if args.forward:
        _forward(args.rounds)


if __name__ == "__main__":
    main()
