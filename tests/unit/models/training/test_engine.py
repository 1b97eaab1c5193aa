"""The training engine: options, solver, augmentations, history and short real runs."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T

from cvserve.models import precision
from cvserve.models.data.augment import ColorJitterTransform, GaussianNoiseTransform, build_augmentations
from cvserve.models.data.datasets import register_coco_split, register_semantic_split
from cvserve.models.data.synthetic import CATEGORIES, SplitPaths, generate_dataset
from cvserve.models.instance.config import tiny_instance_config
from cvserve.models.precision import CpuBf16, resolve_precision
from cvserve.models.training.engine import train
from cvserve.models.training.history import MetricsHistory, flatten_results
from cvserve.models.training.monitor import Selection
from cvserve.models.training.options import TrainOptions, add_train_options, options_from_args
from cvserve.models.training.solver import build_lr_scheduler, build_optimizer, l1_penalty, train_step

# -- options -------------------------------------------------------------------------------------


def test_flags_round_trip_to_options() -> None:
    parser = argparse.ArgumentParser()
    add_train_options(parser)
    args = parser.parse_args(
        [
            "--optimizer",
            "adamw",
            "--lr",
            "0.002",
            "--l1",
            "1e-6",
            "--dropout",
            "0.2",
            "--max-iter",
            "50",
            "--warmup-iters",
            "5",
            "--lr-schedule",
            "cosine",
            "--lr-steps",
            "20",
            "40",
            "--no-hflip",
            "--vflip",
            "--scale-jitter",
            "0.8",
            "1.2",
            "--crop",
            "0.9",
            "--rotation",
            "15",
            "--color-jitter",
            "0.3",
            "--noise-std",
            "6",
            "--early-stop-patience",
            "3",
            "--early-stop-metric",
            "bbox/AP",
            "--num-workers",
            "0",
            "--processes",
            "2",
            "--precision",
            "bf16",
        ]
    )
    opts = options_from_args(args)
    assert opts == TrainOptions(
        optimizer="adamw", lr=0.002, l1=1e-6, dropout=0.2, max_iter=50, warmup_iters=5,
        lr_schedule="cosine", lr_steps=(20, 40), hflip=False, vflip=True, scale_jitter=(0.8, 1.2),
        crop=0.9, rotation=15, color_jitter=0.3, noise_std=6, early_stop_patience=3,
        early_stop_metric="bbox/AP", num_workers=0, processes=2, precision="bf16",
    )  # fmt: skip
    assert options_from_args(parser.parse_args([])) == TrainOptions()


@pytest.mark.parametrize(
    ("field", "value"),
    [("optimizer", "lamb"), ("lr", 0), ("num_workers", 3), ("dropout", 1.0), ("crop", 1.5),
     ("warmup_iters", 10_000), ("lr_steps", (700,)), ("color_jitter", 1.0), ("scale_jitter", (2.0, 1.0)),
     ("precision", "int8")],
)  # fmt: skip
def test_invalid_option_names_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"training option {field} must be"):
        TrainOptions(**{field: value})


# -- solver --------------------------------------------------------------------------------------


class _Recorder(torch.nn.Module):
    """A one-convolution "detector": records the dtype its convolution computes in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.dtypes: list[torch.dtype] = []

    def forward(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        out = self.conv(torch.stack([b["image"] for b in batch]).float())
        self.dtypes.append(out.dtype)
        return {"loss_test": out.float().square().mean()}


@pytest.mark.parametrize(("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_train_step_runs_the_forward_under_the_serving_autocast(precision: str, dtype: torch.dtype) -> None:
    # The CPU bf16 step runs the code a CUDA fp16 step runs (models.precision.autocast).
    model = _Recorder()
    before = model.conv.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    batch = [{"image": torch.rand(3, 8, 8)} for _ in range(2)]
    losses = train_step(model, batch, optimizer, scaler, TrainOptions(grad_clip=0), "cpu", precision)
    assert model.dtypes == [dtype]
    assert model.conv.weight.dtype == torch.float32 and not torch.equal(model.conv.weight, before)
    assert set(losses) == {"loss_test", "total_loss"}


@pytest.mark.parametrize("native", [True, False])
def test_training_precision_auto_is_mixed_where_native(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision, "cpu_bf16", lambda: CpuBf16(native, ("amx_bf16",) * native, "test"))
    assert resolve_precision("auto", "cuda:0") == "fp16"
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp16", "cpu") == "fp32"
    assert resolve_precision("fp32", "cuda") == "fp32"


def _lrs(options: TrainOptions) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, options)
    scheduler = build_lr_scheduler(optimizer, options)
    out = []
    for it in range(1, options.max_iter + 1):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if it < options.max_iter:  # as train() does: fvcore schedules end at max_iter
            scheduler.step()
    return out


def test_step_schedule_with_warmup() -> None:
    lrs = _lrs(TrainOptions(lr=0.1, max_iter=90, warmup_iters=10, lr_steps=(60, 80)))
    assert lrs[0] == pytest.approx(0.1 * 0.001)
    assert lrs[5] < lrs[9] < lrs[10] == pytest.approx(0.1)
    assert (
        lrs[59] == pytest.approx(0.1) and lrs[60] == pytest.approx(0.01) and lrs[85] == pytest.approx(0.001)
    )


def test_cosine_and_constant_schedules() -> None:
    cosine = _lrs(TrainOptions(lr=0.1, max_iter=100, warmup_iters=0, lr_schedule="cosine"))
    assert (
        cosine[0] == pytest.approx(0.1) and cosine[50] == pytest.approx(0.05, abs=2e-3) and cosine[-1] < 1e-3
    )
    assert set(_lrs(TrainOptions(lr=0.1, max_iter=20, warmup_iters=0, lr_schedule="constant"))) == {0.1}


def test_linear_schedule_falls_to_zero_after_warmup() -> None:
    lrs = _lrs(TrainOptions(lr=0.1, max_iter=100, warmup_iters=10, lr_schedule="linear"))
    assert lrs[0] == pytest.approx(0.1 * 0.001)
    assert lrs[10] == pytest.approx(0.09, abs=1e-3)  # the decay runs from iteration 0, under the warm-up
    assert lrs[50] == pytest.approx(0.05, abs=1e-3)
    assert all(a > b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] < 2e-3


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("sgd", torch.optim.SGD),
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("rmsprop", torch.optim.RMSprop),
    ],
)
def test_optimizers_and_no_decay_on_norm(name: str, cls: type) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, TrainOptions(optimizer=name, weight_decay=0.01))
    assert isinstance(optimizer, cls)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model[0].weight)] == 0.01
    assert decay[id(model[1].weight)] == 0.0


