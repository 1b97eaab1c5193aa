"""One exception class per failure the service reports, each with its gRPC status code.

Code anywhere below the servicer raises these; a single interceptor
(:mod:`cvserve.server.interceptors`) turns them into ``context.abort(err.code, err.message)``.
Any other exception becomes ``INTERNAL, "internal error"`` with its traceback logged,
never sent. The stream RPC uses :func:`status_of` to report per-item failures the same way.
"""

from __future__ import annotations

import grpc

__all__ = [
    "DeadlineExceededError",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidOptionError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "NotSupportedError",
    "QueueFullError",
    "ServerDrainingError",
    "ServiceError",
    "UnauthenticatedError",
    "VersionNotFoundError",
    "WrongTaskError",
    "status_of",
]

INTERNAL_MESSAGE = "internal error"


class ServiceError(Exception):
    """Base of every failure reported to clients with a specific status code.

    Attributes:
        code: the gRPC status the failure maps to.
        message: what went wrong, safe to send to the client.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidImageError(ServiceError):
    """The image cannot be decoded, has an unsupported format or a wrong shape."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ImageTooLargeError(ServiceError):
    """The image has more pixels than the server accepts."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidOptionError(ServiceError):
    """A request option is out of range or unknown (threshold, class, mask format ...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class WrongTaskError(ServiceError):
    """The model does not do what the RPC asks (e.g. ``Detect`` on a semantic model)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFoundError(ServiceError):
    """No model of that name is in the repository."""

    code = grpc.StatusCode.NOT_FOUND


class VersionNotFoundError(ServiceError):
    """The model exists but not in the requested version."""

    code = grpc.StatusCode.NOT_FOUND


class ModelNotReadyError(ServiceError):
    """The model is loading, failed to load or was unloaded."""

    code = grpc.StatusCode.UNAVAILABLE


class ServerDrainingError(ServiceError):
    """The server is shutting down and accepts no new work."""

    code = grpc.StatusCode.UNAVAILABLE


class QueueFullError(ServiceError):
    """The model's batch queue is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(ServiceError):
    """The request's deadline passed while it waited in the queue; its work was skipped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ModelLoadError(ServiceError):
    """Loading a model at run time failed."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnauthenticatedError(ServiceError):
    """The call carries no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class NotSupportedError(ServiceError):
    """The call needs a feature cvserve does not implement (e.g. a Triton extension)."""

    code = grpc.StatusCode.UNIMPLEMENTED


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message for ``error``.

    Unknown exceptions map to ``INTERNAL, "internal error"``: their text may hold
    paths or internals, so it is logged by the caller and never sent.
    """
    if isinstance(error, ServiceError):
        return error.code, error.message
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
