"""Batch annotation: run a model over many images and write COCO results, resumably.

Library use, without the command line::

    from cvserve.annotation.job import AnnotateJob, annotate
    from cvserve.annotation.predictors import LocalPredictor

    job = AnnotateJob(inputs=("photos/",), out="out/results.json")
    with LocalPredictor.from_repository("models.yaml", "shapes-maskrcnn") as predictor:
        summary = annotate(job, predictor)
    print(summary.format())

Every finished batch is appended to a journal next to the output (``results.journal.jsonl``)
and fsynced, so a run killed at any moment and started again with the same arguments
continues where it stopped. At the end, the results file (``results.json``), the images
and categories it refers to (``results.images.json``) and the unreadable images with the
reason (``results.errors.json``) are written atomically from the journal.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cvserve.annotation.inputs import ImageSet, InputError, collect_images
from cvserve.annotation.journal import Journal, JournalError, atomic_write_json
from cvserve.annotation.output import build_categories, coco_documents
from cvserve.annotation.predictors import (
    LocalPredictor,
    ModelInfo,
    Predictor,
    PredictorError,
    ServerPredictor,
)
from cvserve.annotation.worker import RenderOptions, WorkItem
from cvserve.models.types import Task

__all__ = [
    "AnnotateJob",
    "AnnotateSummary",
    "InputError",
    "JournalError",
    "LocalPredictor",
    "Predictor",
    "PredictorError",
    "ServerPredictor",
    "annotate",
]

logger = logging.getLogger(__name__)

# A model that fails on this many images before succeeding on any is broken, not
# unlucky: stop rather than fill the errors file with every image of the job.
FAIL_FAST_AFTER = 32


@dataclass(frozen=True)
class AnnotateJob:
    """What to annotate and where the outputs go.

    Attributes:
        inputs: folders (recursive), globs, image files, text files of paths, or one COCO json.
        out: the COCO results file; the images file, errors file and journal go next to it.
        image_root: folder a COCO json's ``file_name`` values are relative to.
        batch_size: images per batch (per model call, per journal write).
        overlays_dir: write each image with its predictions drawn here (None: don't).
        labels_dir: where semantic models' label PNGs go (None: ``<out stem>.labels/``).
        restart: discard an existing journal instead of resuming from it.
    """

    inputs: tuple[str, ...]
    out: str
    image_root: str | None = None
    batch_size: int = 8
    overlays_dir: str | None = None
    labels_dir: str | None = None
    restart: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def _sibling(self, suffix: str) -> str:
        stem = self.out[:-5] if self.out.lower().endswith(".json") else self.out
        return f"{stem}{suffix}"

    @property
    def images_path(self) -> str:
        """The images + categories file: ``<out stem>.images.json``."""
        return self._sibling(".images.json")

    @property
    def errors_path(self) -> str:
        """The failed images file: ``<out stem>.errors.json``."""
        return self._sibling(".errors.json")

    @property
    def journal_path(self) -> str:
        """The journal: ``<out stem>.journal.jsonl``."""
        return self._sibling(".journal.jsonl")

    def resolved_labels_dir(self) -> str:
        """Absolute folder of semantic label PNGs: ``labels_dir`` or ``<out stem>.labels``."""
        return os.path.abspath(self.labels_dir or self._sibling(".labels"))


@dataclass(frozen=True)
class AnnotateSummary:
    """Counts of one run. ``done`` and ``failed`` count this run only."""

    total: int
    done: int
    skipped: int
    failed: int
    instances: int
    elapsed_s: float
    out: str
    errors_path: str

    @property
    def images_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def format(self) -> str:
        """The one-paragraph summary printed at the end of a run."""
        text = (
            f"annotated {self.done} of {self.total} images ({self.skipped} skipped as already done, "
            f"{self.failed} failed), {self.instances} instances in results; "
            f"{self.elapsed_s:.1f} s, {self.images_per_s:.1f} images/s\nresults: {self.out}"
        )
        if self.failed:
            text += f"\nfailed images and reasons: {self.errors_path}"
        return text


def _fingerprint(job: AnnotateJob, info: ModelInfo, render: RenderOptions) -> dict[str, Any]:
    """What must not change between a run and its resumption (engine and batch size may)."""
    return {
        "model": info.name,
        "task": info.task.value,
        "class_names": list(info.class_names),
        "inputs": [os.path.abspath(i) for i in job.inputs],
        "image_root": os.path.abspath(job.image_root) if job.image_root else None,
        "overlays_dir": render.overlays_dir,
        "labels_dir": render.labels_dir,
    }


def _chunks(items: Sequence[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _progress_bar(total: int, initial: int, enabled: bool | None) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc="annotate",
        file=sys.stderr,
        disable=not (sys.stderr.isatty() if enabled is None else enabled),
        dynamic_ncols=True,
        smoothing=0.1,
    )


def _run_pending(
    job: AnnotateJob, image_set: ImageSet, predictor: Predictor, render: RenderOptions, progress: bool | None
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], int, int]:
    """Annotate what the journal lacks. Returns (done records, this run's errors, #done, #skipped)."""
    fingerprint = _fingerprint(job, predictor.info, render)
    with Journal(job.journal_path, fingerprint, restart=job.restart) as journal:
        done = {r["path"]: r for r in journal.records if r["type"] == "image"}
        unique = {e.path: WorkItem(e.path, e.rel) for e in image_set.images}
        pending = [item for path, item in unique.items() if path not in done]
        skipped = len(unique) - len(pending)
        errors: dict[str, dict[str, Any]] = {}
        ran = model_failures = 0
        with _progress_bar(len(unique), skipped, progress) as bar:
            for records in predictor.map_batches(_chunks(pending, job.batch_size), render):
                journal.append(records)
                for record in records:
                    if record["type"] == "image":
                        done[record["path"]] = record
                        ran += 1
                        continue
                    errors[record["path"]] = {"path": record["path"], "reason": record["reason"]}
                    if record.get("stage") == "predict":
                        model_failures += 1
                bar.update(len(records))
                bar.set_postfix(failed=len(errors), refresh=False)
                if ran == 0 and model_failures >= FAIL_FAST_AFTER:
                    raise PredictorError(
                        f"model {predictor.info.name!r} failed on the first {model_failures} images and "
                        f"succeeded on none; stopping (last error: {records[-1].get('reason', '')})"
                    )
    return done, list(errors.values()), ran, skipped


def annotate(job: AnnotateJob, predictor: Predictor, *, progress: bool | None = None) -> AnnotateSummary:
    """Annotate a job's images with a predictor, resuming from the job's journal.

    Args:
        job: inputs and outputs.
        predictor: in-process, server or Ray predictor; its model decides the categories.
        progress: show a progress bar on stderr (None: only when stderr is a terminal).

    Returns:
        The run's summary; the output files are written.

    Raises:
        InputError: an input is missing or unreadable, or no image was found.
        JournalError: the journal is locked, corrupt, or from a run with other arguments.
        ValueError: the model's classes match none of a COCO json's categories.
        PredictorError: the model or server cannot serve the job (finished batches are
            kept in the journal; a rerun resumes).
    """
    start = time.perf_counter()
    image_set = collect_images(job.inputs, job.image_root)
    info = predictor.info
    categories = build_categories(info.class_names, image_set.coco_categories)
    render = RenderOptions(
        class_names=info.class_names,
        labels_dir=job.resolved_labels_dir() if info.task is Task.SEMANTIC else None,
        overlays_dir=os.path.abspath(job.overlays_dir) if job.overlays_dir else None,
    )
    done, errors, ran, skipped = _run_pending(job, image_set, predictor, render, progress)
    meta = {"description": "cvserve annotate", "model": info.name, "image_root": image_set.root}
    if render.labels_dir:
        meta["labels_dir"] = render.labels_dir
    results, images_doc = coco_documents(image_set.images, done, categories, meta)
    atomic_write_json(job.errors_path, errors)
    atomic_write_json(job.images_path, images_doc)
    atomic_write_json(job.out, results)  # last: its presence means the run completed
    summary = AnnotateSummary(
        total=len({e.path for e in image_set.images}),
        done=ran,
        skipped=skipped,
        failed=len(errors),
        instances=len(results),
        elapsed_s=time.perf_counter() - start,
        out=job.out,
        errors_path=job.errors_path,
    )
    logger.debug("annotate finished: %s", summary)
    return summary
