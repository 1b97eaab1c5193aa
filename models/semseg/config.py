"""Config keys of the encoder-decoder segmenter and a builder for its config.

The segmenter reuses detectron2's config tree: the encoder is whatever
``MODEL.BACKBONE`` builds, the classes, ignore label, norm and loss weight live in
``MODEL.SEM_SEG_HEAD``, and the keys specific to this model live in ``MODEL.SEMSEG``.
"""

from __future__ import annotations

import copy

# isort: split

from detectron2.config import CfgNode, get_cfg

from cvserve.models.instance.backbone import SLIM_BACKBONE_NAME, SLIM_RESNET_BACKBONE_NAME
from cvserve.models.instance.config import config_file, tiny_instance_config

__all__ = ["ENCODER_CHOICES", "FREEZE_CHOICES", "META_ARCH_NAME", "add_semseg_config", "semseg_config"]

META_ARCH_NAME = "EncoderDecoderSegmentor"
# What ``MODEL.SEMSEG.FREEZE_ENCODER_AT`` accepts, in encoder order: each freezes itself and all before it.
FREEZE_CHOICES = ("none", "stem", "res2", "res3", "res4", "res5", "encoder")
# What the decoder reads: "resnet", the detector's bottom-up ResNet stages (res2..res5,
# the backbone builder swapped for its FPN-less counterpart), or "fpn", the detector's
# backbone as it is (its FPN levels). With the demo's detector the ResNet stages gave 83.3
# test mIoU against 79.8 in the same 1000 steps (benchmarks/README.md).
ENCODER_CHOICES = ("resnet", "fpn")
_BOTTOM_UP_BUILDERS = {
    "build_resnet_fpn_backbone": "build_resnet_backbone",
    "build_retinanet_resnet_fpn_backbone": "build_resnet_backbone",
    SLIM_BACKBONE_NAME: SLIM_RESNET_BACKBONE_NAME,
}
# Config subtrees that define the encoder and the pixel normalisation its weights were trained with.
_ENCODER_KEYS = ("BACKBONE", "RESNETS", "FPN", "PIXEL_MEAN", "PIXEL_STD")


def add_semseg_config(cfg: CfgNode) -> CfgNode:
    """Add the segmenter's keys with their defaults to ``cfg`` (in place); idempotent.

    Keys:
        ``MODEL.SEM_SEG_HEAD.DROPOUT``: dropout probability before the classifier.
        ``MODEL.SEMSEG.IN_FEATURES``: encoder features the decoder reads, shallow to deep;
            empty = every encoder output with a stride of at most 32.
        ``MODEL.SEMSEG.DECODER_CHANNELS``: channels of each decoder block, deep to shallow;
            one entry per feature (the deepest entry is the bottleneck block).
        ``MODEL.SEMSEG.FREEZE_ENCODER_AT``: one of :data:`FREEZE_CHOICES`.
        ``MODEL.SEMSEG.CLASS_WEIGHTS``: per-class cross-entropy weights; empty = uniform.
        ``MODEL.SEMSEG.LOGIT_ADJUSTMENT``: at inference, subtract this times the log of each
            class weight from the logits (0 = off). The weighted loss trains the logits of
            class ``c`` towards ``log(weight_c * p(c | pixel))``; 1 removes that bias.

    Returns:
        ``cfg``, for chaining.
    """
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    if "DROPOUT" not in cfg.MODEL.SEM_SEG_HEAD:
        cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1
    if "SEMSEG" not in cfg.MODEL:
        cfg.MODEL.SEMSEG = CfgNode()
        cfg.MODEL.SEMSEG.IN_FEATURES = []
        cfg.MODEL.SEMSEG.DECODER_CHANNELS = [128, 96, 64, 48]
        cfg.MODEL.SEMSEG.FREEZE_ENCODER_AT = "none"
        cfg.MODEL.SEMSEG.CLASS_WEIGHTS = []
    if "LOGIT_ADJUSTMENT" not in cfg.MODEL.SEMSEG:  # configs written before the key existed
        cfg.MODEL.SEMSEG.LOGIT_ADJUSTMENT = 1.0
    if was_frozen:
        cfg.freeze()
    return cfg


