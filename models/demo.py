"""The demo model repository, built from nothing on the machine that serves it.

Pipeline (deterministic for a seed): synthetic shapes dataset (train/val/test) ->
tiny Mask R-CNN trained from scratch -> semantic segmenter whose encoder is transferred
from that detector and fine-tuned -> checkpoints stored in fp16 when that costs no
accuracy on the test split -> evaluation on the held-out test split (bbox/segm AP,
mIoU) -> ``report.json`` and ``models.yaml``.

Layout of the result::

    <out>/models.yaml                 shapes-maskrcnn (instance), shapes-semseg (semantic)
    <out>/report.json                 test-split figures, precision checks, timings
    <out>/instance/{config.yaml,model.pth,training/}
    <out>/semantic/{config.yaml,model.pth,training/}
    <out>/data/test/                  the held-out split the figures come from

Everything is built in a sibling temporary directory renamed into place at the end,
so an interrupted build never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEMO_SCALE",
    "DemoScale",
    "build_demo_repository",
    "ensure_demo_repository",
    "read_report",
    "toy_scale",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
INSTANCE_NAME = "shapes-maskrcnn"
SEMANTIC_NAME = "shapes-semseg"
# fp16 is kept only when no test metric moves by more than this (AP / mIoU points, x100 scale).
FP16_TOLERANCE = 0.1


@dataclass(frozen=True)
class DemoScale:
    """Sizes of the demo build; the defaults are the shipped demo, tests use toy values."""

    train_images: int = 400
    val_images: int = 50
    test_images: int = 100
    image_size: int = 256
    instance_iters: int = 600
    instance_eval_period: int = 200
    semantic_iters: int = 400
    semantic_eval_period: int = 200
    num_workers: int = 1


DEMO_SCALE = DemoScale()


@dataclass
class _Build:
    """State shared by the stages of one build."""

    root: Path
    seed: int
    scale: DemoScale
    progress: Progress
    datasets: dict[str, str]
    report: dict[str, Any]


def _stage(build: _Build, message: str) -> None:
    build.progress(f"[demo] {message}")


def _make_data(build: _Build) -> None:
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


def _options(build: _Build, iters: int, eval_period: int, **kw: Any) -> Any:
    from models.train import TrainOptions

    warmup = min(100, max(1, iters // 6))
    return TrainOptions(
        max_iter=iters,
        warmup_iters=warmup,
        eval_period=min(eval_period, iters),
        seed=build.seed,
        num_workers=build.scale.num_workers,
        **kw,
    )


def _train_instance(build: _Build) -> Any:
    from models.configs import tiny_instance_config
    from models.data.synthetic import CATEGORIES
    from models.train import train

    s = build.scale
    _stage(build, f"training the instance model ({s.instance_iters} iterations)")
    cfg = tiny_instance_config(len(CATEGORIES), input_size=s.image_size)
    result = train(
        cfg,
        _options(build, s.instance_iters, s.instance_eval_period),
        train_dataset=build.datasets["train"],
        val_dataset=build.datasets["val"],
        output_dir=build.root / "instance" / "training",
    )
    build.report["instance"] = {"iterations": s.instance_iters, "best_val": result.best_metric}
    return result


def _train_semantic(build: _Build, detector_checkpoint: Path) -> Any:
    from models.data.synthetic import CATEGORIES
    from models.semseg.training import train_semantic

    s = build.scale
    _stage(build, f"training the semantic model from the detector's encoder ({s.semantic_iters} iterations)")
    result = train_semantic(
        train_dataset=build.datasets["sem_train"],
        val_dataset=build.datasets["sem_val"],
        num_classes=len(CATEGORIES) + 1,
        options=_options(build, s.semantic_iters, s.semantic_eval_period, dropout=0.1),
        output_dir=build.root / "semantic" / "training",
        encoder_from=detector_checkpoint,
        input_size=s.image_size,
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
    build: _Build, part: str, train_dir: Path, best: Path, test: str, keys: tuple[str, ...]
) -> None:
    """Write ``<part>/config.yaml`` and the smallest ``<part>/model.pth`` that loses no test accuracy."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from models.checkpoint import read_checkpoint_meta, save_checkpoint

    target = build.root / part
    cfg = _load_config(train_dir / "config.yaml", part)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()  # the build's dataset names mean nothing later
    cfg.MODEL.DEVICE = "cpu"
    (target / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(best))
    meta = {"class_names": read_checkpoint_meta(best).get("class_names", [])}
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


