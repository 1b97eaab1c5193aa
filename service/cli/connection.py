"""The options every command that calls a server shares: address, deadline, TLS and token.

``cvserve client``, ``health``, ``annotate --server`` and ``eval --server`` add them with
:func:`add_connection_arguments` and turn them into a
:class:`~cvserve.client.connection.Connection` with :func:`connection_from_args`;
docs/connecting.md describes them once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cvserve.cli.common import CLIError

if TYPE_CHECKING:  # grpc is imported only by commands that connect
    from cvserve.client.connection import Connection

__all__ = ["DEFAULT_SERVER", "TOKEN_ENV", "add_connection_arguments", "connection_from_args"]

DEFAULT_SERVER = "127.0.0.1:8001"
TOKEN_ENV = "CVSERVE_TOKEN"  # read when no token option is given


def add_connection_arguments(
    parser: argparse.ArgumentParser,
    *,
    server_default: str | None = DEFAULT_SERVER,
    timeout_default: float = 60.0,
    server_help: str = "server address host:port",
) -> argparse._ArgumentGroup:
    """Add ``--server``, ``--timeout``, ``--token``/``--token-env``/``--token-file``,
    ``--tls``, ``--tls-ca`` and ``--tls-cert``/``--tls-key`` to ``parser``.

    Args:
        parser: the command's parser.
        server_default: default address; None makes ``--server`` optional with no default
            (the command then runs without a server).
        timeout_default: default per-call deadline in seconds.
        server_help: what ``--server`` means for this command.

    Returns:
        The argument group, for commands that add options of their own to it.
    """
    group = parser.add_argument_group("connection (see docs/connecting.md)")
    default = f" (default: {server_default})" if server_default else ""
    group.add_argument("--server", metavar="ADDR", default=server_default, help=server_help + default)
    group.add_argument(
        "--timeout",
        type=float,
        default=timeout_default,
        help="seconds per call (default: %(default)s)",
    )
    tokens = group.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        help=f"bearer token (visible to other users in process lists: prefer ${TOKEN_ENV} or --token-file)",
    )
    tokens.add_argument(
        "--token-env",
        metavar="VAR",
        help=f"read the bearer token from environment variable VAR (default: {TOKEN_ENV})",
    )
    tokens.add_argument("--token-file", metavar="PATH", help="read the bearer token from this file")
    group.add_argument(
        "--tls", action="store_true", help="use TLS, trusting gRPC's default root certificates"
    )
    group.add_argument("--tls-ca", metavar="PEM", help="use TLS, trusting the CA certificates in this file")
    group.add_argument(
        "--tls-cert", metavar="PEM", help="client certificate chain for mutual TLS (with --tls-key)"
    )
    group.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    return group


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CLIError(f"{flag} {path}: cannot read: {e.strerror or e}") from None


def _token(args: argparse.Namespace) -> str | None:
    if args.token is not None:
        token: str | None = args.token
        source = "--token"
    elif args.token_file:
        token = _read(args.token_file, "--token-file").decode("utf-8", "replace").strip()
        source = f"--token-file {args.token_file}"
    else:
        variable = args.token_env or TOKEN_ENV
        token = os.environ.get(variable)
        if token is None:
            if args.token_env:
                raise CLIError(f"--token-env {variable}: no such environment variable")
            return None
        token = token.strip()
        source = f"environment variable {variable}"
    if not token:
        raise CLIError(f"{source}: the token is empty")
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):  # it travels as an HTTP/2 header value
        raise CLIError(f"{source}: the token must be visible ASCII without spaces")
    return token


def connection_from_args(args: argparse.Namespace) -> Connection:
    """The connection the options describe; certificate and token files are read here.

    Raises:
        CLIError: an unreadable file, a certificate without its key (or the reverse), an
            empty or unsendable token, or ``--token-env`` naming an unset variable.
    """
    from cvserve.client.connection import Connection

    if bool(args.tls_cert) != bool(args.tls_key):
        raise CLIError("--tls-cert and --tls-key go together (the client certificate and its key)")
    if args.timeout is not None and args.timeout <= 0:
        raise CLIError(f"--timeout must be > 0, got {args.timeout}")
    roots = _read(args.tls_ca, "--tls-ca") if args.tls_ca else None
    pair = (_read(args.tls_cert, "--tls-cert"), _read(args.tls_key, "--tls-key")) if args.tls_cert else None
    return Connection(
        address=args.server,
        timeout=args.timeout,
        tls=bool(args.tls),
        root_certificates=roots,
        client_certificate=pair,
        token=_token(args),
    )