def _detection_config(source: str) -> CfgNode:
    """A detection config from a YAML file or a model-zoo config name."""
    cfg = get_cfg()
    add_semseg_config(cfg)  # lets a saved segmenter config serve as a backbone source too
    path = config_file(source)
    if path is None:
        raise FileNotFoundError(
            f"backbone config {source!r}: neither a YAML file nor a model-zoo config name"
        )
    cfg.merge_from_file(str(path))
    return cfg


def _default_backbone() -> CfgNode:
    return tiny_instance_config(1)


def semseg_config(
    num_classes: int, *, backbone_from: CfgNode | str | None, input_size: int = 256, encoder: str = "resnet"
) -> CfgNode:
    """Build the config of an :data:`META_ARCH_NAME` model whose encoder matches a detection model.

    The encoder subtrees (``MODEL.BACKBONE``, ``RESNETS``, ``FPN``, pixel mean/std) and the
    input format are copied from the detection config, so the detection checkpoint's
    backbone weights load into the segmenter unchanged.

    Args:
        num_classes: number of labels including background (label values ``0..num_classes-1``).
        backbone_from: a detection config, a YAML path or model-zoo name of one, or None
            for the project's tiny instance-segmentation config.
        input_size: shortest image side in training and testing.
        encoder: one of :data:`ENCODER_CHOICES`: the detector's ResNet stages, or its
            whole backbone (FPN levels).

    Returns:
        A new, unfrozen config.

    Raises:
        ValueError: ``num_classes`` < 2, ``input_size`` < 32, an unknown ``encoder``, or
            ``"resnet"`` for a backbone builder without a known ResNet-only counterpart.
        FileNotFoundError: ``backbone_from`` names no file or model-zoo config.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background and at least one class), got {num_classes}")
    if input_size < 32:
        raise ValueError(f"input_size must be >= 32, got {input_size}")
    if encoder not in ENCODER_CHOICES:
        raise ValueError(f"encoder must be one of {', '.join(ENCODER_CHOICES)}, got {encoder!r}")
    if backbone_from is None:
        source = _default_backbone()
    elif isinstance(backbone_from, CfgNode):
        source = backbone_from
    else:
        source = _detection_config(str(backbone_from))

    cfg = add_semseg_config(get_cfg())
    for key in _ENCODER_KEYS:
        cfg.MODEL[key] = copy.deepcopy(source.MODEL[key])
    cfg.INPUT.FORMAT = source.INPUT.FORMAT
    if encoder == "resnet":
        cfg.MODEL.BACKBONE.NAME = _bottom_up_builder(cfg.MODEL.BACKBONE.NAME)
    cfg.MODEL.META_ARCHITECTURE = META_ARCH_NAME
    cfg.MODEL.MASK_ON = False
    cfg.MODEL.WEIGHTS = ""
    # The segmenter freezes through MODEL.SEMSEG.FREEZE_ENCODER_AT, after the encoder is built.
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"
    cfg.INPUT.MIN_SIZE_TRAIN = (input_size,)
    cfg.INPUT.MAX_SIZE_TRAIN = max(input_size, 1333 * input_size // 800)
    cfg.INPUT.MIN_SIZE_TEST = input_size
    cfg.INPUT.MAX_SIZE_TEST = max(input_size, 1333 * input_size // 800)
    return cfg


def _bottom_up_builder(builder: str) -> str:
    """The ResNet-only counterpart of a detection backbone builder (FPN over ResNet -> ResNet)."""
    if builder in _BOTTOM_UP_BUILDERS:
        return _BOTTOM_UP_BUILDERS[builder]
    if builder in _BOTTOM_UP_BUILDERS.values():
        return builder
    raise ValueError(
        f"encoder 'resnet': no ResNet-only counterpart of backbone {builder!r} is known"
        f" ({', '.join(sorted(_BOTTOM_UP_BUILDERS))}); use encoder 'fpn'"
    )
