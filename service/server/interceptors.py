"""The one server interceptor: request ids, authentication, error mapping, metrics and access logs.

Every RPC (ours, health, reflection, and servicers added later) passes through
:class:`ServiceInterceptor`:

* the request id comes from ``x-request-id`` metadata or is generated; it is put in the
  logging context and returned in trailing metadata;
* with an auth token configured, calls other than health checks (and those too with
  ``auth_health``) need ``authorization: Bearer <token>``, compared in constant time;
* a :class:`~cvserve.errors.ServiceError` becomes ``context.abort(err.code, err.message)``;
  anything else becomes ``INTERNAL, "internal error"``, its traceback logged and never sent;
* the status code and latency of every call are counted in :class:`~cvserve.metrics.Metrics`.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from cvserve.errors import ServiceError, UnauthenticatedError, status_of
from cvserve.logs import request_id_var
from cvserve.metrics import Metrics

__all__ = ["REQUEST_ID_KEY", "ServiceInterceptor"]

logger = logging.getLogger(__name__)
REQUEST_ID_KEY = "x-request-id"
_PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)  # probes carry no credentials


@dataclass
class _Call:
    method: str
    request_id: str
    started: float
    token: Any

    @property
    def trailing(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_KEY, self.request_id),)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RPC handler of the server.

    Args:
        metrics: where to count calls; None to skip.
        auth_token: the bearer token every non-health call must carry; None for no auth.
        auth_health: require the token for health checks too.
    """

    def __init__(
        self, metrics: Metrics | None = None, auth_token: str | None = None, *, auth_health: bool = False
    ) -> None:
        self._metrics = metrics
        # Compared as bytes with hmac.compare_digest: the time taken does not reveal the token.
        self._expected = None if auth_token is None else f"Bearer {auth_token}".encode()
        self._open_prefixes = () if auth_health else _PUBLIC_PREFIXES

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = tuple(handler_call_details.invocation_metadata or ())
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._wrap(behavior, method, metadata)})  # type: ignore[attr-defined]
        return handler

    def _wrap(self, behavior: Any, method: str, metadata: tuple[Any, ...]) -> Any:
        if inspect.isasyncgenfunction(behavior):

            async def stream_wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call = await self._begin(method, metadata, context)
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as e:
                    await self._fail(call, context, e)
                self._end(call, "OK")

            return stream_wrapper

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = await self._begin(method, metadata, context)
            try:
                result = await behavior(request, context)
            except BaseException as e:
                await self._fail(call, context, e)
            self._end(call, "OK")
            return result

        return wrapper

    async def _begin(
        self, method: str, metadata: tuple[Any, ...], context: grpc.aio.ServicerContext
    ) -> _Call:
        values = {
            m.key if hasattr(m, "key") else m[0]: m.value if hasattr(m, "value") else m[1] for m in metadata
        }
        request_id = str(values.get(REQUEST_ID_KEY) or uuid.uuid4().hex)[:128]
        call = _Call(method, request_id, time.perf_counter(), request_id_var.set(request_id))
        context.set_trailing_metadata(call.trailing)
        if self._expected is not None and not method.startswith(self._open_prefixes):
            given = str(values.get("authorization", ""))
            if not hmac.compare_digest(given.encode(), self._expected):
                await self._fail(call, context, UnauthenticatedError("missing or invalid bearer token"))
        return call

    async def _fail(self, call: _Call, context: grpc.aio.ServicerContext, error: BaseException) -> None:
        """Finish a failed call: abort with the mapped status (always raises)."""
        if isinstance(error, asyncio.CancelledError):
            self._end(call, "CANCELLED")
            raise error
        if isinstance(error, grpc.aio.AbortError):  # the handler aborted by itself
            code = context.code() if hasattr(context, "code") else None
            self._end(call, code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN")
            raise error
        code, message = status_of(error)
        if not isinstance(error, ServiceError):
            logger.error("unhandled error in %s", call.method, exc_info=error)
        self._end(call, code.name)
        await context.abort(code, message, trailing_metadata=call.trailing)

    def _end(self, call: _Call, code: str) -> None:
        elapsed = time.perf_counter() - call.started
        if self._metrics is not None:
            self._metrics.observe_request(call.method, code, elapsed)
        level = logging.DEBUG if call.method.startswith(_PUBLIC_PREFIXES) else logging.INFO
        logger.log(
            level,
            "%s %s %.1f ms",
            call.method,
            code,
            elapsed * 1000,
            extra={"method": call.method, "code": code, "ms": round(elapsed * 1000, 2)},
        )
        try:
            request_id_var.reset(call.token)
        except ValueError:  # reset from another context (a stream finished elsewhere)
            request_id_var.set("-")
