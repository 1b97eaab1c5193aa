"""``EncoderDecoderSegmentor``: a detectron2 backbone encoder with a U-Net style decoder.

Registered in detectron2's ``META_ARCH_REGISTRY``, so ``build_model(cfg)`` and
``DetectionCheckpointer`` build and load it like any detectron2 model. The encoder is
``build_backbone(cfg)`` (ResNet or ResNet+FPN, as in the detection models, so their
weights transfer); the decoder upsamples from the deepest feature, concatenating a
skip connection from each shallower encoder feature, and a 1x1 classifier after
dropout predicts logits that are upsampled to the input size.
"""

from __future__ import annotations

from typing import Any

# isort: split

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.backbone.resnet import ResNet
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import nn

from cvserve.models.semseg.config import FREEZE_CHOICES

__all__ = ["DecoderBlock", "EncoderDecoderSegmentor", "UNetDecoder", "freeze_encoder"]


def _conv_norm_relu(in_ch: int, out_ch: int, norm: str) -> Conv2d:
    # With a norm layer the conv bias is redundant.
    return Conv2d(in_ch, out_ch, 3, padding=1, bias=not norm, norm=get_norm(norm, out_ch), activation=F.relu)


class DecoderBlock(nn.Module):
    """Upsample to the skip feature's size, concatenate it, then two conv-norm-ReLU layers."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _conv_norm_relu(in_ch + skip_ch, out_ch, norm)
        self.conv2 = _conv_norm_relu(out_ch, out_ch, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class UNetDecoder(nn.Module):
    """The decoder: a bottleneck block on the deepest feature, then one block per skip.

    Args:
        input_shape: the encoder's output shapes by feature name.
        in_features: feature names, shallow to deep.
        channels: output channels per block, deep to shallow (``len(in_features)`` entries).
        num_classes: classifier outputs.
        norm: detectron2 norm name (``BN``, ``GN``, ``SyncBN``, ``""`` for none).
        dropout: dropout probability before the classifier.
    """

    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        in_features: list[str],
        channels: list[int],
        num_classes: int,
        norm: str,
        dropout: float,
    ) -> None:
        super().__init__()
        if len(channels) != len(in_features):
            raise ValueError(
                f"MODEL.SEMSEG.DECODER_CHANNELS has {len(channels)} entries, "
                f"needs one per input feature {in_features}"
            )
        deep_to_shallow = list(reversed(in_features))
        self.in_features = deep_to_shallow
        self.bottleneck = _conv_norm_relu(input_shape[deep_to_shallow[0]].channels, channels[0], norm)
        self.blocks = nn.ModuleList(
            DecoderBlock(channels[i - 1], input_shape[name].channels, channels[i], norm)
            for i, name in enumerate(deep_to_shallow[1:], start=1)
        )
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = Conv2d(channels[-1], num_classes, kernel_size=1)
        # MSRA fill everywhere, as detectron2's SemSegFPNHead does. A near-zero classifier
        # (std 0.01) scales the gradient reaching the decoder by as much, and training stalls
        # where every foreground pixel gets the same class.
        for module in self.modules():
            if isinstance(module, Conv2d):
                weight_init.c2_msra_fill(module)
        self.output_stride = input_shape[in_features[0]].stride

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.bottleneck(features[self.in_features[0]])
        for block, name in zip(self.blocks, self.in_features[1:], strict=True):
            x = block(x, features[name])
        return self.predictor(self.dropout(x))


def _find_resnet(backbone: Backbone) -> ResNet | None:
    if isinstance(backbone, ResNet):
        return backbone
    bottom_up = getattr(backbone, "bottom_up", None)
    return bottom_up if isinstance(bottom_up, ResNet) else None


def freeze_encoder(backbone: Backbone, freeze_at: str) -> None:
    """Freeze the encoder up to and including ``freeze_at`` (one of :data:`FREEZE_CHOICES`).

    Frozen parameters stop requiring gradients and their BatchNorm layers become
    ``FrozenBatchNorm2d``, so their statistics stop updating too.

    Raises:
        ValueError: unknown ``freeze_at``, or a stage freeze on an encoder without ResNet stages.
    """
    if freeze_at not in FREEZE_CHOICES:
        raise ValueError(
            f"MODEL.SEMSEG.FREEZE_ENCODER_AT must be one of {', '.join(FREEZE_CHOICES)}, got {freeze_at!r}"
        )
    if freeze_at == "none":
        return
    if freeze_at == "encoder":
        for p in backbone.parameters():
            p.requires_grad = False
        for name, child in list(backbone.named_children()):
            setattr(backbone, name, FrozenBatchNorm2d.convert_frozen_batchnorm(child))
        return
    resnet = _find_resnet(backbone)
    if resnet is None:
        raise ValueError(f"cannot freeze at {freeze_at!r}: the encoder has no ResNet stages")
    # ResNet.freeze counts the stem as 1 and res2..res5 as 2..5.
    resnet.freeze(FREEZE_CHOICES.index(freeze_at))


@META_ARCH_REGISTRY.register()
class EncoderDecoderSegmentor(nn.Module):
    """Semantic segmentation with an encoder from ``build_backbone`` and a U-Net decoder.

    Training (``self.training``) returns ``{"loss_sem_seg": loss}``: cross-entropy of the
    logits upsampled to the padded input size, ignoring ``IGNORE_VALUE`` pixels,
    optionally class-weighted. Inference returns ``[{"sem_seg": (C, H, W) logits}]`` at
    each input's ``height`` x ``width`` (its own size when absent), less
    ``LOGIT_ADJUSTMENT * log(class weight)`` when the loss was weighted: the weights buy
    faster learning of the rare classes, the adjustment takes back their bias towards them.
    """

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__()
        head = cfg.MODEL.SEM_SEG_HEAD
        semseg = cfg.MODEL.SEMSEG
        self.backbone = build_backbone(cfg)
        shapes = self.backbone.output_shape()
        in_features = list(semseg.IN_FEATURES) or sorted(
            (k for k, s in shapes.items() if s.stride <= 32), key=lambda k: shapes[k].stride
        )
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(f"MODEL.SEMSEG.IN_FEATURES {missing} are not encoder outputs {sorted(shapes)}")
        self.decoder = UNetDecoder(
            shapes,
            in_features,
            list(semseg.DECODER_CHANNELS),
            head.NUM_CLASSES,
            head.NORM,
            float(head.DROPOUT),
        )
        self.ignore_value = int(head.IGNORE_VALUE)
        self.loss_weight = float(head.LOSS_WEIGHT)
        weights = list(semseg.CLASS_WEIGHTS)
        if weights and len(weights) != head.NUM_CLASSES:
            raise ValueError(
                f"MODEL.SEMSEG.CLASS_WEIGHTS has {len(weights)} entries for {head.NUM_CLASSES} classes"
            )
        self.class_weights: torch.Tensor | None
        self.register_buffer(
            "class_weights", torch.tensor(weights, dtype=torch.float32) if weights else None, False
        )
        tau = float(semseg.LOGIT_ADJUSTMENT)
        if tau < 0:
            raise ValueError(f"MODEL.SEMSEG.LOGIT_ADJUSTMENT must be >= 0, got {tau}")
        if tau and any(w <= 0 for w in weights):
            raise ValueError(
                f"MODEL.SEMSEG.CLASS_WEIGHTS must all be > 0 with LOGIT_ADJUSTMENT {tau} (the log of"
                f" each is subtracted), got {weights}; set LOGIT_ADJUSTMENT to 0 to keep a zero weight"
            )
        self.logit_adjustment: torch.Tensor | None
        adjustment = None
        if self.class_weights is not None and tau:
            adjustment = tau * self.class_weights.log().view(-1, 1, 1)
        self.register_buffer("logit_adjustment", adjustment, False)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)
        freeze_encoder(self.backbone, semseg.FREEZE_ENCODER_AT)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device  # type: ignore[return-value]

    def forward(self, batched_inputs: list[dict[str, Any]]) -> Any:
        """Run on detectron2-style inputs (``image``: CHW tensor in ``INPUT.FORMAT``; ``sem_seg`` to train)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        logits = self.decoder(self.backbone(images.tensor))
        logits = F.interpolate(logits, size=images.tensor.shape[-2:], mode="bilinear", align_corners=False)
        if self.training:
            if "sem_seg" not in batched_inputs[0]:
                raise ValueError("training inputs need a 'sem_seg' label map")
            targets = [x["sem_seg"].to(self.device) for x in batched_inputs]
            targets = ImageList.from_tensors(
                targets, self.backbone.size_divisibility, pad_value=self.ignore_value
            ).tensor
            loss = F.cross_entropy(
                logits, targets.long(), weight=self.class_weights, ignore_index=self.ignore_value
            )
            return {"loss_sem_seg": loss * self.loss_weight}
        if self.logit_adjustment is not None:
            logits = logits - self.logit_adjustment
        results = []
        for logit, image_size, inp in zip(logits, images.image_sizes, batched_inputs, strict=True):
            height = inp.get("height", image_size[0])
            width = inp.get("width", image_size[1])
            results.append({"sem_seg": sem_seg_postprocess(logit, image_size, height, width)})
        return results