def _write_repository_file(root: Path) -> None:
    common = {"device": "auto", "precision": "fp32", "max_batch_size": 4, "max_wait_ms": 5.0}
    entries = [
        {
            "name": name,
            "task": part,
            "config": f"{part}/config.yaml",
            "weights": f"{part}/model.pth",
            **common,
        }
        for name, part in ((INSTANCE_NAME, "instance"), (SEMANTIC_NAME, "semantic"))
    ]
    text = "# Built by `cvserve demo build`; see report.json for test-split figures.\n"
    (root / "models.yaml").write_text(text + yaml.safe_dump({"models": entries}, sort_keys=False))


def _environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_count": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def _run_pipeline(build: _Build) -> None:
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


def build_demo_repository(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    progress: Progress = print,
    force: bool = False,
    scale: DemoScale = DEMO_SCALE,
) -> Path:
    """Build the demo repository into ``out_dir`` and return the path of its ``models.yaml``.

    Args:
        out_dir: the repository directory to create.
        seed: seed of the dataset and of every training run.
        progress: receives one line per stage (training progress goes to logging).
        force: replace an existing ``out_dir``.
        scale: dataset and training sizes.

    Raises:
        FileExistsError: ``out_dir`` exists and ``force`` is False.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (use force to rebuild)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    work = out.parent / f".{out.name}.building-{os.getpid()}"
    work.mkdir()
    start = time.perf_counter()
    build = _Build(work, seed, scale, progress, {}, {"environment": _environment(), "scale": asdict(scale)})
    try:
        _run_pipeline(build)
        build.report["environment"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        build.report["build_seconds"] = round(time.perf_counter() - start, 1)
        (work / "report.json").write_text(json.dumps(build.report, indent=2), encoding="utf-8")
        _write_repository_file(work)  # last: its presence marks a complete repository
        _swap_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _stage(build, f"repository ready in {build.report['build_seconds']:.0f} s: {out / 'models.yaml'}")
    return out / "models.yaml"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(out: Path) -> None:
    """Delete temporary directories of builds whose process is gone (killed, not interrupted)."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if stale.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            logger.info("removing %s, left by an earlier build that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(work: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def ensure_demo_repository(path: str | os.PathLike[str] | None = None, progress: Progress = print) -> Path:
    """Return the demo repository's ``models.yaml``, building the repository first if it is missing.

    Args:
        path: the ``models.yaml`` path; default ``models.repository.default_repository_path()``.
        progress: receives progress lines while building.

    Raises:
        FileExistsError: the directory exists, is not empty and has no ``models.yaml``
            (it is not ours to replace).
    """
    from models.repository import default_repository_path

    yaml_path = Path(path) if path is not None else default_repository_path()
    if yaml_path.is_file():
        return yaml_path
    directory = yaml_path.parent
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists without models.yaml; remove it or pick another directory")
    progress(f"[demo] no model repository at {yaml_path}: building the demo repository (several minutes)")
    return build_demo_repository(directory, progress=progress, force=directory.exists())


def read_report(repository_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``report.json`` of a built demo repository.

    Raises:
        FileNotFoundError: no report (the repository was not built by this module).
    """
    path = Path(repository_dir) / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no demo report (build it with `cvserve demo build`)")
    return dict(json.loads(path.read_text(encoding="utf-8")))


def toy_scale() -> DemoScale:
    """A seconds-long scale for tests of the pipeline's plumbing (the models learn nothing)."""
    return replace(
        DEMO_SCALE,
        train_images=6,
        val_images=2,
        test_images=2,
        image_size=64,
        instance_iters=4,
        instance_eval_period=4,
        semantic_iters=4,
        semantic_eval_period=4,
        num_workers=0,
    )
