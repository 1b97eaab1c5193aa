"""The stages of a demo build: data, the two training runs, and the export of each model.

Each stage reads and extends one :class:`DemoBuild`; :func:`run_pipeline` runs them in
order. :mod:`cvserve.models.demo.build` owns the build directory around them and the public API.
"""

from __future__ import annotations

import math
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvserve.models.demo.scale import DemoScale

__all__ = ["DemoBuild", "Progress", "run_pipeline"]

Progress = Callable[[str], None]
# fp16 is kept only when no test metric moves by more than this (AP / mIoU points, x100 scale).
FP16_TOLERANCE = 0.1


@dataclass
class DemoBuild:
    """State shared by the stages of one build."""

    root: Path
    seed: int
    scale: DemoScale
    progress: Progress
    datasets: dict[str, str]
    report: dict[str, Any]


def _stage(build: DemoBuild, message: str) -> None:
    build.progress(f"[demo] {message}")


def _make_data(build: DemoBuild) -> None:
    from cvserve.models.data.datasets import register_coco_split, register_semantic_split
    from cvserve.models.data.synthetic import CATEGORIES, generate_dataset

    s = build.scale
    counts = {"train": s.train_images, "val": s.val_images, "test": s.test_images}
    _stage(build, f"generating the synthetic dataset {counts} at {s.image_size} px")
    paths = generate_dataset(
        build.root / "data", seed=build.seed, splits=counts, image_size=(s.image_size, s.image_size)
    )
    token = uuid.uuid4().hex[:12]  # catalog names are process-global: one set per build
    semantic_classes = ["background", *CATEGORIES]
    for split, p in paths.items():
        register_coco_split(f"demo_{token}_{split}", p)
        register_semantic_split(f"demo_{token}_sem_{split}", p.images, p.semantic_labels, semantic_classes)
        build.datasets[split] = f"demo_{token}_{split}"
        build.datasets[f"sem_{split}"] = f"demo_{token}_sem_{split}"
    build.report["dataset"] = {"seed": build.seed, "image_size": s.image_size, "images": counts}


