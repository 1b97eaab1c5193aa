"""``cvserve eval``: COCO / semantic segmentation evaluation of a results file or a model.

Three modes:

* ``--gt annotations.json --results detections.json``: evaluate an existing COCO results file;
* ``--model NAME (--server ADDR | --models repo.yaml) --gt annotations.json --images DIR``:
  run an instance model over the dataset, write ``results.json``, then evaluate it;
* ``--model NAME ... --task semantic --images DIR --labels DIR``: semantic segmentation
  metrics against label PNGs.

The report goes to ``--out`` (default: a new ``eval-YYYYmmdd-HHMMSS`` folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cvserve.cli.common import CLIError
from cvserve.cli.connection import add_connection_arguments, connection_from_args
from cvserve.cli.eval_params import add_coco_parameters, eval_settings

HELP = "evaluate COCO results or a model (bbox, segm, keypoints AP; semantic mIoU) and write a report"
IOU_TYPES = ("bbox", "segm", "keypoints")

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", metavar="JSON", help="COCO ground-truth annotations")
    parser.add_argument("--results", metavar="JSON", help="COCO results file to evaluate")
    parser.add_argument(
        "--iou-type",
        action="append",
        choices=IOU_TYPES,
        help="repeatable (default: every type the results have)",
    )
    parser.add_argument("--out", metavar="DIR", help="report folder (default: ./eval-YYYYmmdd-HHMMSS)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    add_coco_parameters(parser)
    model = parser.add_argument_group("running a model")
    model.add_argument("--model", help="name of the model to run over --images")
    model.add_argument("--models", metavar="YAML", help="load the model in-process from this repository file")
    model.add_argument(
        "--images", metavar="DIR", help="image folder (COCO file_name values are relative to it)"
    )
    model.add_argument(
        "--task", choices=("instance", "semantic"), help="expected task (default: the model's)"
    )
    model.add_argument(
        "--labels", metavar="DIR", help="semantic ground truth: label PNGs named like the images"
    )
    model.add_argument(
        "--ignore-label", type=int, default=255, help="label value ignored in semantic metrics"
    )
    model.add_argument(
        "--batch-size", type=int, help="images per batch (default: the model's max_batch_size)"
    )
    model.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight with --server (default 4)"
    )
    add_connection_arguments(
        parser, server_default=None, server_help="use the model on this cvserve server (host:port)"
    )


def _check_args(args: argparse.Namespace) -> None:

    if args.results and args.model:
        raise CLIError("--results and --model exclude each other: evaluate a file, or run a model")
    coco_only = ("max_dets", "iou_thrs", "area_range", "img_ids", "cat_ids", "class_agnostic", "renumber_ids")
    if args.lvis and (
        any(getattr(args, n) for n in coco_only) or args.engine != "numpy" or args.segm_area != "mask"
    ):
        raise CLIError("--lvis evaluates with LVISEval's own parameters; COCO parameter flags do not apply")
    if not args.results and not args.model:
        raise CLIError("give --results (with --gt) to evaluate a file, or --model to run a model")
    if args.results and not args.gt:
        raise CLIError("--results needs --gt (the COCO ground truth)")
    if args.model and bool(args.server) == bool(args.models):
        raise CLIError("--model needs exactly one of --server ADDR or --models repo.yaml")
    if args.model and not args.images:
        raise CLIError("--model needs --images DIR")
    for name in ("batch_size", "concurrency", "timeout"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be > 0, got {value}")


class _Runner:
    """The model to evaluate, in-process or behind a server, as a batch predictor of files.

    Both ways go through annotation's predictors, so eval reads images with the same
    decoder and limits as the server and annotate, waits for a model still loading, and
    retries an overloaded server the same way.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        from cvserve.annotation.predictors import PredictorError
        from cvserve.cli.common import CLIError

        self.args = args
        self._pool: Any = None
        try:
            self.predictor = self._connect() if args.server else self._load()
        except PredictorError as e:
            raise CLIError(str(e)) from None
        self.task, self.class_names = self.predictor.info.task.value, self.predictor.info.class_names

    def _connect(self) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        from cvserve.annotation.predictors import ServerPredictor
        from cvserve.client.client import Client

        connection = connection_from_args(self.args)
        predictor = ServerPredictor(
            connection.address,
            self.args.model,
            concurrency=self.args.concurrency,
            timeout=connection.timeout,
            client=Client.connect(connection),
        )
        self.batch_size = self.args.batch_size or self.args.concurrency
        self._pool = ThreadPoolExecutor(self.args.concurrency)
        return predictor

    def _load(self) -> Any:
        from cvserve.annotation.predictors import LocalPredictor
        from cvserve.cli.common import CLIError, model_spec
        from cvserve.models.batching import load_for_inference

        spec = model_spec(self.args.models, self.args.model)
        try:
            model, spec = load_for_inference(spec)
        except Exception as e:  # a model that cannot load is a user-facing configuration problem
            raise CLIError(f"{self.args.models}: model {spec.name!r} failed to load: {e}") from None
        self.batch_size = self.args.batch_size or spec.max_batch_size
        return LocalPredictor(model, concurrency=1, max_batch_size=spec.max_batch_size)

    def __call__(self, paths: Sequence[Path]) -> list[Any]:
        from cvserve.annotation.worker import ImageReadError, LoadedImage, WorkItem, read_image
        from cvserve.cli.common import CLIError

        images = []
        for path in paths:
            try:
                data, array = read_image(str(path))
            except ImageReadError as e:
                raise CLIError(f"{path}: {e}") from None
            images.append(LoadedImage(WorkItem(str(path), path.name), data, array))
        if self._pool is None:
            results = self.predictor.predict(images)
        else:  # a server batches requests from several clients: keep `concurrency` in flight
            results = list(self._pool.map(lambda image: self.predictor.predict([image])[0], images))
        for path, result in zip(paths, results, strict=True):
            if isinstance(result, Exception):
                raise CLIError(f"{path}: the model refused the image: {result}")
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self.predictor.close()


