"""Runtime settings of the server, as frozen dataclasses built once in ``main``.

Nothing here reads flags or the environment at import time: the ``serve`` command
builds a :class:`ServerConfig` from its arguments and passes it down explicitly.
Model-specific settings (batching limits, device, precision) live in each model's
:class:`~cvserve.models.repository.ModelSpec` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_MESSAGE_BYTES", "LOG_FORMATS", "ServerConfig"]

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
# 40 Mpx: a 7,000 x 5,700 photo; a decoded RGB image of that size is 120 MB.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ServerConfig:
    """How the gRPC server runs.

    Attributes:
        host: interface to bind, e.g. ``[::]`` (all) or ``127.0.0.1``.
        port: gRPC port; 0 picks a free one.
        metrics_port: Prometheus HTTP port; 0 picks a free one, None disables it.
        metrics_host: interface the metrics endpoint binds.
        max_message_bytes: largest request or response message.
        max_image_pixels: largest image (height x width) accepted; checked from the
            header before decoding.
        worker_threads: size of the shared pool that decodes, pre- and post-processes
            and encodes (model forwards run on one thread per model instead).
        grace_period_s: on SIGTERM/SIGINT, how long in-flight requests get to finish.
        log_format: ``text`` or ``json`` (one JSON object per line).
        warmup: run a synthetic image through each model before reporting it ready.
        warmup_image_size: side of the square warm-up images (a full batch of them runs).
        scaled_decode: decode a JPEG larger than the model's input at 1/2, 1/4 or 1/8 scale
            (libjpeg's DCT scaling), never below the input size; predictions stay in the
            image's own pixels.
        max_stream_inflight: most items of one stream processed concurrently.
        tls_cert_file: PEM certificate chain; with ``tls_key_file`` serves TLS.
        tls_key_file: PEM private key.
        tls_client_ca_file: PEM CA certificates; when set (with TLS), clients must present
            a certificate signed by one of them (mutual TLS).
        auth_token: when set, every RPC but health checks must carry
            ``authorization: Bearer <token>`` metadata.
        auth_health: also require the token for ``grpc.health.v1.Health`` (by default
            probes stay open: they carry no credentials and reveal only serving status).
        poll_repository_s: re-read the repository file this often and apply its changes
            (Triton's poll mode); None: only on request (load RPCs, SIGHUP).
    """

    host: str = "[::]"
    port: int = 8001
    metrics_port: int | None = 9090
    metrics_host: str = "0.0.0.0"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    worker_threads: int = 4
    grace_period_s: float = 10.0
    log_format: str = "text"
    warmup: bool = True
    warmup_image_size: int = 512
    scaled_decode: bool = True
    max_stream_inflight: int = 32
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    auth_token: str | None = None
    auth_health: bool = False
    poll_repository_s: float | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, what: str) -> None:
            if not ok:
                raise ValueError(f"ServerConfig.{field}: must be {what}, got {getattr(self, field)!r}")

        check(0 <= self.port <= 65535, "port", "in 0..65535")
        check(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port", "in 0..65535")
        check(self.max_message_bytes >= 1024, "max_message_bytes", ">= 1024")
        check(self.max_image_pixels >= 1, "max_image_pixels", ">= 1")
        check(self.worker_threads >= 1, "worker_threads", ">= 1")
        check(self.grace_period_s >= 0, "grace_period_s", ">= 0")
        check(self.log_format in LOG_FORMATS, "log_format", f"one of {', '.join(LOG_FORMATS)}")
        check(self.warmup_image_size >= 8, "warmup_image_size", ">= 8")
        check(self.max_stream_inflight >= 1, "max_stream_inflight", ">= 1")
        check(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "tls_key_file",
            "given together with tls_cert_file",
        )
        check(
            self.tls_client_ca_file is None or self.tls_cert_file is not None,
            "tls_client_ca_file",
            "given only with tls_cert_file and tls_key_file (mutual TLS needs TLS)",
        )
        check(self.auth_token is None or bool(self.auth_token), "auth_token", "non-empty when set")
        check(
            self.poll_repository_s is None or self.poll_repository_s > 0, "poll_repository_s", "> 0 when set"
        )

    @property
    def address(self) -> str:
        """``host:port`` to bind the gRPC server to."""
        return f"{self.host}:{self.port}"
