"""The ``cvserve`` command line: parses arguments and calls library functions.

Each subcommand lives in ``service/commands/<name>.py`` and exposes ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports happen inside
``run`` so that ``cvserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.repository import ModelSpec

# name -> module; the order is the order of ``cvserve --help``.
COMMANDS = {
    "serve": "service.commands.serve",
    "client": "service.commands.client",
    "eval": "service.commands.eval",
    "annotate": "service.commands.annotate",
    "train": "service.commands.train",
    "demo": "service.commands.demo",
    "health": "service.commands.health",
    "info": "service.commands.info",
}


class CLIError(Exception):
    """A user-facing command-line error: printed as ``cvserve: error: <message>``, exit code 2."""


def model_spec(repository: str, name: str) -> ModelSpec:
    """The spec of model ``name`` in a model repository YAML.

    Raises:
        CLIError: the file is invalid or has no model ``name``.
    """
    from models.repository import RepositoryError, load_repository

    try:
        specs = {s.name: s for s in load_repository(repository)}
    except RepositoryError as e:
        raise CLIError(str(e)) from None
    if name not in specs:
        raise CLIError(f"{repository}: no model named {name!r} (available: {', '.join(sorted(specs))})")
    return specs[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvserve", description="Computer-vision inference service.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
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
    # Run through the imported module: under ``python -m`` this file is ``__main__``, and the
    # CLIError that commands raise (``service.cli.CLIError``) would not be the one caught above.
    from service.cli import main as _main

    sys.exit(_main())
