"""Tiny detection and segmentation configs, built without weights, for the segmenter tests."""

from __future__ import annotations

# isort: split

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg

from cvserve.models.semseg import semseg_config

NUM_CLASSES = 4


def tiny_detection_cfg() -> CfgNode:
    """An R18-FPN Mask R-CNN config at toy sizes (random weights, CPU)."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    return cfg


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def det_cfg() -> CfgNode:
    return tiny_detection_cfg()


@pytest.fixture
def seg_cfg(det_cfg: CfgNode) -> CfgNode:
    cfg = semseg_config(NUM_CLASSES, backbone_from=det_cfg, input_size=64, encoder="fpn")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEMSEG.DECODER_CHANNELS = [32, 16, 16, 16]
    return cfg