def test_l1_penalty_sums_weights_only() -> None:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, -0.5)
    torch.nn.init.constant_(model.bias, 4.0)
    assert float(l1_penalty(model).detach()) == pytest.approx(3.0)


# -- augmentation --------------------------------------------------------------------------------


def test_photometric_transforms_touch_only_the_image() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (20, 30), dtype=np.uint8)
    boxes = np.array([[1.0, 2.0, 10.0, 12.0]])
    for tfm in (ColorJitterTransform(1.2, 0.8, 1.3, 0.05), GaussianNoiseTransform(8.0, seed=3)):
        out = tfm.apply_image(image)
        assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
        np.testing.assert_array_equal(tfm.apply_segmentation(labels), labels)
        np.testing.assert_array_equal(tfm.apply_box(boxes), boxes)
    noise = GaussianNoiseTransform(8.0, seed=3)
    np.testing.assert_array_equal(noise.apply_image(image), noise.apply_image(image))


def test_augmentation_list_keeps_image_and_labels_aligned() -> None:
    cfg = tiny_instance_config(2, input_size=64)
    augs = build_augmentations(
        cfg,
        hflip=True,
        vflip=True,
        scale_jitter=(0.5, 1.5),
        crop=0.8,
        rotation=20,
        color_jitter=0.4,
        noise_std=5,
    )
    kinds = [type(a).__name__ for a in augs]
    assert kinds == [
        "ResizeShortestEdge", "RandomCrop", "RandomRotation", "RandomFlip", "RandomFlip", "ColorJitter", "GaussianNoise",
    ]  # fmt: skip
    image = np.zeros((64, 96, 3), np.uint8)
    labels = np.zeros((64, 96), np.uint8)
    image[10:30, 20:50], labels[10:30, 20:50] = 200, 3
    np.random.seed(0)
    aug_input = T.AugInput(image, sem_seg=labels)
    T.AugmentationList(augs)(aug_input)
    assert aug_input.image.shape[:2] == aug_input.sem_seg.shape
    assert set(np.unique(aug_input.sem_seg)) <= {0, 3}  # nearest-neighbour for labels
    with pytest.raises(ValueError, match="crop"):
        build_augmentations(cfg, crop=0)


# -- history and selection -----------------------------------------------------------------------


def test_flatten_results_drops_nan() -> None:
    flat = flatten_results({"bbox": {"AP": 50.0, "APl": math.nan}, "sem_seg": {"mIoU": 1}})
    assert flat == {"bbox/AP": 50.0, "sem_seg/mIoU": 1.0}


def test_history_writes_csv_json_plot(tmp_path: Path) -> None:
    history = MetricsHistory(tmp_path)
    for i in range(1, 6):
        history.add({"iteration": i, "lr": 0.1, "total_loss": 1.0 / i})
    history.add({"iteration": 5, "val/segm/AP": 40.0})
    history.write({"best_metric": 40.0}, "segm/AP")
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "iteration,lr,total_loss,val/segm/AP" and len(lines) == 7
    assert json.loads((tmp_path / "metrics.json").read_text())["summary"] == {"best_metric": 40.0}
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="iteration"):
        history.add({"lr": 1})


