"""Folding eval-mode batch norms into convolutions, and channels-last weights: same outputs."""

from __future__ import annotations

import copy
from pathlib import Path

# isort: split

import numpy as np
import pytest
import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm
from detectron2.modeling import build_model
from torch import nn

from cvserve.models.checkpoint import save_checkpoint
from cvserve.models.fusion import fuse_conv_batch_norm, use_channels_last
from cvserve.models.instance.adapter import DetectronModel
from cvserve.models.instance.config import tiny_instance_config
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Task


def _randomise_norms(model: nn.Module) -> None:
    """Statistics and affine parameters far from the identity, as trained weights have."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


def _norm_convs(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, Conv2d) and m.norm is not None)


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_backbone_features_unchanged(norm: str) -> None:
    cfg = tiny_instance_config(3, input_size=64)
    cfg.MODEL.RESNETS.NORM = norm
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _randomise_norms(model)
    fused = copy.deepcopy(model)
    count = fuse_conv_batch_norm(fused)
    assert count == _norm_convs(model) > 0
    assert _norm_convs(fused) == 0
    x = torch.rand(2, 3, 64, 96) * 255
    with torch.no_grad():
        before, after = model.backbone(x), fused.backbone(x)
    for name in before:
        scale = before[name].abs().max()  # float rounding, relative to the feature map's range
        assert (after[name] - before[name]).abs().max() <= 1e-5 * scale, name


def test_group_norm_and_plain_convs_are_left_alone() -> None:
    model = nn.Sequential(
        Conv2d(3, 32, 3, norm=get_norm("GN", 32)), Conv2d(32, 8, 3), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
    ).eval()
    state = copy.deepcopy(model.state_dict())
    assert fuse_conv_batch_norm(model) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_refuses_training_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_batch_norm(nn.Sequential(Conv2d(3, 8, 3, norm=nn.BatchNorm2d(8))).train())


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fusion")
    cfg = tiny_instance_config(3, input_size=64)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    model = build_model(cfg)
    _randomise_norms(model)
    weights = save_checkpoint(model, root / "model.pth", extra={"class_names": ["a", "b", "c"]})
    config = root / "config.yaml"
    config.write_text(cfg.dump(), encoding="utf-8")
    return config, weights


def _served(config: Path, weights: Path, **options: object) -> DetectronModel:
    spec = ModelSpec(
        name="tiny",
        task=Task.INSTANCE,
        config=str(config),
        weights=str(weights),
        device="cpu",
        precision="fp32",  # fused and plain compared to 1e-3: the exact path
        options=options,
    )
    model = DetectronModel(spec)
    model.load()
    return model


def test_served_detections_match_unfused(tiny_files: tuple[Path, Path]) -> None:
    fused, plain = _served(*tiny_files), _served(*tiny_files, fuse_batch_norm=False)
    assert _norm_convs(fused._model) == 0 < _norm_convs(plain._model)
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    (a,) = fused.predict_batch([image])
    (b,) = plain.predict_batch([image])
    assert len(a.instances) == len(b.instances) > 0
    np.testing.assert_allclose([i.score for i in a.instances], [i.score for i in b.instances], atol=1e-3)
    np.testing.assert_allclose([i.box for i in a.instances], [i.box for i in b.instances], atol=1e-2)


def _convs_channels_last(model: nn.Module) -> list[bool]:
    return [
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)  # a 1x1 weight is both layouts at once
    ]


def test_use_channels_last_converts_only_4d_tensors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4))
    assert use_channels_last(model) == 1
    assert _convs_channels_last(model) == [True]
    assert model[1].running_mean.is_contiguous()


def test_served_detections_match_in_either_layout(tiny_files: tuple[Path, Path]) -> None:
    nhwc, nchw = _served(*tiny_files), _served(*tiny_files, channels_last=False)  # default on a CPU: on
    assert all(_convs_channels_last(nhwc._model)) and not any(_convs_channels_last(nchw._model))
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    (a,) = nhwc.predict_batch([image])
    (b,) = nchw.predict_batch([image])
    assert len(a.instances) == len(b.instances) > 0
    assert [i.category_id for i in a.instances] == [i.category_id for i in b.instances]
    np.testing.assert_allclose([i.score for i in a.instances], [i.score for i in b.instances], atol=1e-4)
    np.testing.assert_allclose([i.box for i in a.instances], [i.box for i in b.instances], atol=1e-3)


@pytest.mark.parametrize("option", ["fuse_batch_norm", "channels_last"])
def test_option_must_be_a_boolean(tiny_files: tuple[Path, Path], option: str) -> None:
    with pytest.raises(ValueError, match=f"{option} must be true or false, got 'yes'"):
        _served(*tiny_files, **{option: "yes"})
