"""The slim ResNet-FPN backbone: same modules and names as detectron2's, any width."""

from __future__ import annotations

import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

from cvserve.models.instance.backbone import SLIM_BACKBONE_NAME, build_slim_resnet_fpn_backbone
from cvserve.models.instance.config import TINY_INSTANCE_YAML, tiny_instance_config


def _cfg(depth: int = 18, width: int = 16, fpn: int = 16):
    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = SLIM_BACKBONE_NAME
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = width
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = width
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = fpn
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


@pytest.mark.parametrize("depth", [18, 34])
def test_at_width_64_it_is_detectron2s_resnet_fpn(depth: int) -> None:
    cfg = _cfg(depth=depth, width=64, fpn=32)
    slim = build_slim_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    reference = build_resnet_fpn_backbone(cfg, ShapeSpec(channels=3))
    assert {k: v.shape for k, v in slim.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }


def test_half_width_features_and_strides() -> None:
    cfg = _cfg(width=16, fpn=24)
    backbone = build_backbone(cfg)  # through the registry, as build_model does
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "p2": (24, 4),
        "p3": (24, 8),
        "p4": (24, 16),
        "p5": (24, 32),
        "p6": (24, 64),
    }
    stages = backbone.bottom_up.output_shape()
    assert [stages[f"res{i}"].channels for i in range(2, 6)] == [16, 32, 64, 128]
    out = backbone(torch.zeros(1, 3, 64, 96))
    assert out["p2"].shape == (1, 24, 16, 24)
    assert out["p6"].shape == (1, 24, 1, 2)


def test_freeze_at_applies_like_detectron2() -> None:
    cfg = _cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = 2  # stem and res2
    backbone = build_backbone(cfg)
    frozen = {n.split(".")[0] for n, p in backbone.bottom_up.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "res2"}


@pytest.mark.parametrize(
    ("depth", "width", "message"),
    [(50, 16, "DEPTH must be 18 or 34, got 50"), (18, 4, "must be >= 8, got 4 and 4")],
)
def test_bad_config_says_which_key(depth: int, width: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_backbone(_cfg(depth=depth, width=width))


def test_shipped_tiny_yaml_builds_the_slim_model() -> None:
    cfg = get_cfg()
    cfg.merge_from_file(str(TINY_INSTANCE_YAML))
    assert cfg.MODEL.BACKBONE.NAME == SLIM_BACKBONE_NAME
    # The YAML is the function's output (compared as data: the dumps' anchor names differ).
    assert yaml.safe_load(cfg.dump()) == yaml.safe_load(tiny_instance_config(5).dump())
    model = build_model(cfg)
    assert model.backbone.bottom_up.output_shape()["res5"].channels == 256


def test_tiny_config_trains_at_several_sizes_and_tests_at_one() -> None:
    cfg = tiny_instance_config(5, input_size=256, train_sizes=(160, 224))
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (160, 224)
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    assert (cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (373, 256, 427)
    one = tiny_instance_config(5, input_size=128)
    assert tuple(one.INPUT.MIN_SIZE_TRAIN) == (128,)
    assert one.INPUT.MIN_SIZE_TEST == 128


@pytest.mark.parametrize("kwargs", [{"input_size": 16}, {"train_sizes": (192, 16)}, {"train_sizes": ()}])
def test_tiny_config_refuses_sizes_below_32(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="must be >= 32"):
        tiny_instance_config(5, **kwargs)
