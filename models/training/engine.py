"""The training engine: fine-tune or train from scratch any detectron2 META_ARCH.

The model comes from ``detectron2.modeling.build_model(cfg)``, so detection, instance
segmentation and the semantic encoder-decoder (a registered META_ARCH) train the same way.
Data flows through detectron2's ``DatasetMapper`` (instance annotations and ``sem_seg_file_name``).

Example::

    cfg = tiny_instance_config(num_classes=5)
    result = train(cfg, TrainOptions(max_iter=600), train_dataset="shapes_train",
                   val_dataset="shapes_val", output_dir="out/")
    print(result.best_checkpoint, result.best_metric)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# isort: split

import torch
import torch.distributed as dist
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, MetadataCatalog, build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from torch.nn.parallel import DistributedDataParallel

from cvserve.models.checkpoint import save_checkpoint
from cvserve.models.data.augment import build_augmentations
from cvserve.models.device import resolve_device
from cvserve.models.fusion import use_channels_last
from cvserve.models.instance import config as _configs  # noqa: F401  (registers this project's backbone and ROI heads)
from cvserve.models.instance.roi_align import keep_roi_align_fp32, use_gather_roi_align
from cvserve.models.precision import resolve_precision
from cvserve.models.training.history import MetricsHistory
from cvserve.models.training.launch import LauncherEnvironment, joined_process_group, launcher_environment
from cvserve.models.training.monitor import ProgressLog, Selection
from cvserve.models.training.options import TrainOptions
from cvserve.models.training.parallel import ProcessGroup
from cvserve.models.training.ranks import broadcast_object, mean_over_ranks, rank_device
from cvserve.models.training.solver import build_lr_scheduler, build_optimizer, train_step
from cvserve.models.training.validation import dataset_classes, evaluate

__all__ = ["TrainResult", "train"]

logger = logging.getLogger(__name__)


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
        rank: the global rank of the process that returned this; only rank 0 writes files.
    """

    best_checkpoint: Path
    last_checkpoint: Path
    best_metric: float | None
    metrics_csv: Path
    metrics_json: Path
    plot_png: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0


def _prepare_config(
    cfg: CfgNode, options: TrainOptions, train_dataset: str, val_dataset: str | None, device: str
) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE, cfg.SEED = device, options.seed
    cfg.DATASETS.TRAIN = (train_dataset,)
    cfg.DATASETS.TEST = (val_dataset,) if val_dataset else ()
    cfg.DATALOADER.NUM_WORKERS = options.num_workers
    cfg.SOLVER.IMS_PER_BATCH = options.batch_size
    cfg.SOLVER.BASE_LR = options.lr
    cfg.SOLVER.MAX_ITER = options.max_iter
    cfg.SOLVER.WARMUP_ITERS = options.warmup_iters
    cfg.TEST.EVAL_PERIOD = options.eval_period
    semantic, classes = dataset_classes(train_dataset)
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

    Under ``torchrun`` (or any launcher of env:// rendezvous, see
    :mod:`~cvserve.models.training.launch`) every launched process calls this; they train
    together, ``options.batch_size`` images per iteration over all of them, and rank 0
    writes the files. Otherwise ``options.processes`` processes are spawned on this machine.

    Returns:
        The checkpoints, best metric and history.

    Raises:
        ValueError: unregistered dataset, bad option, an unknown early-stop metric, or a
            launched run that also asks for ``processes`` or whose world does not divide
            the batch.
        FloatingPointError: the loss became NaN or infinite.
    """
    options.validate()
    launch = launcher_environment()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = _prepare_config(cfg, options, train_dataset, val_dataset, resolve_device(options.device))
    if val_dataset:
        dataset_classes(val_dataset)
    if launch is None or launch.rank == 0:
        (out / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    run = _Run(cfg, options, train_dataset, val_dataset, out, init_weights)
    if launch is not None:
        return _train_launched(launch, run, progress)
    if options.processes == 1:
        return _train_rank(0, run, progress=progress)
    datasets = [train_dataset, *([val_dataset] if val_dataset else [])]
    with ProcessGroup(options.processes, cfg.MODEL.DEVICE, datasets, _train_rank, (run,)):
        return _train_rank(0, run, progress=progress)


@dataclass(frozen=True)
class _Run:
    """What a run is given, whole: spawned ranks receive it pickled."""

    cfg: CfgNode
    options: TrainOptions
    train_dataset: str
    val_dataset: str | None
    out: Path
    init_weights: str | None


def _train_launched(launch: LauncherEnvironment, run: _Run, progress: bool) -> TrainResult:
    """This process's share of a run whose processes a launcher started."""
    launch.check(run.options.processes, run.options.batch_size)
    with joined_process_group(launch, run.cfg.MODEL.DEVICE) as device:
        cfg = run.cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = device
        cfg.freeze()
        result = _train_rank(launch.rank, replace(run, cfg=cfg), progress=progress and launch.rank == 0)
    return replace(result, rank=launch.rank)


def _train_rank(rank: int, run: _Run, progress: bool = False) -> TrainResult:
    """One process's share of a run (the whole run with one process)."""
    if run.options.processes > 1:
        cfg = run.cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = rank_device(cfg.MODEL.DEVICE, rank)
        cfg.freeze()
        run = replace(run, cfg=cfg)
    seed_all_rng(run.options.seed + rank)  # rank 0's initial weights are every rank's (DDP broadcasts them)
    return _Trainer(run, progress).run()


