"""Training history: rows of losses and validation metrics, written as CSV, JSON and a plot."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MetricsHistory", "flatten_results"]


def flatten_results(results: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"segm": {"AP": 1.0}}`` -> ``{"segm/AP": 1.0}``; NaN (an absent category) becomes dropped."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_results(value, name + "/"))
        elif isinstance(value, (int, float)) and not math.isnan(float(value)):
            flat[name] = float(value)
    return flat


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class MetricsHistory:
    """Rows keyed by iteration; training rows hold losses and lr, evaluation rows ``val/*`` metrics.

    Args:
        output_dir: where ``metrics.csv``, ``metrics.json`` and ``metrics.png`` go.
    """

    def __init__(self, output_dir: Path) -> None:
        self.rows: list[dict[str, Any]] = []
        self.csv_path = output_dir / "metrics.csv"
        self.json_path = output_dir / "metrics.json"
        self.plot_path = output_dir / "metrics.png"

    def add(self, row: dict[str, Any]) -> None:
        """Append a row; it must carry an ``iteration``."""
        if "iteration" not in row:
            raise ValueError("a history row needs an 'iteration'")
        self.rows.append(dict(row))

    def evaluations(self) -> list[dict[str, Any]]:
        """The rows holding validation metrics."""
        return [r for r in self.rows if any(k.startswith("val/") for k in r)]

    def write(self, summary: dict[str, Any] | None = None, plot_metric: str = "") -> None:
        """Rewrite the CSV, JSON and plot from all rows (atomically, so readers never see half a file)."""
        columns: list[str] = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)
        _atomic_write(self.json_path, json.dumps({"summary": summary or {}, "history": self.rows}, indent=1))
        self.plot(plot_metric)

    def plot(self, metric: str = "") -> None:
        """Training loss per iteration and the validation ``metric`` per evaluation."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [r for r in self.rows if "total_loss" in r]
        evals = self.evaluations()
        if not metric and evals:
            metric = next(k[4:] for k in evals[0] if k.startswith("val/"))
        fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
        if train:
            its = [r["iteration"] for r in train]
            losses = [r["total_loss"] for r in train]
            ax_loss.plot(its, losses, color="tab:blue", alpha=0.35, label="total loss")
            ax_loss.plot(its, _moving_average(losses, 20), color="tab:blue", label="moving average (20)")
            ax_loss.legend()
        ax_loss.set(title="training loss", xlabel="iteration", ylabel="loss")
        ax_loss.grid(alpha=0.3)
        points = [(r["iteration"], r[f"val/{metric}"]) for r in evals if f"val/{metric}" in r]
        if points:
            ax_val.plot(*zip(*points, strict=True), marker="o", color="tab:green")
        ax_val.set(title=f"validation {metric or '(none)'}", xlabel="iteration", ylabel=metric)
        ax_val.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.plot_path.with_name(self.plot_path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, self.plot_path)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out
