"""Assemble and run the gRPC server: our API, health, reflection, metrics and graceful shutdown.

``build_server`` wires a :class:`~cvserve.dataplane.plane.DataPlane` into a ``grpc.aio`` server
with ``cvserve.v1.VisionService``, the standard ``grpc.health.v1.Health`` (overall ``""``
and one entry per model name), server reflection and the request interceptor. Other
servicers (e.g. the Open Inference Protocol) join through ``servicers``: callables
``add(grpc_server, dataplane) -> service names`` that register themselves and return the
full names of their services for reflection and health.

``run_server`` is what ``cvserve serve`` calls; :class:`ServerThread` runs a server on a
background event loop for tests and for embedding in synchronous programs.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve.config import ServerConfig
from cvserve.dataplane.plane import DataPlane
from cvserve.imaging import set_decoder_pixel_limit
from cvserve.metrics import Metrics
from cvserve.models.repository import ModelSpec
from cvserve.server.interceptors import ServiceInterceptor
from cvserve.vision.servicer import SERVICE_NAME, VisionServicer

__all__ = ["AddServicer", "Server", "ServerThread", "build_server", "run_server"]

logger = logging.getLogger(__name__)

AddServicer = Callable[[grpc.aio.Server, DataPlane], Iterable[str]]
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Server:
    """A built server; :meth:`start` it, then :meth:`stop` it.

    Attributes:
        grpc_server: the underlying ``grpc.aio.Server``.
        dataplane: the models it serves.
        port: the bound gRPC port.
        metrics_port: the bound metrics HTTP port once started (None when disabled).
    """

    grpc_server: grpc.aio.Server
    dataplane: DataPlane
    health: Any
    metrics: Metrics
    config: ServerConfig
    port: int
    service_names: tuple[str, ...]
    metrics_port: int | None = None
    _metrics_http: Any = field(default=None, repr=False)

    async def start(self) -> None:
        """Start answering (health says NOT_SERVING) and load the models in the background."""
        self.dataplane.add_listener(self._update_health)
        await self._update_health()
        await self.grpc_server.start()
        if self.config.metrics_port is not None:
            self._metrics_http, self.metrics_port = self.metrics.serve_http(
                self.config.metrics_port, self.config.metrics_host
            )
        await self.dataplane.start()
        logger.info("serving on port %d", self.port)

    async def _update_health(self) -> None:
        dp = self.dataplane
        for status in dp.models():
            await self.health.set(status.name, _SERVING if dp.is_ready(status.name) else _NOT_SERVING)
        overall = dp.server_ready()
        for service in ("", *self.service_names):
            await self.health.set(service, _SERVING if overall else _NOT_SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting calls, let accepted ones finish for up to ``grace_s``, free everything."""
        grace = self.config.grace_period_s if grace_s is None else grace_s
        logger.info("shutting down (grace period %.1f s)", grace)
        await self.health.enter_graceful_shutdown()
        drain = asyncio.create_task(self.dataplane.drain(grace))
        await self.grpc_server.stop(grace)
        await drain
        await self.dataplane.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials; with a client CA, clients without a certificate it signed are refused."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    key, cert = Path(config.tls_key_file).read_bytes(), Path(config.tls_cert_file).read_bytes()
    if config.tls_client_ca_file is None:
        return grpc.ssl_server_credentials([(key, cert)])
    client_ca = Path(config.tls_client_ca_file).read_bytes()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=True)


def _bind(grpc_server: grpc.aio.Server, address: str, config: ServerConfig) -> int:
    credentials = _credentials(config)
    try:
        if credentials is None:
            port = grpc_server.add_insecure_port(address)
        else:
            port = grpc_server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise RuntimeError(f"cannot bind gRPC server to {address}: {e}") from None
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC server to {address}")
    return int(port)


def build_server(
    config: ServerConfig,
    specs_or_dataplane: Sequence[ModelSpec] | DataPlane,
    address: str | None = None,
    *,
    servicers: Sequence[AddServicer] = (),
    metrics: Metrics | None = None,
) -> tuple[Server, int]:
    """Build (not start) a server; call from inside the event loop that will run it.

    Args:
        config: server settings.
        specs_or_dataplane: the models to serve, as specs or a ready-made data plane.
        address: ``host:port`` to bind (``"127.0.0.1:0"`` picks a free port); default
            ``config.address``.
        servicers: extra ``add(grpc_server, dataplane) -> service names`` callables.
        metrics: metrics to feed (a new registry by default).

    Returns:
        The server and the port it bound.

    Raises:
        RuntimeError: the address cannot be bound.
    """
    metrics = metrics or Metrics()
    if isinstance(specs_or_dataplane, DataPlane):
        dataplane = specs_or_dataplane
    else:
        dataplane = DataPlane(specs_or_dataplane, config, metrics=metrics)
    grpc_server = grpc.aio.server(
        interceptors=[ServiceInterceptor(metrics, config.auth_token, auth_health=config.auth_health)],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_VisionServiceServicer_to_server(VisionServicer(dataplane, config), grpc_server)
    names = [SERVICE_NAME]
    for add in servicers:
        names.extend(add(grpc_server, dataplane))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], grpc_server)
    port = _bind(grpc_server, address or config.address, config)
    server = Server(grpc_server, dataplane, health_servicer, metrics, config, port, tuple(names))
    return server, port


async def run_server(
    config: ServerConfig, specs: Sequence[ModelSpec], *, servicers: Sequence[AddServicer] = ()
) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully. Returns an exit code."""
    # Process-wide PIL setting, so only the serving process (not build_server) changes it.
    set_decoder_pixel_limit(config.max_image_pixels)
    server, _ = build_server(config, specs, servicers=servicers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    await server.stop()
    logger.info("stopped")
    return 0


class ServerThread:
    """A server on its own event loop in a daemon thread, for tests and synchronous code.

    Use as a context manager::

        with ServerThread(config, specs).start(wait_loaded=True) as srv:
            client = Client(srv.address)
    """

    def __init__(
        self,
        config: ServerConfig,
        specs_or_dataplane: Sequence[ModelSpec] | DataPlane,
        address: str = "127.0.0.1:0",
        *,
        servicers: Sequence[AddServicer] = (),
    ) -> None:
        self._args = (config, specs_or_dataplane, address, servicers)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cvserve-server", daemon=True)
        self.server: Server | None = None

    def run(self, coro: Any, timeout: float | None = 30) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, wait_loaded: bool = False, timeout: float = 60) -> ServerThread:
        """Start the server; with ``wait_loaded``, also wait until no model is loading."""
        self._thread.start()
        config, specs, address, servicers = self._args

        async def build_and_start() -> Server:
            server, _ = build_server(config, specs, address, servicers=servicers)
            await server.start()
            return server

        self.server = self.run(build_and_start(), timeout)
        if wait_loaded:
            self.run(self.dataplane.wait_loaded(timeout), timeout)
        return self

    @property
    def dataplane(self) -> DataPlane:
        assert self.server is not None, "start() first"
        return self.server.dataplane

    @property
    def port(self) -> int:
        assert self.server is not None, "start() first"
        return self.server.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop the server gracefully and the loop thread."""
        if self.server is not None:
            self.run(self.server.stop(grace_s), grace_s + 30)
            self.server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
