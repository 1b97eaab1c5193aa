"""The RPN's test-time NMS: detectron2's (every candidate) against cvserve's (stops at post_nms_topk).

``cvserve.models.instance.proposals`` runs each level's NMS over a growing prefix of its
candidates and stops once the level has kept ``POST_NMS_TOPK_TEST`` boxes; the proposals are
the same, and each level's candidates come from ``topk`` rather than a full sort where
that takes the same anchors. This loads the instance adapter (the demo detector by default), then times its
forward with the RPN's own selection and with cvserve's, alternating, and checks that every
output is equal.

    .venv/bin/python benchmarks/rpn_nms.py --model demo
    .venv/bin/python benchmarks/rpn_nms.py --model r50 --min-size 800 --images 2
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
import precision_stages


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["demo", "tiny", "r50"], default="demo")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-size", type=int, default=0, help="INPUT.MIN_SIZE_TEST (default: the model's)")
    args = parser.parse_args()
    print(_common.machine())
    with tempfile.TemporaryDirectory(prefix="cvserve-rpn-") as tmp:
        model = _common.prepare_model(args.model, Path(tmp))
        _common.with_min_size(model, args.min_size)
        adapter = precision_stages._adapter(model, args.precision)
        rpn = adapter._model.proposal_generator
        ours = rpn.predict_proposals  # the instance's method, set at load
        settings = f"pre_nms_topk {rpn.pre_nms_topk[False]}, post_nms_topk {rpn.post_nms_topk[False]}"
        print(f"model {args.model} ({model.weights_note}), precision {adapter.precision}, RPN {settings}")
        items = [adapter.prepare(image) for image in _common.make_images(args.images, 480, 640, shapes=True)]
        variants = {
            "detectron2": lambda: vars(rpn).pop("predict_proposals", None),
            "cvserve": lambda: setattr(rpn, "predict_proposals", ours),
        }
        outputs: dict[str, list[object]] = {}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name, use in variants.items():  # warm-up, and the outputs to compare
            use()
            raw = [adapter.forward([item])[0] for item in items]
            outputs[name] = [adapter.postprocess(r, (480, 640)).instances for r in raw]  # boxes, scores, RLEs
        for _ in range(args.rounds):
            for name, use in variants.items():
                use()
                for item in items:
                    start = time.perf_counter()
                    adapter.forward([item])
                    times[name].append(time.perf_counter() - start)
        print(
            f"detections equal (boxes, classes, scores, mask RLEs): {outputs['detectron2'] == outputs['cvserve']}"
        )
        for name, samples in times.items():
            print(f"forward, {name}'s selection: median {1000 * statistics.median(samples):.1f} ms "
                  f"({len(samples)} forwards, alternating rounds)")  # fmt: skip


if __name__ == "__main__":
    main()
