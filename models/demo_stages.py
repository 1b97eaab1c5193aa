"""The stages of a demo build: data, the two training runs, and the export of each model.

Each stage reads and extends one :class:`DemoBuild`; :func:`run_pipeline` runs them in
order. :mod:`models.demo` owns the build directory around them and the public API.
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

__all__ = ["DemoBuild", "DemoScale", "Progress", "run_pipeline"]

Progress = Callable[[str], None]
# fp16 is kept only when no test metric moves by more than this (AP / mIoU points, x100 scale).
FP16_TOLERANCE = 0.1


@dataclass(frozen=True)
class DemoScale:
    """Sizes of the demo build; the defaults are the shipped demo, tests use toy values."""

    train_images: int = 400
    val_images: int = 50
    test_images: int = 100
    image_size: int = 256  # the dataset's images
    # The detector trains at a short edge drawn per image from these (INPUT.MIN_SIZE_TRAIN),
    # about the cost of 192 px, and is tested at the images' own 256 px: 75.2 test segm AP
    # against 70.1 at 192 px, and 70.6 for training and testing at 192 (benchmarks/README.md,
    # "Several training sizes, testing at 256 px, and AdamW"). Predictions are in image pixels.
    instance_train_sizes: tuple[int, ...] = (160, 176, 192, 208, 224)
    instance_test_size: int = 256
    # The segmenter's short edge in training and testing (INPUT.MIN_SIZE_*): at 192 px a
    # step costs 0.7 of one at 256 (benchmarks/README.md, "The demo recipe at 192 px").
    semantic_input_size: int = 192
    # A 6.6-minute build on the faster of the 2-core machines measured; the previous recipe,
    # of the same cost, took 10.5 on the slower, which leaves room for a 10-20 % drift under
    # the 12-minute budget. More iterations buy accuracy: 800 detector and 1100 segmenter
    # steps scored 88.1 / 80.8 AP and 88.2 mIoU against 86.8 / 78.5 and 87.6, for 1.09x the
    # time (benchmarks/README.md).
    # The detector trains data-parallel: 2 single-thread processes of 4 images each moved
    # 1.3x the images per second of one 2-thread process (benchmarks/train_speed.py).
    instance_iters: int = 700
    instance_eval_period: int = 350
    instance_batch_size: int = 8
    # AdamW (decoupled weight decay, none on norm layers): in the same 800 steps, 88.1 bbox
    # and 80.9 segm test AP against 84.0 / 75.2 for SGD with momentum at lr 0.02
    # (benchmarks/README.md, "Several training sizes, testing at 256 px, and AdamW").
    instance_optimizer: str = "adamw"
    instance_lr: float = 0.001
    instance_weight_decay: float = 0.01
    processes: int = 2
    # Iterations of 4 images, 0.11-0.19 s each; 8 images on two processes did worse in the
    # same time (benchmarks/README.md).
    semantic_iters: int = 1000
    semantic_eval_period: int = 500
    # AdamW: from the same encoder in the same 1100 iterations, 87.9 test mIoU at 2e-3 and
    # 85.2 at 1e-3, against 82.8 for SGD with momentum at 0.02 (benchmarks/README.md,
    # "Several training sizes, testing at 256 px, and AdamW").
    semantic_optimizer: str = "adamw"
    semantic_lr: float = 0.002
    semantic_weight_decay: float = 0.01  # decoupled (AdamW)
    # ENet weights from the training labels: object pixels weigh 12-18 times background
    # ones (see models/semseg/class_weights.py and benchmarks/README.md).
    semantic_class_weights: str | None = "balanced"
    # Both runs divide the rate by 10 at these fractions of their iterations (detectron2's
    # 3x schedule steps at 0.78 and 0.93). Stepping at 2/3 and 8/9 instead cost the detector
    # 2.4 bbox and 4.3 segm test AP in the same 900 steps (benchmarks/README.md, "Later
    # learning-rate steps").
    lr_step_fractions: tuple[float, ...] = (0.85, 0.98)
    num_workers: int = 1

    def lr_steps(self, iters: int) -> tuple[int, ...]:
        """The iterations of a run of ``iters`` at which the rate drops (none that do not fit)."""
        return tuple(sorted({s for f in self.lr_step_fractions if 0 < (s := round(f * iters)) < iters}))


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
    from models.data.datasets import register_coco_split, register_semantic_split
    from models.data.synthetic import CATEGORIES, generate_dataset

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
    from models.train import TrainOptions

    warmup = min(100, max(1, iters // 6))
    kw.setdefault("num_workers", build.scale.num_workers)
    return TrainOptions(
        max_iter=iters,
        warmup_iters=warmup,
        lr_steps=build.scale.lr_steps(iters),
        eval_period=min(eval_period, iters),
        seed=build.seed,
        **kw,
    )


def _train_instance(build: DemoBuild) -> Any:
    from models.configs import tiny_instance_config
    from models.data.synthetic import CATEGORIES
    from models.train import train

    s = build.scale
    _stage(
        build,
        f"training the instance model ({s.instance_iters} iterations of {s.instance_batch_size} images"
        f" on {s.processes} process{'es' if s.processes > 1 else ''})",
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
        processes=s.processes,
        num_workers=0 if s.processes > 1 else s.num_workers,
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
        "processes": s.processes,
        "best_val": result.best_metric,
    }
    return result


def _train_semantic(build: DemoBuild, detector_checkpoint: Path) -> Any:
    from models.data.synthetic import CATEGORIES
    from models.semseg.training import train_semantic

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


def _evaluate(cfg: Any, weights: Path, dataset: str) -> dict[str, float]:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from models.train import evaluate

    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    model.eval()
    return evaluate(cfg, model, dataset)


def _same_metrics(a: dict[str, float], b: dict[str, float], keys: tuple[str, ...]) -> bool:
    """Whether two evaluations agree within :data:`FP16_TOLERANCE` on every key either reports."""
    for k in keys:
        if (k in a) != (k in b) or (k in a and not math.isclose(a[k], b[k], abs_tol=FP16_TOLERANCE)):
            return False
    return True


def _load_config(path: Path, part: str) -> Any:
    # The instance config must stay loadable by plain detectron2 (no segmenter keys in it).
    if part == "semantic":
        from models.semseg.adapter import load_semseg_config

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

    from models.checkpoint import META_KEY, save_checkpoint

    target = build.root / part
    cfg = _load_config(train_dir / "config.yaml", part)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()  # the build's dataset names mean nothing later
    cfg.MODEL.DEVICE = "cpu"
    (target / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    model = build_model(cfg)
    extra = DetectionCheckpointer(model).load(str(best))  # the checkpoint minus its weights
    meta = {"class_names": extra.get(META_KEY, {}).get("class_names", [])}
    fp32_path = save_checkpoint(model, target / "model_fp32.pth", extra=meta)
    fp16_path = save_checkpoint(model, target / "model_fp16.pth", fp16=True, extra=meta)
    _stage(build, f"evaluating {part} on the test split (fp32 and fp16 weights)")
    fp32 = _evaluate(cfg, fp32_path, test)
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
