"""``cvserve train semantic``: train the encoder-decoder segmenter, optionally with transfer.

Data comes either as folders of images and same-stem uint8 label PNGs
(``--train-images/--train-labels``), or as COCO instances (``--train-json`` with
``--train-images`` as its image root), converted to label PNGs under ``--out``.
``--encoder-from`` initialises the encoder from a detection checkpoint.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

HELP = "train the semantic segmentation model (encoder-decoder), from scratch or with a transferred encoder"

logger = logging.getLogger(__name__)

# models.semseg.config.FREEZE_CHOICES, repeated so that parsing does not import detectron2.
_FREEZE = ("none", "stem", "res2", "res3", "res4", "res5", "encoder")
_ENCODERS = ("resnet", "fpn")  # models.semseg.config.ENCODER_CHOICES, likewise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from cvserve.models.training.options import add_train_options  # light: no torch or detectron2 import

    data = parser.add_argument_group("data")
    data.add_argument(
        "--train-images", type=Path, help="training images (also the image root of --train-json)"
    )
    data.add_argument("--train-labels", type=Path, help="training label PNGs: 0 background, 255 ignore")
    data.add_argument("--train-json", type=Path, help="COCO instances file to derive training labels from")
    data.add_argument("--val-images", type=Path, help="validation images")
    data.add_argument("--val-labels", type=Path, help="validation label PNGs")
    data.add_argument("--val-json", type=Path, help="COCO instances file to derive validation labels from")
    data.add_argument(
        "--classes",
        help="comma-separated label names, index = label value, background first "
        "(default with --train-json: background + its categories)",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--encoder-from", type=Path, help="detection checkpoint (.pth/.pkl) for the encoder")
    model.add_argument("--freeze", choices=_FREEZE, default="none", help="freeze the encoder up to here")
    model.add_argument(
        "--config", help="detection config (YAML or model-zoo name) whose backbone to use (default: tiny)"
    )
    model.add_argument(
        "--encoder",
        choices=_ENCODERS,
        default="resnet",
        help="what the decoder reads: the detector's ResNet stages (default) or its FPN levels",
    )
    model.add_argument("--input-size", type=int, default=256, help="shortest image side (default 256)")
    model.add_argument(
        "--class-weights",
        help="cross-entropy weight per class: 'balanced' (ENet weights from the training labels' "
        "class frequencies) or comma-separated numbers, background first (default: uniform)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    add_train_options(parser)


def _check_dir(path: Path | None, flag: str) -> Path | None:
    from cvserve.cli.common import CLIError

    if path is not None and not path.is_dir():
        raise CLIError(f"{flag} {path}: not a directory")
    return path


def _labels_from_json(json_path: Path, out_dir: Path, flag: str) -> Path:
    from cvserve.cli.common import CLIError
    from cvserve.models.data.datasets import coco_to_semantic_labels

    if not json_path.is_file():
        raise CLIError(f"{flag} {json_path}: no such file")
    try:
        return coco_to_semantic_labels(json_path, out_dir)
    except (ValueError, KeyError) as e:
        raise CLIError(f"{flag} {json_path}: {e}") from None


def _class_names(args: argparse.Namespace) -> list[str]:
    from cvserve.cli.common import CLIError

    if args.classes:
        names = [n.strip() for n in args.classes.split(",") if n.strip()]
        if len(names) < 2:
            raise CLIError("--classes: need at least two names (background and one class)")
        return names
    if args.train_json:
        from cvserve.models.data.datasets import coco_category_names

        try:
            return ["background", *coco_category_names(args.train_json)]
        except ValueError as e:
            raise CLIError(f"--train-json {args.train_json}: {e}") from None
    raise CLIError("--classes is required unless --train-json provides the categories")


def _class_weights(args: argparse.Namespace, num_classes: int) -> str | list[float] | None:
    from cvserve.cli.common import CLIError
    from cvserve.models.semseg.class_weights import parse_class_weights

    if args.class_weights is None:
        return None
    try:
        return parse_class_weights(args.class_weights, num_classes)
    except ValueError as e:
        raise CLIError(f"--class-weights: {e}") from None


def _split(args: argparse.Namespace, which: str) -> tuple[Path, Path] | None:
    """``(image_dir, label_dir)`` of the train or val split, converting COCO labels if asked."""
    from cvserve.cli.common import CLIError

    images = _check_dir(getattr(args, f"{which}_images"), f"--{which}-images")
    labels = _check_dir(getattr(args, f"{which}_labels"), f"--{which}-labels")
    json_path: Path | None = getattr(args, f"{which}_json")
    if json_path is not None and labels is not None:
        raise CLIError(f"--{which}-json and --{which}-labels are exclusive")
    if json_path is not None:
        labels = _labels_from_json(json_path, args.out / "labels" / which, f"--{which}-json")
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        raise CLIError(f"--{which}-images needs --{which}-labels or --{which}-json, and vice versa")
    return images, labels


def _register(args: argparse.Namespace, classes: list[str]) -> tuple[str, str | None]:
    from cvserve.cli.common import CLIError

    train = _split(args, "train")
    if train is None:
        raise CLIError("training data is required: --train-images with --train-labels or --train-json")
    val = _split(args, "val")
    return _register_split("train", train, classes), _register_split("val", val, classes) if val else None


def _register_split(which: str, split: tuple[Path, Path], classes: list[str]) -> str:
    from cvserve.cli.common import CLIError
    from cvserve.models.data.datasets import register_semantic_split, split_name

    name = split_name(f"semantic_{which}", *split, classes)
    try:
        register_semantic_split(name, *split, classes)
    except ValueError as e:
        raise CLIError(f"--{which}-images/--{which}-labels: {e}") from None
    return name


def run(args: argparse.Namespace) -> int:
    from cvserve.cli.common import CLIError
    from cvserve.models.semseg.training import train_semantic
    from cvserve.models.training.options import options_from_args

    try:
        options = options_from_args(args)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.encoder_from is not None and not args.encoder_from.is_file():
        raise CLIError(f"--encoder-from {args.encoder_from}: no such file")
    classes = _class_names(args)
    class_weights = _class_weights(args, len(classes))
    args.out.mkdir(parents=True, exist_ok=True)
    train_name, val_name = _register(args, classes)
    try:
        result = train_semantic(
            train_dataset=train_name,
            val_dataset=val_name,
            num_classes=len(classes),
            options=options,
            output_dir=args.out,
            encoder_from=args.encoder_from,
            backbone_from=args.config,
            freeze=args.freeze,
            input_size=args.input_size,
            class_weights=class_weights,
            encoder=args.encoder,
        )
    except (FileNotFoundError, ValueError) as e:  # their messages name the file or option
        raise CLIError(str(e)) from None
    if result.train.rank:  # under torchrun: rank 0 wrote the files and reports them
        return 0
    if result.transfer is not None:
        print(f"encoder transfer: {result.transfer.summary()}")
    print(f"best checkpoint: {result.train.best_checkpoint}")
    if result.train.best_metric is not None:
        print(f"best validation mIoU: {result.train.best_metric:.2f}")
    print(f"metrics: {result.train.metrics_csv}, plot: {result.train.plot_png}")
    return 0
