"""``cvserve train``: train an instance segmentation / detection model, or the semantic segmenter.

``cvserve train instance`` trains any detectron2 yacs config (default: the tiny
Mask R-CNN that trains on a CPU) on a COCO instances file, optionally from initial
weights; ``cvserve train semantic`` trains the encoder-decoder segmenter.

Both run in one process, in ``--processes`` processes on this machine, or as the processes
``torchrun`` starts on one or several machines (``torchrun --nnodes N --nproc-per-node P
$(which cvserve) train ...``; env:// rendezvous, see the README).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from cvserve.cli import train_semantic

HELP = "train a model: 'instance' (detectron2 detection / instance segmentation) or 'semantic'"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="train_task", metavar="TASK", required=True)
    instance = sub.add_parser(
        "instance", help="detectron2 detection / instance segmentation on COCO instances", description=__doc__
    )
    _add_instance_arguments(instance)
    instance.set_defaults(_run_train=_run_instance)
    semantic = sub.add_parser("semantic", help=train_semantic.HELP, description=train_semantic.HELP)
    train_semantic.add_arguments(semantic)
    semantic.set_defaults(_run_train=train_semantic.run)


def _add_instance_arguments(parser: argparse.ArgumentParser) -> None:
    from cvserve.models.training.options import add_train_options  # light: no torch or detectron2 import

    data = parser.add_argument_group("data")
    data.add_argument(
        "--train-json", type=Path, required=True, help="COCO instances file of the training set"
    )
    data.add_argument("--train-images", type=Path, required=True, help="image directory of --train-json")
    data.add_argument("--val-json", type=Path, help="COCO instances file of the validation set")
    data.add_argument("--val-images", type=Path, help="image directory of --val-json")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--config",
        help="detectron2 config: model-zoo name (e.g. COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml) "
        "or YAML file (default: the tiny Mask R-CNN, models/configs/tiny_mask_rcnn.yaml)",
    )
    model.add_argument("--weights", help="initial weights: .pth, model-zoo .pkl or detectron2:// URL")
    model.add_argument("--fp16-checkpoint", action="store_true", help="also write model_best_fp16.pth")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    add_train_options(parser)


def run(args: argparse.Namespace) -> int:
    return int(args._run_train(args) or 0)


def _check_inputs(args: argparse.Namespace) -> None:
    from cvserve.cli.common import CLIError

    def need_file(path: Path, flag: str) -> None:
        if not path.is_file():
            raise CLIError(f"{flag} {path}: file does not exist")

    def need_dir(path: Path, flag: str) -> None:
        if not path.is_dir():
            raise CLIError(f"{flag} {path}: not a directory")

    need_file(args.train_json, "--train-json")
    need_dir(args.train_images, "--train-images")
    if (args.val_json is None) != (args.val_images is None):
        raise CLIError("--val-json and --val-images must be given together")
    if args.val_json is not None:
        need_file(args.val_json, "--val-json")
        need_dir(args.val_images, "--val-images")
    if args.weights and "://" not in args.weights:
        need_file(Path(args.weights), "--weights")
    if args.config and Path(args.config).suffix == ".py":
        raise CLIError(f"--config {args.config}: LazyConfig files cannot be trained here; use a YAML config")
    if args.threads < 0:
        raise CLIError(f"--threads must be >= 0, got {args.threads}")


def _register(json_path: Path, images: Path, role: str) -> str:
    """Register a COCO split under a name derived from its paths (stable, collision-free)."""
    from cvserve.cli.common import CLIError
    from cvserve.models.data.datasets import register_coco_split, split_name
    from cvserve.models.data.synthetic import SplitPaths

    name = split_name(role, json_path.resolve(), images.resolve())
    try:
        register_coco_split(name, SplitPaths(images, json_path, images.parent / "semantic"))
    except ValueError as e:
        raise CLIError(f"--{role}-json {json_path}: {e}") from None
    return name


def _load_config(config: str | None) -> Any:
    from cvserve.cli.common import CLIError
    from cvserve.models.instance.config import TINY_INSTANCE_YAML, load_config

    try:
        return load_config(config or str(TINY_INSTANCE_YAML))
    except ValueError as e:
        raise CLIError(f"--config: {e}") from None


def _run_instance(args: argparse.Namespace) -> int:
    from cvserve.cli.common import CLIError

    _check_inputs(args)
    from cvserve.models.training.options import options_from_args

    try:
        options = options_from_args(args)
    except ValueError as e:
        raise CLIError(str(e)) from None

    import torch

    from cvserve.models.training.engine import train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _load_config(args.config)
    train_name = _register(args.train_json, args.train_images, "train")
    val_name = _register(args.val_json, args.val_images, "val") if args.val_json else None
    try:
        result = train(
            cfg,
            options,
            train_dataset=train_name,
            val_dataset=val_name,
            output_dir=args.out,
            init_weights=args.weights,
        )
    except (ValueError, FloatingPointError) as e:
        raise CLIError(str(e)) from None
    if result.rank:  # under torchrun: rank 0 wrote the files and reports them
        return 0
    if args.fp16_checkpoint:
        _write_fp16(result.best_checkpoint, args.out / "model_best_fp16.pth")
    metric = "n/a" if result.best_metric is None else f"{result.best_metric:.2f}"
    print(f"best checkpoint  {result.best_checkpoint}  (validation metric {metric})")
    print(f"last checkpoint  {result.last_checkpoint}")
    print(f"config           {args.out / 'config.yaml'}")
    print(f"metrics          {result.metrics_csv}, {result.metrics_json}")
    print(f"plot             {result.plot_png}")
    return 0


def _write_fp16(source: Path, target: Path) -> None:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from cvserve.models.checkpoint import META_KEY, save_checkpoint
    from cvserve.models.instance.config import load_config

    model = build_model(load_config(str(source.parent / "config.yaml")))
    # load returns what the checkpoint holds besides the weights: no second read for the metadata.
    meta = DetectionCheckpointer(model).load(str(source)).get(META_KEY, {})
    save_checkpoint(model, target, fp16=True, extra={k: v for k, v in meta.items() if k != "dtype"})
