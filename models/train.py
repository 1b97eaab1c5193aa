"""The training engine: fine-tune or train from scratch any detectron2 META_ARCH.

The model comes from ``detectron2.modeling.build_model(cfg)``, so detection,
instance segmentation and the semantic encoder-decoder (registered in detectron2's
META_ARCH registry) train the same way. Data flows through detectron2's
``DatasetMapper``, which handles instance annotations and ``sem_seg_file_name`` alike.

Example::

    cfg = tiny_instance_config(num_classes=5)
    result = train(cfg, TrainOptions(max_iter=600), train_dataset="shapes_train",
                   val_dataset="shapes_val", output_dir="out/")
    print(result.best_checkpoint, result.best_metric)
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import models  # noqa: F401  (detectron2 compatibility layer first)

# isort: split

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, SemSegEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage

from models.checkpoint import save_checkpoint
from models.data.augment import build_augmentations
from models.training.history import MetricsHistory, flatten_results
from models.training.options import TrainOptions, add_train_options, options_from_args, resolve_device
from models.training.solver import build_lr_scheduler, build_optimizer, l1_penalty

__all__ = ["TrainOptions", "TrainResult", "add_train_options", "options_from_args", "train"]

logger = logging.getLogger(__name__)

_DEFAULT_METRICS = ("segm/AP", "bbox/AP", "sem_seg/mIoU")


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced.

    Attributes:
        best_checkpoint: weights with the best validation metric (the last ones without validation).
        last_checkpoint: weights at the last iteration run.
        best_metric: the best value of the selection metric, None without validation.
        metrics_csv: one row per iteration (losses, lr) and per evaluation (``val/*``).
        metrics_json: the same rows plus a summary.
        plot_png: training loss and validation metric over iterations.
        history: the rows.
    """

    best_checkpoint: Path
    last_checkpoint: Path
    best_metric: float | None
    metrics_csv: Path
    metrics_json: Path
    plot_png: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def _dataset_classes(name: str) -> tuple[bool, list[str]]:
    """``(is_semantic, class names)`` of a registered dataset."""
    if name not in DatasetCatalog.list():
        raise ValueError(f"dataset {name!r} is not registered (see models.data.datasets)")
    meta = MetadataCatalog.get(name)
    if meta.get("evaluator_type") == "sem_seg":
        return True, list(meta.get("stuff_classes", []))
    return False, list(meta.get("thing_classes", []))


def _prepare_config(
    cfg: CfgNode, options: TrainOptions, train_dataset: str, val_dataset: str | None, device: str
) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    cfg.DATASETS.TRAIN = (train_dataset,)
    cfg.DATASETS.TEST = (val_dataset,) if val_dataset else ()
    cfg.DATALOADER.NUM_WORKERS = options.num_workers
    cfg.SOLVER.IMS_PER_BATCH = options.batch_size
    cfg.SOLVER.BASE_LR = options.lr
    cfg.SOLVER.MAX_ITER = options.max_iter
    cfg.SOLVER.WARMUP_ITERS = options.warmup_iters
    cfg.TEST.EVAL_PERIOD = options.eval_period
    cfg.SEED = options.seed
    semantic, classes = _dataset_classes(train_dataset)
    if semantic:
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(classes)
        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = int(MetadataCatalog.get(train_dataset).get("ignore_label", 255))
    elif classes:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(classes)
        cfg.MODEL.RETINANET.NUM_CLASSES = len(classes)
        # Bitmask ground truth accepts polygons, RLE and masks with holes alike.
        cfg.INPUT.MASK_FORMAT = "bitmask"
    if "DROPOUT" in cfg.MODEL.SEM_SEG_HEAD:
        cfg.MODEL.SEM_SEG_HEAD.DROPOUT = options.dropout
    elif options.dropout:
        logger.warning("--dropout ignored: this model has no MODEL.SEM_SEG_HEAD.DROPOUT")
    cfg.freeze()
    return cfg


def _build_evaluator(cfg: CfgNode, dataset: str) -> DatasetEvaluator:
    if MetadataCatalog.get(dataset).get("evaluator_type") == "sem_seg":
        return SemSegEvaluator(dataset, distributed=False)
    tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
    # use_fast_impl=False: detectron2's fast COCOeval needs its C++ extension.
    return COCOEvaluator(dataset, tasks=tasks, distributed=False, use_fast_impl=False)


def evaluate(cfg: CfgNode, model: torch.nn.Module, dataset: str) -> dict[str, float]:
    """Evaluate ``model`` on a registered dataset; returns flat metrics like ``segm/AP``."""
    evaluator = _build_evaluator(cfg, dataset)
    loader = build_detection_test_loader(cfg, dataset)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):  # pycocotools prints its tables
        results = inference_on_dataset(model, loader, evaluator)
    logger.debug("evaluation output:\n%s", captured.getvalue())
    return flatten_results(dict(results or {}))


