"""Does the transferred encoder help? Train the segmenter twice, transferred and from scratch.

Both runs use the same synthetic data, seed, iterations and options; they differ only
in the encoder's initial weights (the decoder starts identical). Prints both final and
best validation mIoUs and writes a PNG with both validation curves.

    python benchmarks/transfer_vs_scratch.py --detector demo_repository/instance/model.pth \\
        --iters 200 --out transfer_vs_scratch.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METRIC = "val/sem_seg/mIoU"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--detector", type=Path, help="detection checkpoint (default: the demo repository's)")
    p.add_argument("--iters", type=int, default=200, help="training iterations of each run")
    p.add_argument("--eval-period", type=int, default=25)
    p.add_argument(
        "--lr", type=float, help="learning rate (default: the demo build's; its optimizer is used either way)"
    )
    p.add_argument("--train-images", type=int, default=200)
    p.add_argument("--val-images", type=int, default=30)
    p.add_argument("--image-size", type=int, default=256, help="side of the synthetic images")
    p.add_argument("--input-size", type=int, help="the segmenter's short edge (default: the demo build's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    p.add_argument(
        "--class-weights",
        default="balanced",
        help="'balanced' (as the demo build trains), 'none', or one weight per class, comma-separated",
    )
    p.add_argument("--out", type=Path, default=Path("transfer_vs_scratch.png"))
    return p.parse_args(argv)


def _curve(history: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    points = [(int(r["iteration"]), float(r[METRIC])) for r in history if METRIC in r]
    return [p[0] for p in points], [p[1] for p in points]


def _plot(curves: dict[str, tuple[list[int], list[float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation mIoU")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from cvserve.models import compat

    compat.apply()  # detectron2 v0.6 needs it before its first import
    import torch

    torch.set_num_threads(args.threads)
    from cvserve.models.data.datasets import register_semantic_split
    from cvserve.models.data.synthetic import CATEGORIES, generate_dataset
    from cvserve.models.demo.build import DEMO_SCALE
    from cvserve.models.paths import default_repository_path
    from cvserve.models.semseg.class_weights import parse_class_weights
    from cvserve.models.semseg.training import train_semantic
    from cvserve.models.training.options import TrainOptions

    lr = DEMO_SCALE.semantic_lr if args.lr is None else args.lr
    input_size = DEMO_SCALE.semantic_input_size if args.input_size is None else args.input_size
    detector = args.detector or default_repository_path().parent / "instance" / "model.pth"
    if not detector.is_file():
        print(
            f"error: detector checkpoint {detector} not found (run `cvserve demo build` or pass --detector)"
        )
        return 2
    classes = ["background", *CATEGORIES]
    try:
        weights = (
            None if args.class_weights == "none" else parse_class_weights(args.class_weights, len(classes))
        )
    except ValueError as e:
        print(f"error: --class-weights: {e}")
        return 2
    with tempfile.TemporaryDirectory(prefix="transfer_vs_scratch-") as tmp:
        size = (args.image_size, args.image_size)
        splits = {"train": args.train_images, "val": args.val_images}
        # seed + 1000: images the detector never saw in the demo build (which used seed 0)
        paths = generate_dataset(Path(tmp) / "data", seed=args.seed + 1000, splits=splits, image_size=size)
        for split, p in paths.items():
            register_semantic_split(f"tvs_{split}", p.images, p.semantic_labels, classes)
        options = TrainOptions(
            max_iter=args.iters,
            warmup_iters=min(50, args.iters // 4),
            lr_steps=DEMO_SCALE.lr_steps(args.iters),
            eval_period=args.eval_period,
            seed=args.seed,
            optimizer=DEMO_SCALE.semantic_optimizer,
            lr=lr,
            weight_decay=DEMO_SCALE.semantic_weight_decay,
            dropout=0.1,
            num_workers=1,
        )
        curves, rows = {}, []
        for label, encoder in (("transferred encoder", detector), ("from scratch", None)):
            start = time.perf_counter()
            result = train_semantic(
                train_dataset="tvs_train",
                val_dataset="tvs_val",
                num_classes=len(classes),
                options=options,
                output_dir=Path(tmp) / label.replace(" ", "_"),
                encoder_from=encoder,
                input_size=input_size,
                class_weights=weights,
                progress=False,
            )
            xs, ys = _curve(result.train.history)
            curves[label] = (xs, ys)
            rows.append((label, ys[-1], result.train.best_metric, time.perf_counter() - start))
    title = f"{args.iters} iterations, {args.train_images} training images, seed {args.seed}"
    if weights is not None:
        title += f", {args.class_weights if isinstance(weights, str) else 'weighted'} classes"
    _plot(curves, args.out, title)
    print(f"{'run':<22}{'final mIoU':>12}{'best mIoU':>12}{'seconds':>10}")
    for label, final, best, seconds in rows:
        print(f"{label:<22}{final:>12.2f}{best or float('nan'):>12.2f}{seconds:>10.0f}")
    print(f"curves: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
