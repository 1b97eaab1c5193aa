"""Monitoring a training run: progress lines, best-checkpoint selection, early stopping."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["DEFAULT_METRICS", "ProgressLog", "Selection"]

logger = logging.getLogger("cvserve.models.training.engine")

DEFAULT_METRICS = ("segm/AP", "bbox/AP", "sem_seg/mIoU")


@dataclass
class Selection:
    """Best-checkpoint selection and early stopping.

    Attributes:
        metric: the metric to maximise; empty picks the first of ``segm/AP``,
            ``bbox/AP``, ``sem_seg/mIoU`` the first evaluation reports.
        patience: evaluations without improvement before stopping, 0 = never.
        best: the best value so far.
        stale: evaluations since the last improvement.
    """

    metric: str
    patience: int
    best: float | None = None
    stale: int = 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True if it is the best so far."""
        if not self.metric:
            self.metric = next((m for m in DEFAULT_METRICS if m in metrics), "")
        if self.metric not in metrics:
            raise ValueError(
                f"early-stop metric {self.metric!r} is not reported by the evaluator; "
                f"available: {', '.join(sorted(metrics))}"
            )
        value = metrics[self.metric]
        if self.best is None or value > self.best:
            self.best, self.stale = value, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience


class ProgressLog:
    """Logs averaged losses, learning rate, speed and ETA every ``period`` iterations."""

    def __init__(self, max_iter: int, period: int, level: int) -> None:
        self.max_iter, self.period, self.level = max_iter, period, level
        self.start = self.window_start = time.perf_counter()
        self.window: list[dict[str, Any]] = []

    def step(self, row: dict[str, Any]) -> None:
        """Record one training row; log when a period is complete."""
        self.window.append(row)
        it = row["iteration"]
        if it % self.period and it != self.max_iter:
            return
        now = time.perf_counter()
        speed = len(self.window) / max(now - self.window_start, 1e-9)
        eta = timedelta(seconds=int((self.max_iter - it) / max(speed, 1e-9)))
        keys = [k for k in row if k.startswith("loss") or k == "l1_loss"]
        parts = " ".join(f"{k} {sum(r[k] for r in self.window) / len(self.window):.3f}" for k in keys)
        avg = sum(r["total_loss"] for r in self.window) / len(self.window)
        logger.log(
            self.level,
            "iter %d/%d  total_loss %.3f (%s)  lr %.2e  %.2f it/s  ETA %s",
            it,
            self.max_iter,
            avg,
            parts,
            row["lr"],
            speed,
            eta,
        )
        self.window, self.window_start = [], now
