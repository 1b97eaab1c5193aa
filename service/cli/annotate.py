"""``cvserve annotate``: run a model over many images and write COCO results, resumably."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cvserve.cli.connection import add_connection_arguments, connection_from_args

DEFAULT_BATCH_SIZE = 8
HELP = "annotate folders, globs, path lists or a COCO image list; writes COCO results (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image folder (recursive), glob, image file, text file of paths, or a COCO json",
    )
    parser.add_argument("--model", required=True, help="name of the model to run")
    parser.add_argument("--out", required=True, help="COCO results file to write, e.g. results.json")
    parser.add_argument("--models", help="model repository YAML (default: the demo repository)")
    parser.add_argument("--image-root", help="folder the COCO json's file_name values are relative to")
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"images per journal write and per Ray actor call (default {DEFAULT_BATCH_SIZE}); "
        "a forward pass takes at most the model's max_batch_size",
    )
    parser.add_argument("--overlays", metavar="DIR", help="also write images with the predictions drawn")
    parser.add_argument(
        "--full-decode",
        action="store_true",
        help="local and Ray engines: decode every JPEG at full size (by default one larger than the "
        "model's input is decoded at 1/2, 1/4 or 1/8 scale, as the server does)",
    )
    parser.add_argument("--labels-dir", help="semantic label PNGs (default: <out stem>.labels/)")
    parser.add_argument("--restart", action="store_true", help="discard the journal of an earlier run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    remote = add_connection_arguments(
        parser, server_default=None, server_help="send images to a cvserve server (host:port)"
    )
    remote.add_argument("--concurrency", type=int, help="requests (or batches) in flight (default 4 / 2)")
    ray = parser.add_argument_group("ray")
    ray.add_argument("--engine", choices=("local", "ray"), default="local", help="where models run")
    ray.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    ray.add_argument("--num-actors", type=int, help="model actors (default: per GPU, else CPUs / 2)")
    ray.add_argument("--gpus-per-actor", type=float, help="GPUs per actor (default: 1 when present)")


def _positive(args: argparse.Namespace, *names: str) -> None:
    from cvserve.cli.common import CLIError

    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def _spec(args: argparse.Namespace) -> Any:
    from cvserve.cli.common import model_spec
    from cvserve.models.paths import default_repository_path

    return model_spec(args.models or str(default_repository_path()), args.model)


def _server_predictor(args: argparse.Namespace) -> Any:
    from cvserve.annotation.predictors import PredictorError, ServerPredictor
    from cvserve.cli.common import CLIError
    from cvserve.client.client import Client

    if args.engine != "local":
        raise CLIError("--server and --engine ray exclude each other")
    connection = connection_from_args(args)
    try:
        return ServerPredictor(
            connection.address,
            args.model,
            concurrency=args.concurrency or 4,
            timeout=connection.timeout,
            client=Client.connect(connection),
        )
    except ImportError as e:
        raise CLIError(f"the gRPC client is not available: {e}") from None
    except PredictorError as e:  # unknown model, unreachable server, model failed to load
        raise CLIError(f"--server {e}") from None


def _predictor(args: argparse.Namespace) -> tuple[Any, int]:
    """The predictor for the arguments and the default annotation batch size."""
    from cvserve.annotation.predictors import LocalPredictor
    from cvserve.cli.common import CLIError

    if args.server:
        return _server_predictor(args), DEFAULT_BATCH_SIZE
    spec = _spec(args)
    if args.engine == "ray":
        from cvserve.annotation.ray_engine import RayPredictor, RayUnavailableError

        try:
            predictor = RayPredictor(
                spec,
                address=args.ray_address,
                num_actors=args.num_actors,
                gpus_per_actor=args.gpus_per_actor,
                scaled_decode=not args.full_decode,
            )
        except RayUnavailableError as e:
            raise CLIError(str(e)) from None
        except (ConnectionError, RuntimeError, ValueError) as e:  # unreachable cluster, bad address
            raise CLIError(f"--engine ray: {e}") from None
        return predictor, DEFAULT_BATCH_SIZE
    from cvserve.models.batching import load_for_inference

    try:
        model, spec = load_for_inference(spec)
    except KeyError as e:
        raise CLIError(str(e.args[0])) from None
    except Exception as e:  # weights missing or unreadable, bad config: name the model
        raise CLIError(f"model {spec.name!r} failed to load: {e}") from None
    local = LocalPredictor(model, args.concurrency or 2, spec.max_batch_size, not args.full_decode)
    return local, DEFAULT_BATCH_SIZE


def run(args: argparse.Namespace) -> int:
    from cvserve.annotation.job import AnnotateJob, InputError, JournalError, annotate
    from cvserve.annotation.predictors import PredictorError
    from cvserve.cli.common import CLIError

    _positive(args, "batch_size", "concurrency", "timeout", "num_actors")
    if args.gpus_per_actor is not None and args.gpus_per_actor < 0:
        raise CLIError(f"--gpus-per-actor must be >= 0, got {args.gpus_per_actor}")
    predictor, default_batch = _predictor(args)
    job = AnnotateJob(
        inputs=tuple(args.inputs),
        out=args.out,
        image_root=args.image_root,
        batch_size=args.batch_size or default_batch,
        overlays_dir=args.overlays,
        labels_dir=args.labels_dir,
        restart=args.restart,
    )
    try:
        with predictor:
            summary = annotate(job, predictor, progress=False if args.quiet else None)
    except (InputError, JournalError, PredictorError) as e:
        raise CLIError(str(e)) from None
    except ValueError as e:  # model classes vs COCO categories
        raise CLIError(f"{args.inputs[0]}: {e}") from None
    if not args.quiet:
        print(summary.format(), file=sys.stderr)
    return 0
