"""The ``cvserve`` command line: parses arguments and calls library functions.

Each subcommand lives in ``cvserve/cli/<name>.py`` and exposes ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports happen inside
``run`` so that ``cvserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from cvserve.cli import annotate, client, demo, health, info, serve, train
from cvserve.cli import eval as eval_command
from cvserve.cli.common import CLIError
from cvserve.models import compat

__all__ = ["COMMANDS", "build_parser", "main"]

# name -> module; the order is the order of ``cvserve --help``.
COMMANDS: dict[str, ModuleType] = {
    "serve": serve,
    "client": client,
    "eval": eval_command,
    "annotate": annotate,
    "train": train,
    "demo": demo,
    "health": health,
    "info": info,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvserve", description="Computer-vision inference service.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Commands load detectron2 lazily; v0.6 needs its compatibility layer first.
    compat.apply()
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
        return code
    except CLIError as e:
        print(f"cvserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cvserve {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, as other Unix tools do. stdout is
        # pointed at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
