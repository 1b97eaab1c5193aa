"""Prometheus metrics of the service, on a registry of their own (one per server).

A private :class:`~prometheus_client.CollectorRegistry` rather than the global one lets
several servers live in one process (tests) without clashing registrations.

Per-model series carry Triton's two labels, ``model`` and ``version``: the served version
the image ran on (each version of a model is a model of its own to the batcher).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["STAGES", "Metrics"]

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
# Where an image's time goes on its way through the server, in order.
STAGES = ("decode", "preprocess", "queue", "inference", "postprocess", "encode")


class Metrics:
    """The service's counters, histograms and gauges.

    Attributes:
        registry: the registry all of them live in (serve it with :meth:`serve_http`).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        model = ["model", "version"]

        def histogram(
            name: str, doc: str, labels: list[str], buckets: Sequence[float] = _LATENCY_BUCKETS
        ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.requests = Counter(
            "cvserve_requests", "RPCs handled, by method and status code", ["method", "code"], registry=r
        )
        self.request_latency = histogram(
            "cvserve_request_latency_seconds", "Total time to handle an RPC, by method", ["method"]
        )
        self.inferences = Counter(
            "cvserve_inferences",
            "Images inferred, by model and outcome (ok / error)",
            [*model, "outcome"],
            registry=r,
        )
        self.queue_latency = histogram(
            "cvserve_queue_latency_seconds", "Time an image waited in its model's batch queue", model
        )
        self.inference_latency = histogram(
            "cvserve_inference_latency_seconds", "Duration of one batched forward pass", model
        )
        self.batch_size = histogram("cvserve_batch_size", "Images per forward pass", model, _BATCH_BUCKETS)
        self.queue_depth = Gauge(
            "cvserve_queue_depth", "Images waiting in a model's batch queue", model, registry=r
        )
        self.model_ready = Gauge("cvserve_model_ready", "1 when the model serves, else 0", model, registry=r)
        self.stage_latency = histogram(
            "cvserve_stage_seconds",
            "Per-image time in each stage (decode, preprocess, queue, inference, postprocess, encode)",
            [*model, "stage"],
        )
        self.max_batch_size = Gauge(
            "cvserve_max_batch_size",
            "Largest batch the model's batcher forms; policy=auto when measured at warm-up",
            [*model, "policy"],
            registry=r,
        )
        self.instances = Gauge(
            "cvserve_model_instances",
            "Batches a model runs at once on each device (Triton's instance_group)",
            [*model, "device"],
            registry=r,
        )
        self._devices: dict[tuple[str, str], tuple[str, ...]] = {}  # instances published, to forget
        self.device_batches = Counter(
            "cvserve_device_batches",
            "Forward passes run, by model and device",
            [*model, "device"],
            registry=r,
        )

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """Count one finished RPC."""
        self.requests.labels(method, code).inc()
        self.request_latency.labels(method).observe(seconds)

    def observe_batch(
        self,
        model: str,
        version: str,
        size: int,
        queue_s: tuple[float, ...],
        compute_s: float,
        failed: bool,
    ) -> None:
        """Record one executed batch of ``model`` at ``version``."""
        self.batch_size.labels(model, version).observe(size)
        self.inference_latency.labels(model, version).observe(compute_s)
        queue = self.queue_latency.labels(model, version)
        queue_stage = self.stage_latency.labels(model, version, "queue")
        inference_stage = self.stage_latency.labels(model, version, "inference")
        for q in queue_s:
            queue.observe(q)
            queue_stage.observe(q)
            # The forward's cost shared by the images of the batch: stages then add up per image.
            inference_stage.observe(compute_s / size)
        self.inferences.labels(model, version, "error" if failed else "ok").inc(size)

    def observe_stage(self, model: str, version: str, stage: str, seconds: float) -> None:
        """Record the time one image spent in ``stage`` (one of :data:`STAGES`)."""
        self.stage_latency.labels(model, version, stage).observe(seconds)

    def set_max_batch_size(self, model: str, version: str, size: int, policy: str) -> None:
        """Publish the batch size ``model`` runs with and how it was chosen (``auto`` / ``fixed``)."""
        self.max_batch_size.labels(model, version, policy).set(size)

    def set_instances(self, model: str, version: str, devices: tuple[str, ...], per_device: int) -> None:
        """Publish where ``model``'s copies run and how many batches each runs at once."""
        for device in devices:
            self.instances.labels(model, version, device).set(per_device)
        self._devices[(model, version)] = devices

    def observe_device_batch(self, model: str, version: str, device: str) -> None:
        """Count one forward pass of ``model`` on ``device``."""
        self.device_batches.labels(model, version, device).inc()

    def track_queue_depth(self, model: str, version: str, depth: Callable[[], float]) -> None:
        """Read the queue depth of ``model`` at ``version`` from ``depth()`` at every scrape."""
        self.queue_depth.labels(model, version).set_function(depth)

    def set_ready(self, model: str, version: str, ready: bool) -> None:
        self.model_ready.labels(model, version).set(1 if ready else 0)

    def forget_version(self, model: str, version: str) -> None:
        """Drop the gauges of a version no longer served (counters and histograms stay)."""
        for gauge in (self.queue_depth, self.model_ready):
            with contextlib.suppress(KeyError):  # never published
                gauge.remove(model, version)
        for policy in ("auto", "fixed"):
            with contextlib.suppress(KeyError):
                self.max_batch_size.remove(model, version, policy)
        for device in self._devices.pop((model, version), ()):
            with contextlib.suppress(KeyError):
                self.instances.remove(model, version, device)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> tuple[Any, int]:
        """Serve ``/metrics`` over HTTP in a daemon thread.

        Returns:
            The HTTP server (call ``shutdown()`` to stop it) and the port it bound.
        """
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return server, bound