def _options(build: DemoBuild, iters: int, eval_period: int, **kw: Any) -> Any:
    from cvserve.models.training.options import TrainOptions

    warmup = min(100, max(1, iters // 6))
    kw.setdefault("num_workers", build.scale.num_workers)
    return TrainOptions(
        max_iter=iters,
        warmup_iters=warmup,
        lr_steps=build.scale.lr_steps(iters),
        eval_period=min(eval_period, iters),
        seed=build.seed,
        precision=build.scale.training_precision,
        **kw,
    )


def _train_instance(build: DemoBuild) -> Any:
    from cvserve.models.data.synthetic import CATEGORIES
    from cvserve.models.device import data_parallel_processes, resolve_device
    from cvserve.models.instance.config import tiny_instance_config
    from cvserve.models.precision import resolve_precision
    from cvserve.models.training.engine import train

    s = build.scale
    # The process count follows the device: the recipe's CPU processes, or one per GPU.
    device = resolve_device("auto")
    processes = data_parallel_processes(device, s.processes, s.instance_batch_size)
    _stage(
        build,
        f"training the instance model ({s.instance_iters} iterations of {s.instance_batch_size} images"
        f" on {processes} process{'es' if processes > 1 else ''}, {device})",
    )
    cfg = tiny_instance_config(
        len(CATEGORIES), input_size=s.instance_test_size, train_sizes=s.instance_train_sizes
    )
    # With several processes each loads its own images inline: no loader processes
    # competing for the cores the training processes share out.
    options = _options(
        build,
        s.instance_iters,
        s.instance_eval_period,
        batch_size=s.instance_batch_size,
        optimizer=s.instance_optimizer,
        lr=s.instance_lr,
        weight_decay=s.instance_weight_decay,
        processes=processes,
        device=device,
        num_workers=0 if processes > 1 else s.num_workers,
    )
    result = train(
        cfg,
        options,
        train_dataset=build.datasets["train"],
        val_dataset=build.datasets["val"],
        output_dir=build.root / "instance" / "training",
    )
    build.report["instance"] = {
        "iterations": s.instance_iters,
        "batch_size": s.instance_batch_size,
        "processes": processes,
        "device": device,
        "training_precision": resolve_precision(s.training_precision, device),
        "best_val": result.best_metric,
    }
    return result


def _train_semantic(build: DemoBuild, detector_checkpoint: Path) -> Any:
    from cvserve.models.data.synthetic import CATEGORIES
    from cvserve.models.semseg.training import train_semantic

    s = build.scale
    _stage(build, f"training the semantic model from the detector's encoder ({s.semantic_iters} iterations)")
    result = train_semantic(
        train_dataset=build.datasets["sem_train"],
        val_dataset=build.datasets["sem_val"],
        num_classes=len(CATEGORIES) + 1,
        options=_options(
            build,
            s.semantic_iters,
            s.semantic_eval_period,
            optimizer=s.semantic_optimizer,
            lr=s.semantic_lr,
            weight_decay=s.semantic_weight_decay,
            dropout=0.1,
        ),
        output_dir=build.root / "semantic" / "training",
        encoder_from=detector_checkpoint,
        input_size=s.semantic_input_size,
        class_weights=s.semantic_class_weights,
    )
    assert result.transfer is not None  # encoder_from was given
    build.report["semantic"] = {
        "iterations": s.semantic_iters,
        "best_val": result.train.best_metric,
        "transfer": result.transfer.summary(),
    }
    return result


def _evaluate(cfg: Any, weights: Path, dataset: str, precision: str = "fp32") -> dict[str, float]:
    """Test figures of ``weights``; ``precision`` bf16 runs them as the server does (autocast,
    RoIAlign and output layers in fp32)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from cvserve.models.instance.roi_align import keep_roi_align_fp32
    from cvserve.models.precision import autocast, keep_outputs_fp32
    from cvserve.models.training.validation import evaluate

    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    model.eval()
    keep_roi_align_fp32(model)
    keep_outputs_fp32(model)
    with autocast("cpu", precision):
        return evaluate(cfg, model, dataset)


def _bf16_loss(fp32: dict[str, float], bf16: dict[str, float], keys: tuple[str, ...]) -> float:
    """The largest accuracy loss of bf16 against fp32 over ``keys``, in points (0 if none)."""
    return round(max([fp32[k] - bf16[k] for k in keys if k in fp32 and k in bf16] + [0.0]), 3)


def _same_metrics(a: dict[str, float], b: dict[str, float], keys: tuple[str, ...]) -> bool:
    """Whether two evaluations agree within :data:`FP16_TOLERANCE` on every key either reports."""
    for k in keys:
        if (k in a) != (k in b) or (k in a and not math.isclose(a[k], b[k], abs_tol=FP16_TOLERANCE)):
            return False
    return True


def _load_config(path: Path, part: str) -> Any:
    # The instance config must stay loadable by plain detectron2 (no segmenter keys in it).
    if part == "semantic":
        from cvserve.models.semseg.adapter import load_semseg_config

        return load_semseg_config(str(path))
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    return cfg


def _finalize(
    build: DemoBuild, part: str, train_dir: Path, best: Path, test: str, keys: tuple[str, ...]
) -> None:
    """Write ``<part>/config.yaml`` and the smallest ``<part>/model.pth`` that loses no test accuracy."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from cvserve.models.checkpoint import META_KEY, save_checkpoint
    from cvserve.models.precision import BF16_LOSS_KEY, cpu_bf16

    target = build.root / part
    cfg = _load_config(train_dir / "config.yaml", part)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()  # the build's dataset names mean nothing later
    cfg.MODEL.DEVICE = "cpu"
    (target / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    model = build_model(cfg)
    extra = DetectionCheckpointer(model).load(str(best))  # the checkpoint minus its weights
    meta: dict[str, Any] = {"class_names": extra.get(META_KEY, {}).get("class_names", [])}
    fp32_path = save_checkpoint(model, target / "model_fp32.pth", extra=meta)
    _stage(build, f"evaluating {part} on the test split (fp32, bf16 compute where native, fp16 weights)")
    fp32 = _evaluate(cfg, fp32_path, test)
    bf16: dict[str, float] = {}
    if cpu_bf16().native:  # elsewhere precision auto serves fp32 anyway: no record needed
        bf16 = _evaluate(cfg, fp32_path, test, "bf16")
        meta[BF16_LOSS_KEY] = _bf16_loss(fp32, bf16, keys)  # read by precision auto at load
        fp32_path = save_checkpoint(model, target / "model_fp32.pth", extra=meta)
    fp16_path = save_checkpoint(model, target / "model_fp16.pth", fp16=True, extra=meta)
    fp16 = _evaluate(cfg, fp16_path, test)
    keep_fp16 = _same_metrics(fp32, fp16, keys)
    chosen = fp16_path if keep_fp16 else fp32_path
    chosen.replace(target / "model.pth")
    (fp32_path if keep_fp16 else fp16_path).unlink()
    for leftover in train_dir.glob("*.pth"):
        leftover.unlink()  # training checkpoints: superseded by model.pth
    build.report[part].update(
        {
            "test": {k: fp16[k] if keep_fp16 else fp32[k] for k in keys if k in fp32},
            "test_fp32": {k: fp32[k] for k in keys if k in fp32},
            "test_fp16": {k: fp16[k] for k in keys if k in fp16},
            "test_bf16": {k: bf16[k] for k in keys if k in bf16},
            "bf16_loss": meta.get(BF16_LOSS_KEY),
            "stored_precision": "fp16" if keep_fp16 else "fp32",
            "checkpoint_mib": round((target / "model.pth").stat().st_size / 2**20, 2),
        }
    )


def run_pipeline(build: DemoBuild) -> None:
    """Run every stage into ``build.root``, recording figures and timings in ``build.report``."""
    timings: dict[str, float] = build.report.setdefault("stage_seconds", {})
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 1)
        clock = now

    _make_data(build)
    lap("dataset")
    instance = _train_instance(build)
    lap("instance_training")
    semantic = _train_semantic(build, instance.best_checkpoint)
    lap("semantic_training")
    _finalize(
        build,
        "instance",
        build.root / "instance" / "training",
        instance.best_checkpoint,
        build.datasets["test"],
        ("bbox/AP", "segm/AP"),
    )
    _finalize(
        build,
        "semantic",
        build.root / "semantic" / "training",
        semantic.train.best_checkpoint,
        build.datasets["sem_test"],
        ("sem_seg/mIoU",),
    )
    for split in ("train", "val"):
        shutil.rmtree(build.root / "data" / split)  # only the test split backs the report
