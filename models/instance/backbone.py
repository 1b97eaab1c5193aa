"""``build_slim_resnet_fpn_backbone``: ResNet-18/34 of any width under an FPN.

detectron2's ``build_resnet_backbone`` fixes the basic-block ResNets (R18, R34) at
64 channels in ``res2``. Trained from scratch on a CPU, most of the cost of a small
Mask R-CNN is those convolutions: halving every width quarters it. This builder
takes ``MODEL.RESNETS.STEM_OUT_CHANNELS`` and ``RES2_OUT_CHANNELS`` as given (each
later stage doubles), builds the same ``ResNet`` / ``FPN`` modules with the same
parameter names, and so checkpoints, freezing and encoder transfer treat it like
``build_resnet_fpn_backbone``; ``build_slim_resnet_backbone`` is the same ResNet
without the FPN, as ``build_resnet_backbone`` is for detectron2's. Both are registered
in ``BACKBONE_REGISTRY`` when :mod:`cvserve.models.instance.config` is imported.
"""

from __future__ import annotations

# isort: split

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

__all__ = [
    "SLIM_BACKBONE_NAME",
    "SLIM_RESNET_BACKBONE_NAME",
    "build_slim_resnet",
    "build_slim_resnet_backbone",
    "build_slim_resnet_fpn_backbone",
]

SLIM_BACKBONE_NAME = "build_slim_resnet_fpn_backbone"
SLIM_RESNET_BACKBONE_NAME = "build_slim_resnet_backbone"  # the same ResNet without the FPN
_BLOCKS_PER_STAGE = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def build_slim_resnet(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """A basic-block ResNet (``MODEL.RESNETS.DEPTH`` 18 or 34) whose widths come from the config.

    Raises:
        ValueError: another depth, or a width below 8.
    """
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(f"{SLIM_BACKBONE_NAME}: MODEL.RESNETS.DEPTH must be 18 or 34, got {r.DEPTH}")
    if min(r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS) < 8:
        raise ValueError(
            f"{SLIM_BACKBONE_NAME}: MODEL.RESNETS.STEM_OUT_CHANNELS and RES2_OUT_CHANNELS must be >= 8, "
            f"got {r.STEM_OUT_CHANNELS} and {r.RES2_OUT_CHANNELS}"
        )
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    stages = []
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[r.DEPTH]):
        first_stride = 1 if idx == 0 else 2
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=r.NORM,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_slim_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """:func:`build_slim_resnet` alone (outputs ``MODEL.RESNETS.OUT_FEATURES``), as ``build_resnet_backbone``."""
    return build_slim_resnet(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_slim_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """:func:`build_slim_resnet` under detectron2's FPN, as ``build_resnet_fpn_backbone`` builds it."""
    return FPN(
        bottom_up=build_slim_resnet(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