def _evaluate_file(
    args: argparse.Namespace, out: Path, results: Any, extra: dict[str, Any]
) -> dict[str, Any]:
    from cvserve.models.evaluation.coco import evaluate_loaded, zero_id_count
    from cvserve.models.evaluation.coco_io import parse_ground_truth, parse_results
    from cvserve.models.evaluation.report import write_coco_report

    settings = eval_settings(args)
    gt = extra.pop("_gt", None) or parse_ground_truth(args.gt)
    types = tuple(dict.fromkeys(args.iou_type)) if args.iou_type else None
    dets = parse_results(results, gt, types)
    zero_ids = zero_id_count(gt)
    if zero_ids and not settings.renumber_ids:
        _warn_zero_ids(args, zero_ids)
    arrays: dict[str, Any]
    if args.lvis:
        from cvserve.models.evaluation.lvis import evaluate_lvis

        metrics, arrays = evaluate_lvis(gt, dets, types or dets.iou_types), {}  # no curves for LVIS
        extra = {**extra, "lvis": True}
    else:
        metrics, arrays = evaluate_loaded(gt, dets, types, settings)
    if args.errors:
        extra = {
            **extra,
            "errors": _error_analysis(
                args, out, gt, dets, tuple(t for t in metrics if t in ("bbox", "segm"))
            ),
        }
    report = {
        "task": "instance",
        "ground_truth": str(Path(args.gt).resolve()),
        "results": str(Path(results).resolve()) if isinstance(results, (str, Path)) else None,
        "num_images": len(gt.image_ids),
        "num_detections": len(dets.entries),
        "units": "fractions in [0, 1] as pycocotools reports them; -1 where undefined (no ground truth)",
        "parameters": {"lvis": "LVISEval defaults: 300 detections per image, IoU 0.50:0.95"}
        if args.lvis
        else settings.to_json(tuple(metrics)),
        "annotation_ids": {
            "zero": zero_ids,
            "renumbered_from_1": settings.renumber_ids,
            "figures": "corrected: renumbered from 1"
            if settings.renumber_ids and zero_ids
            else f"as {'LVISEval' if args.lvis else 'pycocotools'} computes them",
        },
        **extra,
        "metrics": metrics,
    }
    write_coco_report(out, report, arrays, gt.cat_names, plots=not (args.no_plots or args.lvis))
    return report


