"""Server configuration validation and the error-to-status mapping."""

from __future__ import annotations

import grpc
import pytest

from cvserve import errors
from cvserve.config import ServerConfig


def test_defaults_are_valid() -> None:
    config = ServerConfig()
    assert config.address == "[::]:8001" and config.max_message_bytes == 64 << 20


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"port": 70000}, "port"),
        ({"metrics_port": -1}, "metrics_port"),
        ({"max_message_bytes": 10}, "max_message_bytes"),
        ({"worker_threads": 0}, "worker_threads"),
        ({"grace_period_s": -1}, "grace_period_s"),
        ({"log_format": "xml"}, "log_format"),
        ({"tls_cert_file": "cert.pem"}, "tls_key_file"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"ServerConfig.{field}"):
        ServerConfig(**kwargs)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidImageError, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ImageTooLargeError, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.InvalidOptionError, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.WrongTaskError, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
        (errors.VersionNotFoundError, grpc.StatusCode.NOT_FOUND),
        (errors.ModelNotReadyError, grpc.StatusCode.UNAVAILABLE),
        (errors.ServerDrainingError, grpc.StatusCode.UNAVAILABLE),
        (errors.QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    ],
)
def test_each_error_carries_its_status(error: type[errors.ServiceError], code: grpc.StatusCode) -> None:
    assert errors.status_of(error("what went wrong")) == (code, "what went wrong")


def test_unknown_errors_hide_their_message() -> None:
    assert errors.status_of(KeyError("/secret/path")) == (grpc.StatusCode.INTERNAL, "internal error")
