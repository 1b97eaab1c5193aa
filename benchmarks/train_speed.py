"""Training throughput of the demo detector: one process against data-parallel processes.

Trains the demo instance config on synthetic shapes from the same initial weights
for ``--iters`` iterations per setting, after ``--warmup`` iterations that are not
timed, and prints images per second. The settings differ only in how the CPU is
used: one process with all intra-op threads (with and without a data-loader
process beside it), or ``--processes`` single-thread processes (DDP over gloo).
``--precisions fp32 bf16`` instead compares training precisions (autocast) in the
demo build's setting (``--processes`` single-thread processes), alternating rounds.

    python benchmarks/train_speed.py --iters 60 --batch-size 8
    python benchmarks/train_speed.py --precisions fp32 bf16 --rounds 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=60, help="timed iterations per setting")
    p.add_argument("--warmup", type=int, default=100, help="untimed iterations first (the model settles)")
    p.add_argument("--batch-size", type=int, default=8, help="images per iteration, over all processes")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--precisions", nargs="*", default=[], help="compare these training precisions instead")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of --precisions")
    return p.parse_args(argv)


class _Clock(logging.Handler):
    """Timestamps of the progress lines the engine logs (one per iteration here)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stamps: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("iter "):
            self.stamps.append(time.perf_counter())


def _run(name: str, dataset: str, out: Path, args: argparse.Namespace, **kw: Any) -> float:
    from cvserve.models.data.synthetic import CATEGORIES
    from cvserve.models.instance.config import tiny_instance_config
    from cvserve.models.training.engine import train
    from cvserve.models.training.options import TrainOptions

    clock = _Clock()
    logging.getLogger("cvserve.models.training.engine").addHandler(clock)
    total = args.warmup + args.iters
    options = TrainOptions(
        max_iter=total, warmup_iters=max(1, args.warmup // 2), batch_size=args.batch_size, eval_period=total,
        log_period=1, lr_schedule="constant", **kw,
    )  # fmt: skip
    try:
        train(
            tiny_instance_config(len(CATEGORIES), input_size=args.image_size),
            options,
            train_dataset=dataset,
            val_dataset=None,
            output_dir=out / name,
        )
    finally:
        logging.getLogger("cvserve.models.training.engine").removeHandler(clock)
    timed = clock.stamps[args.warmup - 1 :]
    return args.iters * args.batch_size / (timed[-1] - timed[0])


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from cvserve.models import compat

    compat.apply()  # detectron2 v0.6 needs it before its first import
    logging.getLogger("cvserve.models.training.engine").setLevel(
        logging.INFO
    )  # the clock reads the progress lines
    logging.getLogger("cvserve.models.training.engine").propagate = False
    import torch

    from benchmarks._common import machine
    from cvserve.models.data.datasets import register_coco_split
    from cvserve.models.data.synthetic import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        size = (args.image_size, args.image_size)
        paths = generate_dataset(out / "data", seed=0, splits={"train": args.train_images}, image_size=size)
        register_coco_split("bench_train", paths["train"])
        settings: list[tuple[str, dict]] = [
            (f"1 process, {torch.get_num_threads()} threads, 1 loader process", {"num_workers": 1}),
            (f"1 process, {torch.get_num_threads()} threads, loading inline", {"num_workers": 0}),
            (
                f"{args.processes} processes, DDP, loading inline",
                {"num_workers": 0, "processes": args.processes},
            ),
        ]
        if args.precisions:
            base = {"num_workers": 0, "processes": args.processes}
            settings = [
                (f"{args.processes} processes, DDP, {p} (round {r + 1})", {**base, "precision": p})
                for r in range(args.rounds)
                for p in args.precisions
            ]
        print(machine())
        print(
            f"demo detector, batch {args.batch_size} at {args.image_size} px, {args.iters} timed iterations"
        )
        print(f"{'setting':<48} {'images/s':>9}")
        for i, (label, kw) in enumerate(settings):
            rate = _run(f"run{i}", "bench_train", out, args, **kw)
            print(f"{label:<48} {rate:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
