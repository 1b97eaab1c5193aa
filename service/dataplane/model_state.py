"""Plain records the data plane reports: model states, statuses, statistics, per-image outcomes.

Transport-neutral: both servicers (``cvserve.v1`` and the Open Inference Protocol)
read them. :mod:`cvserve.dataplane.plane` re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cvserve.dataplane.batcher import ItemTiming
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Prediction, Task

__all__ = ["Duration", "ModelState", "ModelStats", "ModelStatus", "Outcome"]


class ModelState:
    """Lifecycle states of a served model (string constants)."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


@dataclass
class Duration:
    """A count and the total seconds spent, as the Open Inference Protocol reports them."""

    count: int = 0
    total_s: float = 0.0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.total_s += seconds


@dataclass
class ModelStats:
    """Cumulative statistics of one model since it was (re)loaded.

    Attributes:
        success / failure: requests (images) that succeeded / failed, end-to-end time.
        queue: time images waited in the batch queue.
        compute_input / compute_infer / compute_output: preprocess, batched forward
            (one entry per batch) and postprocess.
        inference_count: images run through the model; execution_count: forward passes.
        last_inference_ms: wall-clock time of the last forward, milliseconds since epoch.
    """

    success: Duration = field(default_factory=Duration)
    failure: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of one model of the repository."""

    spec: ModelSpec
    state: str
    error: str = ""
    class_names: tuple[str, ...] = ()
    device: str = ""
    precision: str = ""  # the precision it runs at (``precision: auto`` resolved), once loaded

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def task(self) -> Task:
        return self.spec.task

    @property
    def ready(self) -> bool:
        return self.state == ModelState.READY


@dataclass(frozen=True)
class Outcome:
    """The result of one image: a prediction or the error it failed with, plus timing and the
    version of the model that ran it."""

    prediction: Prediction | None
    error: BaseException | None
    timing: ItemTiming
    version: str = ""