def _warn_zero_ids(args: argparse.Namespace, count: int) -> None:
    reference, fix = (
        ("LVISEval", "renumber them from 1 in the file")
        if args.lvis
        else ("pycocotools", "--renumber-ids renumbers the annotations from 1")
    )
    print(
        f"warning: {args.gt}: {count} ground-truth annotation(s) have id 0; {reference} (and so "
        f"these figures) count a detection matched to one as a false positive; {fix} for the "
        "corrected figures",
        file=sys.stderr,
    )


def _error_analysis(
    args: argparse.Namespace, out: Path, gt: Any, dets: Any, types: tuple[str, ...]
) -> dict[str, Any]:
    """TIDE's breakdown and the COCO API's analyze layers (AP per layer; curves as PNGs)."""
    from cvserve.models.evaluation.analyze import LAYERS, analyze
    from cvserve.models.evaluation.params import EvalParams
    from cvserve.models.evaluation.plots import plot_analyze
    from cvserve.models.evaluation.tide import tide_errors

    errors = tide_errors(gt, dets, types)
    for t in types:
        layers = analyze(gt, dets, t, renumber_ids=args.renumber_ids)
        valid = layers[0, 0] > -1
        errors[t]["analyze_AP"] = {
            name: float(layers[i][:, valid].mean()) if valid.any() else -1.0 for i, name in enumerate(LAYERS)
        }
        if not args.no_plots:
            plot_analyze(layers, LAYERS, gt.cat_names, EvalParams.for_type(t).rec_thrs, out, f"analyze_{t}")
    return errors


def _run_model(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from cvserve.models.evaluation.coco_io import parse_ground_truth
    from cvserve.models.evaluation.inference import instance_results, semantic_confusion
    from cvserve.models.evaluation.report import write_semantic_report
    from cvserve.models.evaluation.semantic import semantic_metrics

    runner = _Runner(args)
    try:
        if args.task and args.task != runner.task:
            raise CLIError(f"model {args.model!r} is a {runner.task} model, not {args.task}")
        where = {"model": args.model, "server": args.server, "images": str(Path(args.images).resolve())}
        if runner.task == "semantic":
            if not args.labels:
                raise CLIError("a semantic model needs --labels DIR (label PNGs named like the images)")
            conf, n = semantic_confusion(
                args.images,
                args.labels,
                runner,
                len(runner.class_names),
                args.ignore_label,
                runner.batch_size,
            )
            metrics = {
                **semantic_metrics(conf, runner.class_names),
                "confusion_matrix": conf.tolist(),
                "num_images": n,
            }
            report = {"task": "semantic", **where, "labels": str(Path(args.labels).resolve()), "num_images": n,
                      "ignore_label": args.ignore_label, "class_names": list(runner.class_names),
                      "units": "percent, as detectron2's SemSegEvaluator reports them; null where undefined",
                      "metrics": metrics}  # fmt: skip
            write_semantic_report(out, report, runner.class_names, plots=not args.no_plots)
            return report
        if not args.gt:
            raise CLIError("an instance model needs --gt annotations.json")
        gt = parse_ground_truth(args.gt)
        results = instance_results(gt, args.images, runner, runner.class_names, runner.batch_size)
    finally:
        runner.close()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results_path.write_text(json.dumps(results))
    return _evaluate_file(args, out, results_path, {**where, "_gt": gt})


def _print_summary(report: dict[str, Any], out: Path) -> None:
    metrics = report["metrics"]
    if report["task"] == "semantic":
        print(" ".join(f"{k} {metrics[k]:.2f}" for k in ("mIoU", "fwIoU", "mACC", "pACC")))
    else:
        for iou_type, res in metrics.items():
            print(f"{iou_type:<9} " + " ".join(f"{k} {v:.4f}" for k, v in res["stats"].items()))
    print(f"report written to {out}")


def run(args: argparse.Namespace) -> int:
    from cvserve.models.evaluation.errors import EvaluationInputError
    from cvserve.models.evaluation.report import default_out_dir

    _check_args(args)
    out = Path(args.out) if args.out else default_out_dir()
    try:
        report = _run_model(args, out) if args.model else _evaluate_file(args, out, args.results, {})
    except EvaluationInputError as e:
        raise CLIError(str(e)) from None
    _print_summary(report, out)
    sys.stdout.flush()
    return 0