def test_selection_keeps_best_and_stops_after_patience() -> None:
    sel = Selection(metric="", patience=2)
    assert sel.update({"bbox/AP": 10.0, "segm/AP": 5.0}) and sel.metric == "segm/AP"
    assert sel.update({"segm/AP": 7.0}) and not sel.should_stop
    assert not sel.update({"segm/AP": 7.0}) and not sel.should_stop
    assert not sel.update({"segm/AP": 6.0}) and sel.should_stop
    assert sel.best == 7.0
    with pytest.raises(ValueError, match="'mIoU' is not reported by the evaluator; available: segm/AP"):
        Selection(metric="mIoU", patience=0).update({"segm/AP": 1.0})


# -- real runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SplitPaths]:
    splits = generate_dataset(
        tmp_path_factory.mktemp("shapes"), seed=2, splits={"train": 6, "val": 2}, image_size=(64, 64)
    )
    for name, paths in splits.items():
        register_coco_split(f"train_test_{name}", paths)
    return splits


def _quick(**overrides: object) -> TrainOptions:
    base: dict = dict(
        max_iter=3, warmup_iters=1, batch_size=2, eval_period=3, num_workers=0, log_period=1, device="cpu"
    )
    return TrainOptions(**{**base, **overrides})


@pytest.mark.slow
def test_instance_training_is_deterministic_and_complete(shapes: dict, tmp_path: Path) -> None:
    cfg = tiny_instance_config(len(CATEGORIES), input_size=64)
    runs = [
        train(
            cfg,
            _quick(),
            train_dataset="train_test_train",
            val_dataset="train_test_val",
            output_dir=tmp_path / str(i),
        )
        for i in range(2)
    ]
    losses = [[(r["iteration"], r["total_loss"]) for r in run.history if "total_loss" in r] for run in runs]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    result = runs[0]
    assert result.best_metric is not None and 0 <= result.best_metric <= 100
    assert result.best_checkpoint.exists() and result.last_checkpoint.exists()
    assert (tmp_path / "0" / "config.yaml").read_text().count("NUM_CLASSES: 5") >= 1
    state = torch.load(result.last_checkpoint, weights_only=True)
    assert state["__cvserve__"]["class_names"] == list(CATEGORIES)
    assert any("val/bbox/AP" in r for r in result.history)


@pytest.mark.slow
def test_a_bf16_training_step_matches_the_fp32_one(shapes: dict, tmp_path: Path) -> None:
    # The same initial weights and batch (same seed): the first step's losses under bf16 autocast
    # against fp32's. Measured: total 0.6 % apart, classification terms 0.1 %; box regression
    # moves more (up to 10 %), since bf16 may change which proposals are sampled as positives.
    cfg = tiny_instance_config(len(CATEGORIES), input_size=64)
    first = {}
    for mode in ("fp32", "bf16"):
        run = train(cfg, _quick(max_iter=1, eval_period=1, precision=mode),
                    train_dataset="train_test_train", val_dataset=None, output_dir=tmp_path / mode)  # fmt: skip
        first[mode] = next(r for r in run.history if "total_loss" in r)
    fp32, bf16 = first["fp32"], first["bf16"]
    assert bf16["total_loss"] == pytest.approx(fp32["total_loss"], rel=0.02)
    for term in ("loss_cls_stage0", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"):
        assert bf16[term] == pytest.approx(fp32[term], rel=0.01), term


@pytest.mark.slow
def test_semantic_meta_arch_trains_through_the_same_engine(shapes: dict, tmp_path: Path) -> None:
    semseg = pytest.importorskip("cvserve.models.semseg.config")
    paths = shapes["train"]
    names = ("background", *CATEGORIES)
    register_semantic_split("train_test_sem", paths.images, paths.semantic_labels, names)
    cfg = semseg.semseg_config(len(names), backbone_from=None, input_size=64)
    result = train(cfg, _quick(dropout=0.3, max_iter=2, eval_period=2), train_dataset="train_test_sem",
                   val_dataset="train_test_sem", output_dir=tmp_path)  # fmt: skip
    assert result.best_metric is not None
    assert any("val/sem_seg/mIoU" in r for r in result.history)
    assert "DROPOUT: 0.3" in (tmp_path / "config.yaml").read_text()


@pytest.mark.gpu
@pytest.mark.slow
def test_fp16_training_on_cuda_keeps_roi_align_fp32(
    shapes: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvserve.models.training import engine

    swapped: list[int] = []
    real = engine.keep_roi_align_fp32
    monkeypatch.setattr(
        engine, "keep_roi_align_fp32", lambda model: swapped.append(real(model)) or swapped[-1]
    )
    cfg = tiny_instance_config(len(CATEGORIES), input_size=64)
    result = train(
        cfg,
        _quick(device="cuda", precision="fp16", max_iter=2),
        train_dataset="train_test_train",
        val_dataset=None,
        output_dir=tmp_path,
    )
    assert swapped and swapped[0] > 0  # the box and mask poolers' levels
    assert result.last_checkpoint.exists()
