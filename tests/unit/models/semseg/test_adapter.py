"""SemanticSegmentationModel built through the model registry from files the test writes."""

from __future__ import annotations

from pathlib import Path

# isort: split

import numpy as np
import pytest
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model as build_d2_model

from cvserve.models.build import build_model
from cvserve.models.registry import MODEL_REGISTRY
from cvserve.models.repository import ModelSpec
from cvserve.models.semseg import SemanticSegmentationModel
from cvserve.models.semseg.adapter import labels_from_logits
from cvserve.models.types import Task

from .conftest import NUM_CLASSES

NAMES = ["background", "circle", "square", "triangle"]


def _write_model(seg_cfg: CfgNode, tmp_path: Path, extra: dict | None = None) -> tuple[Path, Path]:
    config = tmp_path / "config.yaml"
    config.write_text(seg_cfg.dump(), encoding="utf-8")
    weights = tmp_path / "model.pth"
    net = build_d2_model(seg_cfg)
    torch.save({"model": net.state_dict(), **(extra or {})}, weights)
    return config, weights


def _build(spec: ModelSpec) -> SemanticSegmentationModel:
    model = MODEL_REGISTRY[Task.SEMANTIC](spec)
    assert isinstance(model, SemanticSegmentationModel)
    return model


def _spec(config: Path, weights: Path, **options: object) -> ModelSpec:
    """fp32: these tests compare outputs to the float rounding (bf16 would be precision auto's pick)."""
    return ModelSpec(
        name="seg",
        task=Task.SEMANTIC,
        config=str(config),
        weights=str(weights),
        device="cpu",
        precision="fp32",
        options=options,
    )


def test_registry_builds_and_predicts_original_sizes(seg_cfg: CfgNode, tmp_path: Path) -> None:
    config, weights = _write_model(seg_cfg, tmp_path, {"__cvserve__": {"class_names": NAMES}})
    model = build_model(_spec(config, weights))
    assert isinstance(model, SemanticSegmentationModel)
    assert not model.ready
    model.load()
    assert model.ready
    assert model.class_names == tuple(NAMES)

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 255, (50, 90, 3), dtype=np.uint8),
        rng.integers(0, 255, (120, 64, 3), dtype=np.uint8),
    ]
    preds = model.predict_batch(images)

    for pred, image in zip(preds, images, strict=True):
        assert pred.image_size == image.shape[:2]
        assert pred.semantic is not None
        assert pred.semantic.labels.shape == image.shape[:2]
        assert pred.semantic.labels.dtype == np.uint8
        assert pred.semantic.labels.max() < NUM_CLASSES
        assert pred.semantic.class_names == tuple(NAMES)
        assert not pred.instances


def test_preprocess_resizes_and_converts_to_bgr(seg_cfg: CfgNode, tmp_path: Path) -> None:
    config, weights = _write_model(seg_cfg, tmp_path)
    model = _build(_spec(config, weights, min_size_test=32, class_names=["a", "b", "c", "d"]))
    model.load()
    image = np.zeros((40, 80, 3), np.uint8)
    image[..., 0] = 200  # red in RGB
    item = model.preprocess(image)
    assert (item["height"], item["width"]) == (32, 64)
    assert item["image"].shape == (3, 32, 64)
    assert item["image"].dtype == torch.uint8
    assert float(item["image"][2].float().mean()) == pytest.approx(200)  # red is the last channel in BGR
    assert int(item["image"][0].max()) == 0
    logits = model.forward([item])[0]
    as_float = model.forward([{**item, "image": item["image"].float()}])[0]
    assert torch.equal(logits, as_float)  # normalisation promotes uint8 to the same float32 values
    assert logits.shape == (NUM_CLASSES, 32, 64)
    assert model.postprocess(logits, (40, 80)).semantic.labels.shape == (40, 80)
    assert model.class_names == ("a", "b", "c", "d")
    with pytest.raises(ValueError, match="uint8"):
        model.preprocess(np.zeros((10, 10), np.uint8))


