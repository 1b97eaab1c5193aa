"""``cvserve demo``: build the demo model repository, or show the figures of the one built."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any

from cvserve.models.repository import PRECISIONS

HELP = "build the demo model repository (synthetic data, trained models, test figures) or show its status"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    build = sub.add_parser(
        "build", help="train and evaluate the demo models (about 11 minutes on 2 CPU cores)"
    )
    build.add_argument("--out", type=Path, help="repository directory (default: the demo repository)")
    build.add_argument("--force", action="store_true", help="rebuild even if the repository exists")
    build.add_argument("--seed", type=int, default=0, help="dataset and training seed (default 0)")
    build.add_argument(
        "--instance-iters",
        type=_positive,
        help="instance model training iterations (default: the demo's); more buy accuracy",
    )
    build.add_argument(
        "--semantic-iters", type=_positive, help="semantic model training iterations (default: the demo's)"
    )
    build.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="training precision (default auto: bf16 autocast on a CPU with native bf16, fp16 on CUDA)",
    )
    build.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's); 1 is fastest on a busy shared CPU"
    )
    status = sub.add_parser("status", help="print the test-split figures of the built demo repository")
    status.add_argument("--out", type=Path, help="repository directory (default: the demo repository)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _scale(args: argparse.Namespace) -> Any:
    """The default demo scale with the iteration counts the flags override (eval periods follow)."""
    import dataclasses

    from cvserve.models.demo.build import DEMO_SCALE

    changes: dict[str, Any] = {}
    if args.instance_iters:
        changes["instance_iters"] = args.instance_iters
        changes["instance_eval_period"] = max(1, args.instance_iters // 2)
    if args.precision:
        changes["training_precision"] = args.precision
    if args.semantic_iters:
        changes["semantic_iters"] = args.semantic_iters
        changes["semantic_eval_period"] = max(1, args.semantic_iters // 2)
    return dataclasses.replace(DEMO_SCALE, **changes)


def _directory(out: Path | None) -> Path:
    from cvserve.models.paths import default_repository_path

    return out if out is not None else default_repository_path().parent


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "n/a"


def _status(directory: Path) -> int:
    from cvserve.cli.common import CLIError
    from cvserve.models.demo.build import read_report

    try:
        report = read_report(directory)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    inst, sem = report.get("instance", {}), report.get("semantic", {})
    data = report.get("dataset", {})
    env = report.get("environment", {})
    print(f"repository   {directory}")
    print(f"dataset      seed {data.get('seed')}, {data.get('images')} at {data.get('image_size')} px")
    test = inst.get("test", {})
    print(
        f"instance     bbox AP {_fmt(test.get('bbox/AP'))}  segm AP {_fmt(test.get('segm/AP'))}  "
        f"({inst.get('stored_precision')}, {_fmt(inst.get('checkpoint_mib'))} MiB)"
    )
    print(
        f"semantic     mIoU {_fmt(sem.get('test', {}).get('sem_seg/mIoU'))}  "
        f"({sem.get('stored_precision')}, {_fmt(sem.get('checkpoint_mib'))} MiB)"
    )
    print(f"transfer     {sem.get('transfer', 'n/a')}")
    print(
        f"built in     {_fmt(report.get('build_seconds'))} s on {env.get('device')} "
        f"(load average {env.get('load_average_start')} -> {env.get('load_average_end')})"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from cvserve.cli.common import CLIError

    directory = _directory(args.out)
    if args.demo_command == "status":
        return _status(directory)
    from cvserve.models.demo.build import build_demo_repository

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if (directory / "models.yaml").is_file() and not args.force:
        print(f"{directory / 'models.yaml'} exists; use --force to rebuild")
        return 0
    try:
        progress = functools.partial(print, flush=True)
        path = build_demo_repository(
            directory,
            seed=args.seed,
            scale=_scale(args),
            progress=progress,
            force=args.force or directory.exists(),
        )
    except FileExistsError as e:
        raise CLIError(str(e)) from None
    print(path)
    return _status(directory)