@dataclass
class _Selection:
    """Best-checkpoint selection and early stopping."""

    metric: str
    patience: int
    best: float | None = None
    stale: int = 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True if it is the best so far."""
        if not self.metric:
            self.metric = next((m for m in _DEFAULT_METRICS if m in metrics), "")
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


class _ProgressLog:
    def __init__(self, max_iter: int, period: int, level: int) -> None:
        self.max_iter, self.period, self.level = max_iter, period, level
        self.start = self.window_start = time.perf_counter()
        self.window: list[dict[str, Any]] = []

    def step(self, row: dict[str, Any]) -> None:
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


def _train_step(
    model: torch.nn.Module,
    batch: list[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    options: TrainOptions,
    use_amp: bool,
) -> dict[str, float]:
    with torch.autocast("cuda", enabled=use_amp):
        loss_dict = model(batch)
    total = sum(loss_dict.values())
    values = {k: float(v.detach()) for k, v in loss_dict.items()}
    if options.l1:
        penalty = options.l1 * l1_penalty(model)
        total = total + penalty
        values["l1_loss"] = float(penalty.detach())
    if not torch.isfinite(total):
        raise FloatingPointError(
            f"training diverged: loss is {float(total)} ({values}); lower --lr or raise --warmup-iters"
        )
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if options.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    values["total_loss"] = float(total.detach())
    return values


def train(
    cfg: CfgNode,
    options: TrainOptions,
    *,
    train_dataset: str,
    val_dataset: str | None,
    output_dir: str | Path,
    init_weights: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``cfg``'s model on a registered dataset, evaluating and keeping the best weights.

    Args:
        cfg: detectron2 config of the model (not modified). The number of classes is
            set from the training dataset's metadata.
        options: hyper-parameters, augmentation and evaluation settings.
        train_dataset: registered training dataset name.
        val_dataset: registered validation dataset, or None to skip evaluation.
        output_dir: receives ``config.yaml``, ``model_best.pth``, ``model_final.pth``,
            ``metrics.csv``, ``metrics.json`` and ``metrics.png``.
        init_weights: initial weights (``.pth``, model-zoo ``.pkl`` or ``detectron2://``
            URL) loaded by ``DetectionCheckpointer``; layers whose shapes differ (a new
            number of classes) are skipped with a warning. None trains from scratch.
        progress: log progress lines at INFO (else DEBUG).

    Returns:
        The checkpoints, best metric and history.

    Raises:
        ValueError: unregistered dataset, bad option, or an unknown early-stop metric.
        FloatingPointError: the loss became NaN or infinite.
    """
    options.validate()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _prepare_config(cfg, options, train_dataset, val_dataset, resolve_device(options.device))
    if val_dataset:
        _dataset_classes(val_dataset)
    (out / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    seed_all_rng(options.seed)
    model = build_model(cfg)
    if init_weights:
        DetectionCheckpointer(model).load(init_weights)
    _, class_names = _dataset_classes(train_dataset)
    optimizer = build_optimizer(model, options)
    scheduler = build_lr_scheduler(optimizer, options)
    mapper = DatasetMapper(
        cfg,
        is_train=True,
        augmentations=build_augmentations(
            cfg,
            hflip=options.hflip,
            vflip=options.vflip,
            scale_jitter=options.scale_jitter,
            crop=options.crop,
            rotation=options.rotation,
            color_jitter=options.color_jitter,
            noise_std=options.noise_std,
        ),
        recompute_boxes=bool(cfg.MODEL.MASK_ON and (options.crop or options.rotation)),
    )
    data = iter(build_detection_train_loader(cfg, mapper=mapper))  # an infinite sampler
    use_amp = cfg.MODEL.DEVICE.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history = MetricsHistory(out)
    selection = _Selection(options.early_stop_metric, options.early_stop_patience)
    best_path, last_path = out / "model_best.pth", out / "model_final.pth"
    log = _ProgressLog(options.max_iter, options.log_period, logging.INFO if progress else logging.DEBUG)

    def checkpoint(path: Path, iteration: int) -> None:
        extra = {"class_names": class_names, "iteration": iteration, "config": cfg.dump()}
        save_checkpoint(model, path, extra=extra)

    logger.info(
        "training %s on %s for %d iterations on %s",
        cfg.MODEL.META_ARCHITECTURE,
        train_dataset,
        options.max_iter,
        cfg.MODEL.DEVICE,
    )
    model.train()
    iteration = 0
    # detectron2 models log to the current EventStorage while training.
    with EventStorage(0) as storage:
        for iteration in range(1, options.max_iter + 1):
            storage.iter = iteration
            lr = optimizer.param_groups[0]["lr"]
            row = {
                "iteration": iteration,
                "lr": lr,
                **_train_step(model, next(data), optimizer, scaler, options, use_amp),
            }
            if iteration < options.max_iter:  # fvcore schedules are undefined past the end
                scheduler.step()
            history.add(row)
            log.step(row)
            if val_dataset and (iteration % options.eval_period == 0 or iteration == options.max_iter):
                metrics = evaluate(cfg, model, val_dataset)
                history.add({"iteration": iteration, **{f"val/{k}": v for k, v in metrics.items()}})
                if selection.update(metrics):
                    checkpoint(best_path, iteration)
                logger.info(
                    "iter %d: %s = %.2f (best %.2f)",
                    iteration,
                    selection.metric,
                    metrics[selection.metric],
                    selection.best,
                )
                checkpoint(last_path, iteration)
                history.write(_summary(selection, iteration), selection.metric)
                if selection.should_stop:
                    logger.info(
                        "early stop: no improvement of %s in %d evaluations",
                        selection.metric,
                        selection.stale,
                    )
                    break
    checkpoint(last_path, iteration)
    if not val_dataset:
        best_path = last_path
    history.write(_summary(selection, iteration), selection.metric)
    return TrainResult(
        best_path,
        last_path,
        selection.best,
        history.csv_path,
        history.json_path,
        history.plot_path,
        history.rows,
    )


def _summary(selection: _Selection, iteration: int) -> dict[str, Any]:
    return {"iterations": iteration, "metric": selection.metric, "best_metric": selection.best}