def test_class_names_default_without_metadata(seg_cfg: CfgNode, tmp_path: Path) -> None:
    config, weights = _write_model(seg_cfg, tmp_path)
    model = _build(_spec(config, weights))
    model.load()
    assert model.class_names == tuple(f"class_{i}" for i in range(NUM_CLASSES))


def test_missing_files_name_the_model_and_file(seg_cfg: CfgNode, tmp_path: Path) -> None:
    config, _ = _write_model(seg_cfg, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'seg'.*absent\.pth"):
        _build(_spec(config, tmp_path / "absent.pth")).load()
    with pytest.raises(FileNotFoundError, match=r"'seg'.*nope\.yaml"):
        _build(_spec(tmp_path / "nope.yaml", tmp_path / "model.pth")).load()
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  NOT_A_KEY: 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.yaml"):
        _build(_spec(bad, tmp_path / "model.pth")).load()


@pytest.mark.parametrize("option", ["fuse_batch_norm", "channels_last"])
def test_a_non_boolean_option_fails_before_the_weights_are_read(
    seg_cfg: CfgNode, tmp_path: Path, option: str
) -> None:
    config, _ = _write_model(seg_cfg, tmp_path)
    # The weights file does not exist: the option error must come first.
    with pytest.raises(ValueError, match=f"'seg': option {option} must be true or false, got 'yes'"):
        _build(_spec(config, tmp_path / "absent.pth", **{option: "yes"})).load()


def test_channels_last_gives_the_same_labels(seg_cfg: CfgNode, tmp_path: Path) -> None:
    config, weights = _write_model(seg_cfg, tmp_path)
    nhwc, nchw = _build(_spec(config, weights)), _build(_spec(config, weights, channels_last=False))
    nhwc.load()
    nchw.load()
    stem = nhwc.model.backbone.bottom_up.stem.conv1.weight  # type: ignore[union-attr]
    assert stem.is_contiguous(memory_format=torch.channels_last)  # the default on a CPU
    image = np.random.default_rng(0).integers(0, 255, (40, 72, 3), dtype=np.uint8)
    a = nhwc.forward([nhwc.preprocess(image)])[0]
    b = nchw.forward([nchw.preprocess(image)])[0]
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()  # float rounding, relative to the logits' range
    assert np.array_equal(
        nhwc.postprocess(a, (40, 72)).semantic.labels, nchw.postprocess(b, (40, 72)).semantic.labels
    )


def test_the_gpu_path_gives_the_cpu_labels(seg_cfg: CfgNode, tmp_path: Path) -> None:
    # On a GPU, forward upsamples and argmaxes on the device and returns label maps; the same
    # code, run here on CPU tensors by naming a CUDA device after loading, must agree with the
    # CPU path (logits out of forward, labels in postprocess).
    config, weights = _write_model(seg_cfg, tmp_path, {"__cvserve__": {"class_names": NAMES}})
    model = build_model(_spec(config, weights))
    model.load()
    rng = np.random.default_rng(1)
    images = [
        rng.integers(0, 255, (50, 90, 3), dtype=np.uint8),
        rng.integers(0, 255, (77, 41, 3), dtype=np.uint8),
    ]
    inputs = [model.preprocess(img) for img in images]
    on_cpu = model.forward(inputs)
    assert all(raw.ndim == 3 and raw.dtype == torch.float32 for raw in on_cpu)  # logits
    model.device = "cuda:0"
    on_device = model.forward(inputs)
    for img, raw, labels in zip(images, on_cpu, on_device, strict=True):
        assert labels.shape == img.shape[:2] and labels.dtype == torch.uint8  # only labels leave the device
        cpu_pred = model.postprocess(raw, img.shape[:2])
        gpu_pred = model.postprocess(labels, img.shape[:2])
        assert cpu_pred.semantic is not None and gpu_pred.semantic is not None
        np.testing.assert_array_equal(cpu_pred.semantic.labels, gpu_pred.semantic.labels)


def test_labels_from_logits_picks_int32_beyond_256_classes() -> None:
    logits = torch.zeros(300, 4, 4)
    logits[299] = 1.0
    labels = labels_from_logits(logits, (8, 6))
    assert labels.dtype == torch.int32 and labels.shape == (8, 6) and bool((labels == 299).all())
