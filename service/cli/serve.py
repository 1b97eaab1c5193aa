"""``cvserve serve``: serve a model repository over gRPC until SIGTERM / SIGINT."""

from __future__ import annotations

import argparse
import logging
import os

from cvserve.config import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_MESSAGE_BYTES, LOG_FORMATS, ServerConfig

HELP = "serve a model repository over gRPC (health, reflection, Prometheus metrics)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", help="model repository YAML (default: the demo repository, built if missing)"
    )
    parser.add_argument(
        "--poll-repository",
        type=float,
        metavar="SECONDS",
        help="re-read the repository file every SECONDS and apply its changes: new entries load, "
        "changed ones reload without a failed request, removed ones unload (default: only on "
        "SIGHUP and the load RPCs)",
    )
    # Defaults come from ServerConfig, so the flags and the library never disagree.
    _add_listening(parser.add_argument_group("listening"))
    _add_limits(parser.add_argument_group("limits and tuning"))
    _add_security(parser.add_argument_group("security"))


def _add_listening(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--host", default=ServerConfig.host, help="interface to bind (default: %(default)s)")
    parser.add_argument(
        "--port",
        type=int,
        default=ServerConfig.port,
        help="gRPC port, 0 for any free one (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=ServerConfig.metrics_port,
        help="Prometheus /metrics HTTP port (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-host",
        default=ServerConfig.metrics_host,
        help="interface of the metrics endpoint, which has no authentication (default: %(default)s)",
    )
    parser.add_argument("--no-metrics", action="store_true", help="do not serve Prometheus metrics")
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, default=ServerConfig.log_format, help="log lines format"
    )


def _add_limits(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--max-message-mb",
        type=float,
        default=DEFAULT_MAX_MESSAGE_BYTES >> 20,
        help="largest gRPC message, MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="largest image, height x width (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=ServerConfig.worker_threads,
        help="decode / pre- / post-processing threads (default: %(default)s)",
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=ServerConfig.grace_period_s,
        help="seconds in-flight requests get on shutdown (default: %(default)g)",
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="mark models ready without a warm-up inference"
    )
    parser.add_argument(
        "--full-decode",
        action="store_true",
        help="decode every JPEG at full size (by default one larger than the model's input is decoded "
        "at 1/2, 1/4 or 1/8 scale, never below the input size)",
    )
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc's malloc thresholds alone (by default raised so each request reuses the "
        "memory the previous one freed instead of mapping fresh pages; see service/server/allocator.py)",
    )


