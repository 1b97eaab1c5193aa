"""Predictors: run annotation batches in-process or against a cvserve server.

A :class:`Predictor` maps batches of :class:`WorkItem` to journal records and yields
each batch's records as soon as it completes, in any order. The in-process and server
predictors run batches in a thread pool; the Ray predictor (``cvserve.annotation.ray_engine``)
runs them on a pool of Ray actors.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cvserve.annotation.worker import LoadedImage, RenderOptions, WorkItem, process_batch
from cvserve.imaging import Needed
from cvserve.models.base import VisionModel
from cvserve.models.types import Prediction, Task

__all__ = [
    "LocalPredictor",
    "ModelInfo",
    "Predictor",
    "PredictorError",
    "ServerPredictor",
    "ThreadedPredictor",
]

logger = logging.getLogger(__name__)


class PredictorError(RuntimeError):
    """The model or server cannot serve the job (not per image): the run stops, finished
    batches stay in the journal, and a rerun resumes."""


@dataclass(frozen=True)
class ModelInfo:
    """What annotation needs to know about a model."""

    name: str
    task: Task
    class_names: tuple[str, ...]


class Predictor(abc.ABC):
    """Annotates batches of images with one model. Use as a context manager."""

    info: ModelInfo
    # The model's input size for reduced-scale JPEG decoding (see worker.read_image); None: in full.
    decode_hint: Needed | None = None

    @abc.abstractmethod
    def map_batches(
        self, batches: Iterable[Sequence[WorkItem]], render: RenderOptions
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield the journal records of each batch as it completes (in any order).

        Raises:
            Exception: anything that should stop the run (the model or server is
                unusable); per-image problems become ``error`` records instead.
        """

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release resources (threads, connections, actors)."""

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ThreadedPredictor(Predictor):
    """Runs batches in a thread pool, a bounded number in flight, so reading and decoding
    overlap with inference; subclasses say how a batch of decoded images is predicted."""

    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency

    @abc.abstractmethod
    def predict(self, images: Sequence[LoadedImage]) -> list[Prediction | Exception]:
        """One prediction or per-image exception per image; raise to stop the run."""

    def map_batches(
        self, batches: Iterable[Sequence[WorkItem]], render: RenderOptions
    ) -> Iterator[list[dict[str, Any]]]:
        pending: set[cf.Future[list[dict[str, Any]]]] = set()
        batch_iter = iter(batches)
        with cf.ThreadPoolExecutor(self.concurrency, thread_name_prefix="annotate") as pool:
            try:
                while True:
                    # Keep every worker busy plus one batch queued behind each.
                    while len(pending) < 2 * self.concurrency:
                        batch = next(batch_iter, None)
                        if batch is None:
                            break
                        pending.add(pool.submit(process_batch, batch, self.predict, render, self.decode_hint))
                    if not pending:
                        return
                    finished, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for future in finished:
                        yield future.result()
            finally:
                for future in pending:
                    future.cancel()


class LocalPredictor(ThreadedPredictor):
    """Runs a loaded :class:`VisionModel` in this process.

    Each forward pass takes at most ``max_batch_size`` images, whatever the size of the
    annotation batch (the unit of journal writes), one pass at a time. A pass that fails
    as a whole is retried image by image, so one bad image fails alone (a failure that
    persists fails every image of the pass).

    Args:
        model: a loaded model.
        concurrency: batches in flight; the others are read and decoded meanwhile.
        max_batch_size: most images per forward pass (None: the whole batch).
        scaled_decode: decode a JPEG larger than the model's input at a reduced scale, as the
            server does by default (its ``--full-decode`` turns that off).
    """

    def __init__(
        self,
        model: VisionModel,
        concurrency: int = 2,
        max_batch_size: int | None = None,
        scaled_decode: bool = False,
    ) -> None:
        super().__init__(concurrency)
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.decode_hint = model.input_size if scaled_decode else None
        self.info = ModelInfo(model.name, model.task, tuple(model.class_names))
        self._lock = threading.Lock()  # models are not required to be thread-safe

    @classmethod
    def from_repository(
        cls, repository: str, name: str, concurrency: int = 2, scaled_decode: bool = True
    ) -> LocalPredictor:
        """Build and load model ``name`` of a repository YAML, batching as its spec says (``auto``: measured).

        Raises:
            models.repository.RepositoryError: the file is invalid.
            KeyError: the repository has no model ``name``.
        """
        from cvserve.models.batching import load_for_inference
        from cvserve.models.repository import load_repository

        specs = {s.name: s for s in load_repository(repository)}
        if name not in specs:
            raise KeyError(f"{repository}: no model named {name!r} (available: {', '.join(sorted(specs))})")
        model, spec = load_for_inference(specs[name])
        return cls(model, concurrency, spec.max_batch_size, scaled_decode)

    def _forward(self, images: Sequence[LoadedImage]) -> list[Prediction | Exception]:
        arrays = [img.array for img in images]
        try:
            with self._lock:
                return list(self.model.predict_batch(arrays))
        except Exception as e:
            if len(arrays) == 1:
                logger.warning("%s: model failed: %s", images[0].item.path, e)
                return [e]
            logger.warning("a batch of %d failed (%s); retrying image by image", len(arrays), e)
        results: list[Prediction | Exception] = []
        for img in images:
            results.extend(self._forward([img]))
        return results

    def predict(self, images: Sequence[LoadedImage]) -> list[Prediction | Exception]:
        step = self.max_batch_size or max(1, len(images))
        results: list[Prediction | Exception] = []
        for start in range(0, len(images), step):
            results.extend(self._forward(images[start : start + step]))
        return results


def _code_name(error: Exception) -> str:
    code = getattr(error, "code", None)
    code = code() if callable(code) else code
    return str(getattr(code, "name", code) or "UNKNOWN").upper()


def _image_out_of_memory(error: Exception) -> bool:
    """Whether the server refused one image as too large for its memory (not a full queue)."""
    return "out of memory" in str(getattr(error, "message", "") or error)


class ServerPredictor(ThreadedPredictor):
    """Sends images to a cvserve server, ``concurrency`` requests in flight; the server
    batches them. Overload and transient unavailability are retried with backoff; an
    image the server rejects as invalid fails alone, and so does one that still runs out
    of the server's memory by itself after the retries; anything else stops the run.
    """

    PER_IMAGE_CODES = frozenset({"INVALID_ARGUMENT"})
    RETRY_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"})

    def __init__(
        self,
        address: str,
        model: str,
        *,
        concurrency: int = 4,
        timeout: float | None = 60.0,
        root_certificates: bytes | None = None,
        token: str | None = None,
        retries: int = 5,
        client: Any = None,
    ) -> None:
        super().__init__(concurrency)
        if client is None:
            from cvserve.client.client import Client

            client = Client(address, timeout=timeout, root_certificates=root_certificates, token=token)
        self.client = client
        self.address = address
        self.model_name = model
        self.retries = retries
        meta = self._wait_ready(timeout or 60.0)
        try:
            self.info = ModelInfo(model, Task(meta["task"]), tuple(meta["class_names"]))
        except ValueError:
            raise PredictorError(f"{address}: model {model!r} has unknown task {meta['task']!r}") from None

    def _wait_ready(self, timeout: float) -> dict[str, Any]:
        """The model's metadata once it is ready; a model still loading is waited for."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                meta: dict[str, Any] = self.client.get_model(self.model_name)
            except Exception as e:
                raise PredictorError(f"{self.address}: model {self.model_name!r}: {e}") from None
            state = meta.get("state", "ready")
            if meta.get("ready", True) or state not in ("loading", "unspecified"):
                break
            if time.monotonic() > deadline:
                raise PredictorError(
                    f"{self.address}: model {self.model_name!r} still loading after {timeout:.0f} s"
                )
            time.sleep(0.5)
        if not meta.get("ready", True):
            reason = meta.get("error") or state
            raise PredictorError(f"{self.address}: model {self.model_name!r} is not ready ({reason})")
        return meta

    def _predict_one(self, image: LoadedImage) -> Prediction | Exception:
        for attempt in range(self.retries + 1):
            try:
                # The encoded file is much smaller on the wire than the decoded array.
                return self.client.predict(image.data, model=self.model_name)  # type: ignore[no-any-return]
            except Exception as e:
                code = _code_name(e)
                if code in self.PER_IMAGE_CODES:
                    return e
                if code not in self.RETRY_CODES or attempt == self.retries:
                    if code == "RESOURCE_EXHAUSTED" and _image_out_of_memory(e):
                        return e  # this image does not fit on the server's device: skip it alone
                    raise PredictorError(
                        f"{self.address}: {e} (finished images are kept; rerun the same command to resume)"
                    ) from e
                delay = min(5.0, 0.1 * 2**attempt)
                logger.warning("%s: %s (%s); retrying in %.1f s", image.item.path, code, e, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def predict(self, images: Sequence[LoadedImage]) -> list[Prediction | Exception]:
        return [self._predict_one(img) for img in images]

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if callable(close):
            close()
