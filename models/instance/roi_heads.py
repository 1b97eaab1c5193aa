"""``LastStageMaskCascadeROIHeads``: Cascade Mask R-CNN whose mask head learns on the last stage's boxes.

detectron2's ``CascadeROIHeads`` trains its mask head on the first stage's sampled
proposals (any box of IoU >= 0.5 with an object) but, at test time, masks the last
stage's boxes, which fit their objects far more tightly. This subclass trains the mask
head on the boxes the last stage receives instead (those its matcher, IoU >= 0.7 by
default, labels foreground), with at most as many per image as the first stage
samples, so a training step costs the same. Inference is detectron2's. Registered in
``ROI_HEADS_REGISTRY`` when :mod:`cvserve.models.instance.config` is imported.
"""

from __future__ import annotations

# isort: split

from typing import Any

import torch
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads.cascade_rcnn import CascadeROIHeads
from detectron2.structures import Instances, pairwise_iou

__all__ = ["LAST_STAGE_MASK_HEADS_NAME", "LastStageMaskCascadeROIHeads"]

LAST_STAGE_MASK_HEADS_NAME = "LastStageMaskCascadeROIHeads"


@ROI_HEADS_REGISTRY.register()
class LastStageMaskCascadeROIHeads(CascadeROIHeads):
    """``CascadeROIHeads`` with the mask head trained on the last stage's foreground boxes."""

    def forward(
        self,
        images: Any,
        features: dict[str, torch.Tensor],
        proposals: list[Instances],
        targets: list[Instances] | None = None,
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        if not self.training or not self.mask_on:
            return super().forward(images, features, proposals, targets)
        assert targets is not None
        proposals = self.label_and_sample_proposals(proposals, targets)
        self._last_stage: list[Instances] | None = None
        losses = self._forward_box(features, proposals, targets)
        last, self._last_stage = self._last_stage, None
        assert last is not None  # set by _match_and_label_boxes of the last stage
        losses.update(self._forward_mask(features, last))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    @torch.no_grad()
    def _match_and_label_boxes(
        self, proposals: list[Instances], stage: int, targets: list[Instances]
    ) -> list[Instances]:
        proposals = super()._match_and_label_boxes(proposals, stage, targets)
        if stage == self.num_cascade_stages - 1:
            self._last_stage = [
                self._mask_targets(p, t, stage) for p, t in zip(proposals, targets, strict=True)
            ]
        return proposals

    def _mask_targets(self, proposals: Instances, targets: Instances, stage: int) -> Instances:
        """The image's foreground boxes at ``stage`` with every ``gt_*`` field, at most the first stage's count."""
        fg = (proposals.gt_classes != self.num_classes).nonzero().squeeze(1)
        if fg.numel() == 0:  # also when the image has no objects
            return proposals[fg]
        limit = int(self.batch_size_per_image * self.positive_fraction)
        if fg.numel() > limit:
            fg = fg[torch.randperm(fg.numel(), device=fg.device)[:limit]]
        chosen = proposals[fg]
        matched, _ = self.proposal_matchers[stage](pairwise_iou(targets.gt_boxes, chosen.proposal_boxes))
        for name, value in targets.get_fields().items():
            if name.startswith("gt_") and not chosen.has(name):
                chosen.set(name, value[matched])
        return chosen