def _add_security(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--tls-cert", help="PEM certificate chain (serves TLS with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key")
    parser.add_argument(
        "--tls-client-ca",
        help="PEM CA certificates: require clients to present a certificate they signed (mutual TLS)",
    )
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument(
        "--auth-token-file",
        metavar="PATH",
        help="require 'authorization: Bearer <token>' with the token read from PATH (mode 600)",
    )
    auth.add_argument(
        "--auth-token-env",
        metavar="VAR",
        help="require 'authorization: Bearer <token>' with the token read from environment variable VAR",
    )
    parser.add_argument(
        "--auth-health", action="store_true", help="require the token for health checks too (default: open)"
    )


# ServerConfig field -> the flag that sets it, for error messages.
_FLAGS = {
    "port": "--port",
    "metrics_port": "--metrics-port",
    "max_message_bytes": "--max-message-mb",
    "max_image_pixels": "--max-image-pixels",
    "worker_threads": "--workers",
    "grace_period_s": "--grace-period",
    "tls_key_file": "--tls-key",
    "tls_client_ca_file": "--tls-client-ca",
    "poll_repository_s": "--poll-repository",
}


def _repository(path: str | None) -> str:
    import sys

    from cvserve.cli.common import CLIError

    if path:
        return path
    try:
        from cvserve.models.demo.build import ensure_demo_repository
    except ModuleNotFoundError as e:
        if e.name != "cvserve.models.demo.build":
            raise
        raise CLIError(
            "no --models given and the demo repository builder (models.demo) is not available; "
            "pass --models path/to/models.yaml"
        ) from None
    try:
        return str(ensure_demo_repository(progress=lambda line: print(line, file=sys.stderr)))
    except OSError as e:  # e.g. FileExistsError: a non-empty directory that is not a repository
        raise CLIError(
            f"cannot prepare the demo repository: {e}; pass --models path/to/models.yaml"
        ) from None


def _token(args: argparse.Namespace) -> str | None:
    from cvserve.cli.common import CLIError
    from cvserve.server.auth import CredentialFileError, read_token_file

    if args.auth_token_file:
        try:
            return read_token_file(args.auth_token_file)
        except CredentialFileError as e:
            raise CLIError(f"--auth-token-file: {e}") from None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env, "").strip()
        if not token:
            raise CLIError(f"--auth-token-env: environment variable {args.auth_token_env} is empty or unset")
        return token
    if args.auth_health:
        raise CLIError("--auth-health: needs --auth-token-file or --auth-token-env")
    return None


def _config(args: argparse.Namespace) -> ServerConfig:
    from cvserve.cli.common import CLIError
    from cvserve.server.auth import CredentialFileError, check_readable

    token = _token(args)
    for flag, path in (
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--tls-client-ca", args.tls_client_ca),
    ):
        if path is not None:
            try:
                check_readable(path, "file")
            except CredentialFileError as e:
                raise CLIError(f"{flag}: {e}") from None
    try:
        return ServerConfig(
            host=args.host,
            port=args.port,
            metrics_port=None if args.no_metrics else args.metrics_port,
            metrics_host=args.metrics_host,
            max_message_bytes=int(args.max_message_mb * (1 << 20)),
            max_image_pixels=args.max_image_pixels,
            worker_threads=args.workers,
            grace_period_s=args.grace_period,
            log_format=args.log_format,
            warmup=not args.no_warmup,
            scaled_decode=not args.full_decode,
            tls_cert_file=args.tls_cert,
            tls_key_file=args.tls_key,
            tls_client_ca_file=args.tls_client_ca,
            auth_token=token,
            auth_health=args.auth_health,
            poll_repository_s=args.poll_repository,
        )
    except ValueError as e:
        message = str(e)
        for field, flag in _FLAGS.items():
            message = message.replace(f"ServerConfig.{field}:", f"{flag}:")
        raise CLIError(message) from None


def run(args: argparse.Namespace) -> int:
    import asyncio

    from cvserve.cli.common import CLIError
    from cvserve.kserve.servicer import add_kserve_servicer
    from cvserve.logs import configure_logging
    from cvserve.models.repository import RepositoryError, load_repository
    from cvserve.server.build import run_server

    # Logging first: reading the token file may warn about its permissions.
    configure_logging(getattr(args, "log_level", "INFO"), args.log_format)
    config = _config(args)
    if not args.no_malloc_tuning:
        from cvserve.server.allocator import keep_freed_memory

        if not keep_freed_memory():
            logging.getLogger(__name__).info(
                "malloc tuning not applied (not glibc, or refused); using defaults"
            )
    from cvserve.models.device import warn_if_cuda_unusable

    warn_if_cuda_unusable()  # "CUDA present but unusable: driver X, this torch needs >= Y"
    from cvserve.models.threads import limit_helper_thread

    # The event loop's thread runs no forward pass: an OpenMP team of its own would only
    # slow the passes (cvserve.models.threads, "Idle teams").
    limit_helper_thread()
    repository = _repository(args.models)
    try:
        specs = load_repository(repository)
    except RepositoryError as e:
        raise CLIError(str(e)) from None
    try:
        servicers = [add_kserve_servicer]  # the Open Inference Protocol beside cvserve.v1
        return asyncio.run(run_server(config, specs, servicers=servicers, repository=repository))
    except RuntimeError as e:
        if "cannot bind" in str(e):
            raise CLIError(str(e)) from None
        raise