def _train_loader(cfg: CfgNode, options: TrainOptions) -> Iterator[list[dict[str, Any]]]:
    augmentations = build_augmentations(
        cfg,
        hflip=options.hflip,
        vflip=options.vflip,
        scale_jitter=options.scale_jitter,
        crop=options.crop,
        rotation=options.rotation,
        color_jitter=options.color_jitter,
        noise_std=options.noise_std,
    )
    # Crops and rotations make the annotated boxes loose: derive them again from the masks.
    recompute_boxes = bool(cfg.MODEL.MASK_ON and (options.crop or options.rotation))
    mapper = DatasetMapper(cfg, is_train=True, augmentations=augmentations, recompute_boxes=recompute_boxes)
    return iter(build_detection_train_loader(cfg, mapper=mapper))  # an infinite sampler


class _Trainer:
    """State of one run; ``train`` is its public face."""

    def __init__(self, run: _Run, progress: bool) -> None:
        self.cfg = cfg = run.cfg
        self.options = options = run.options
        self.train_dataset, self.val_dataset = run.train_dataset, run.val_dataset
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.model = build_model(cfg)
        if run.init_weights:
            DetectionCheckpointer(self.model).load(run.init_weights)
        if cfg.MODEL.DEVICE == "cpu":  # 4-5 % and 11 % faster steps, same model (benchmarks/README.md)
            use_channels_last(self.model)
            use_gather_roi_align(self.model)  # RoIAlign as an embedding bag, boxes in fp32
        else:  # box coordinates stay fp32 under fp16 autocast (detectron2's ROIAlign rounds them)
            keep_roi_align_fp32(self.model)
        # Several processes: gradients are averaged in backward; the model itself is saved and evaluated.
        self.forward: torch.nn.Module = self.model
        if dist.is_initialized():
            ids = [torch.device(cfg.MODEL.DEVICE)] if cfg.MODEL.DEVICE.startswith("cuda") else None
            self.forward = DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False)
        self.class_names = dataset_classes(run.train_dataset)[1]
        self.optimizer = build_optimizer(self.model, options)
        self.scheduler = build_lr_scheduler(self.optimizer, options)
        self.data = _train_loader(cfg, options)
        self.precision = resolve_precision(options.precision, cfg.MODEL.DEVICE)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.history = MetricsHistory(run.out)
        self.selection = Selection(options.early_stop_metric, options.early_stop_patience)
        self.best_path, self.last_path = run.out / "model_best.pth", run.out / "model_final.pth"
        self.log = ProgressLog(
            options.max_iter, options.log_period, logging.INFO if progress else logging.DEBUG
        )

    def run(self) -> TrainResult:
        cfg, options = self.cfg, self.options
        logger.info(
            "training %s on %s for %d iterations on %s at %s",
            cfg.MODEL.META_ARCHITECTURE, self.train_dataset, options.max_iter, cfg.MODEL.DEVICE,
            self.precision,
        )  # fmt: skip
        self.model.train()
        iteration = 0
        with EventStorage(0) as storage:  # detectron2 models log to it while training
            for iteration in range(1, options.max_iter + 1):
                storage.iter = iteration
                self._step(iteration)
                due = iteration % options.eval_period == 0 or iteration == options.max_iter
                if self.val_dataset and due and self._evaluate(iteration):
                    break
        self._checkpoint(self.last_path, iteration)
        if not self.rank:
            self.history.write(self._summary(iteration), self.selection.metric)
        best = self.best_path if self.val_dataset else self.last_path
        h = self.history
        return TrainResult(
            best, self.last_path, self.selection.best, h.csv_path, h.json_path, h.plot_path, h.rows
        )

    def _step(self, iteration: int) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        losses = train_step(
            self.forward, next(self.data), self.optimizer, self.scaler, self.options,
            self.cfg.MODEL.DEVICE, self.precision,
        )  # fmt: skip
        if iteration < self.options.max_iter:  # fvcore schedules are undefined past the end
            self.scheduler.step()
        row = {"iteration": iteration, "lr": lr, **mean_over_ranks(losses)}
        if self.rank:
            return
        self.history.add(row)
        self.log.step(row)

    def _evaluate(self, iteration: int) -> bool:
        """Evaluate, keep the best weights, write the metrics; True to stop early.

        With several processes each evaluates a share of the images with rank 0's
        weights and norm statistics, rank 0 scores them and decides for all.
        """
        assert self.val_dataset is not None
        distributed = dist.is_initialized()
        if distributed:
            for buffer in self.model.buffers():  # BN statistics drift apart per rank
                dist.broadcast(buffer, 0)
        metrics = evaluate(self.cfg, self.model, self.val_dataset, distributed=distributed)
        if self.rank:
            return bool(broadcast_object(None))
        self.history.add({"iteration": iteration, **{f"val/{k}": v for k, v in metrics.items()}})
        sel = self.selection
        if sel.update(metrics):
            self._checkpoint(self.best_path, iteration)
        logger.info("iter %d: %s = %.2f (best %.2f)", iteration, sel.metric, metrics[sel.metric], sel.best)
        self._checkpoint(self.last_path, iteration)
        self.history.write(self._summary(iteration), sel.metric)
        if sel.should_stop:
            logger.info("early stop: no improvement of %s in %d evaluations", sel.metric, sel.stale)
        return bool(broadcast_object(sel.should_stop))

    def _checkpoint(self, path: Path, iteration: int) -> None:
        if self.rank:
            return
        extra = {"class_names": self.class_names, "iteration": iteration, "config": self.cfg.dump()}
        save_checkpoint(self.model, path, extra=extra)

    def _summary(self, iteration: int) -> dict[str, Any]:
        sel = self.selection
        return {"iterations": iteration, "metric": sel.metric, "best_metric": sel.best}
