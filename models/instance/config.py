"""Reading detectron2 configs, and the tiny Mask R-CNN trained from scratch on a CPU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# isort: split

from detectron2 import model_zoo
from detectron2.config import CfgNode, LazyConfig, get_cfg

from cvserve.models.instance.backbone import SLIM_BACKBONE_NAME
from cvserve.models.instance.roi_heads import LAST_STAGE_MASK_HEADS_NAME

__all__ = [
    "LAST_STAGE_MASK_HEADS_NAME",
    "TINY_INSTANCE_YAML",
    "config_file",
    "load_config",
    "tiny_instance_config",
]

BASE_INSTANCE_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
TINY_INSTANCE_YAML = Path(__file__).with_name("tiny_mask_rcnn.yaml")


def config_file(config: str) -> Path | None:
    """``config`` itself when it is a file, else the detectron2 model-zoo config of that name; None if neither."""
    path = Path(config)
    if path.is_file():
        return path
    try:
        return Path(model_zoo.get_config_file(config))
    except RuntimeError:
        return None


def load_config(config: str) -> CfgNode | Any:
    """Read a model-zoo name, a YAML file or a LazyConfig ``.py`` file.

    Raises:
        ValueError: the file does not exist and is not a model-zoo name.
    """
    path = config_file(config)
    if path is None:
        raise ValueError(f"config {config!r}: neither a file nor a detectron2 model-zoo config")
    if path.suffix == ".py":
        return LazyConfig.load(str(path))
    cfg = get_cfg()
    cfg.set_new_allowed(True)  # configs of custom heads carry keys the default config lacks
    cfg.merge_from_file(str(path))
    return cfg


def tiny_instance_config(
    num_classes: int, *, input_size: int = 256, train_sizes: Sequence[int] | None = None
) -> CfgNode:
    """A Mask R-CNN small enough to train from scratch on a CPU in minutes.

    ResNet-18 at half width with BatchNorm (trainable from the stem: there are no
    pretrained weights to freeze; :mod:`cvserve.models.instance.backbone` builds it), a
    32-channel FPN, cascade box heads, smaller heads and sampling, anchors one
    octave smaller than COCO's (objects of 15-100 px at 256 px), bitmask ground truth
    (RLE annotations and masks with holes), and a schedule of 600 iterations of 4 images.

    Args:
        num_classes: number of object categories.
        input_size: short edge of test images (``INPUT.MIN_SIZE_TEST``), and of training
            images unless ``train_sizes`` is given.
        train_sizes: short edges to train at, one drawn per image (``INPUT.MIN_SIZE_TRAIN``
            with ``choice`` sampling); None = ``(input_size,)``.

    Returns:
        A fresh, unfrozen config.

    Raises:
        ValueError: ``num_classes`` < 1, or ``input_size`` or a training size < 32.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    sizes = (input_size,) if train_sizes is None else tuple(int(x) for x in train_sizes)
    if input_size < 32 or not sizes or min(sizes) < 32:
        raise ValueError(f"input_size and train_sizes must be >= 32, got {input_size} and {train_sizes}")
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(BASE_INSTANCE_CONFIG))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PIXEL_STD = [57.375, 57.120, 58.395]  # not the Caffe2 [1, 1, 1]: no pretrained weights
    _slim_backbone(cfg.MODEL)
    _small_heads(cfg.MODEL, num_classes)
    _schedule(cfg, sizes, input_size)
    return cfg


def _slim_backbone(model: CfgNode) -> None:
    # ResNet-18 at half width (32 to 256 channels) under a 32-channel FPN: 2.4x cheaper per
    # training iteration than the standard 64-channel ResNet-18 with a 64-channel FPN.
    model.BACKBONE.NAME = SLIM_BACKBONE_NAME
    model.RESNETS.DEPTH = 18
    model.RESNETS.STEM_OUT_CHANNELS = 32
    model.RESNETS.RES2_OUT_CHANNELS = 32
    model.RESNETS.NORM = "BN"
    model.BACKBONE.FREEZE_AT = 0
    model.FPN.OUT_CHANNELS = 32
    model.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]


def _small_heads(model: CfgNode, num_classes: int) -> None:
    model.RPN.BATCH_SIZE_PER_IMAGE = 128
    # At most a dozen objects per image: 500 / 250 training proposals (COCO's are 2000 /
    # 1000) save NMS time (see benchmarks/README.md, "The demo recipe at 192 px").
    model.RPN.PRE_NMS_TOPK_TRAIN = 500
    model.RPN.POST_NMS_TOPK_TRAIN = 250
    # The same 250 at test time: each cascade stage classifies every proposal, and 1000
    # made the demo detector 1.7x slower for the same AP (benchmarks/README.md, "Several
    # training sizes, testing at 256 px, and AdamW").
    model.RPN.POST_NMS_TOPK_TEST = 250
    model.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    model.ROI_HEADS.NUM_CLASSES = num_classes
    # Cascade R-CNN (three box stages at IoU 0.5 / 0.6 / 0.7), the mask head trained on the
    # last stage's boxes (models/instance/roi_heads.py): in the same 900 demo steps, 83.8 bbox
    # and 72.9 segm test AP against 68.7 / 63.5 for StandardROIHeads, for about 1.15x the
    # training time (benchmarks/README.md, "Cascade heads").
    model.ROI_HEADS.NAME = LAST_STAGE_MASK_HEADS_NAME
    model.ROI_BOX_HEAD.FC_DIM = 256
    # The mask head runs four 3x3 convolutions on every positive RoI: at 64 channels they
    # cost more than the backbone per training step at 128 px; at 32 they cost a quarter.
    model.ROI_MASK_HEAD.CONV_DIM = 32
    # One box regressor and one mask predictor shared by every class: each learns from all
    # positives instead of a fifth of them, which matters when training from scratch.
    model.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    model.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = True


def _schedule(cfg: CfgNode, sizes: Sequence[int], input_size: int) -> None:
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(sizes)
    cfg.INPUT.MAX_SIZE_TRAIN = round(max(sizes) * 1333 / 800)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MIN_SIZE_TEST = input_size
    cfg.INPUT.MAX_SIZE_TEST = round(input_size * 1333 / 800)
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.DATALOADER.NUM_WORKERS = 1
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.WARMUP_ITERS = 100
    cfg.SOLVER.MAX_ITER = 600
    cfg.SOLVER.STEPS = (400, 533)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 5.0
    cfg.TEST.EVAL_PERIOD = 200
