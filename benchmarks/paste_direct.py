"""Mask pasting of small blocks: every pixel by ``grid_sample`` against the 0.5 crossings.

``cvserve.models.instance.paste`` finds a mask's pixels from the crossings of 0.5 along
each column (cost follows the outline), except that a block of at most
``DIRECT_MAX_PIXELS`` pixels is sampled whole by ``grid_sample``. This runs the instance
adapter's postprocessing (paste and RLE of every mask) on one forward's outputs per
image, alternating between the default and crossings for every block
(``DIRECT_MAX_PIXELS = 0``), and checks that the outputs are equal.

    .venv/bin/python benchmarks/paste_direct.py --model demo

``--sweep`` instead times one smooth 28x28 mask pasted into square boxes of several sizes
both ways (``paste_rles`` of a single mask, RLEs compared), the crossover the limit rests on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

from cvserve.models.instance import paste


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["demo", "tiny", "r50"], default="demo")
    parser.add_argument("--size", default="480x640", help="image HxW (default: 480x640)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sweep", action="store_true", help="time one mask per box size instead")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    print(_common.machine())
    if args.sweep:
        _sweep(args.rounds)
        return
    with tempfile.TemporaryDirectory(prefix="cvserve-paste-") as tmp:
        model = _common.prepare_model(args.model, Path(tmp))
        adapter = _common.instance_adapter(model, "auto")
        images = _common.make_images(args.images, height, width, shapes=True)
        raws = [adapter.forward([adapter.prepare(image)])[0] for image in images]
        default = paste.DIRECT_MAX_PIXELS
        variants = {
            f"blocks <= {default} px sampled whole (default)": default,
            "crossings for every block": 0,
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        outputs = {}
        for _ in range(args.rounds):
            for name, limit in variants.items():
                paste.DIRECT_MAX_PIXELS = limit
                start = time.perf_counter()
                outputs[name] = [adapter.postprocess(raw, (height, width)).instances for raw in raws]
                times[name].append((time.perf_counter() - start) / len(raws))
        paste.DIRECT_MAX_PIXELS = default
        masks = sum(len(instances) for instances in next(iter(outputs.values())))
        print(f"model {args.model} ({model.weights_note}), {len(raws)} images of {args.size}, {masks} masks")
        first, second = outputs.values()
        print(f"outputs equal (boxes, classes, scores, mask RLEs): {first == second}")
        for name, samples in times.items():
            print(f"postprocess per image, {name}: median {1000 * statistics.median(samples):.2f} ms")


def _sweep(rounds: int) -> None:
    """One mask, boxes of 30 to 400 px a side on a 2000 px image, sampled whole against crossings."""
    import torch

    grid = torch.linspace(-1, 1, 28)
    radius = (grid[:, None] ** 2 + grid[None, :] ** 2).sqrt()
    probs = torch.sigmoid((0.7 - radius) * 12)[None]  # a disc with soft edges, like a mask head's
    default = paste.DIRECT_MAX_PIXELS
    whole_limit = 1 << 40  # every block sampled whole
    for side in (30, 60, 100, 150, 200, 250, 400):
        box = torch.tensor([[50.3, 40.7, 50.3 + side, 40.7 + side]])
        _, _, rows, cols = paste.box_regions(box, 2000, 2000)[0].tolist()
        samples: dict[int, list[float]] = {whole_limit: [], 0: []}
        rles = {}
        for _ in range(rounds):
            for limit in samples:
                paste.DIRECT_MAX_PIXELS = limit
                start = time.perf_counter()
                for _ in range(20):
                    rles[limit] = paste.paste_rles(probs, box, 2000, 2000)
                samples[limit].append((time.perf_counter() - start) / 20)
        paste.DIRECT_MAX_PIXELS = default
        whole, crossings = (1e6 * statistics.median(samples[k]) for k in (whole_limit, 0))
        print(f"box {side} px ({rows * cols} px block): sampled whole {whole:.0f} us, "
              f"crossings {crossings:.0f} us, RLEs equal {rles[whole_limit] == rles[0]}")  # fmt: skip


if __name__ == "__main__":
    main()
