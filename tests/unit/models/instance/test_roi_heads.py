"""Cascade Mask R-CNN with the mask head trained on the last stage's boxes."""

from __future__ import annotations

# isort: split

from typing import Any

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from cvserve.models.instance.config import LAST_STAGE_MASK_HEADS_NAME, tiny_instance_config
from cvserve.models.instance.roi_heads import LastStageMaskCascadeROIHeads
from tests.fixtures.instances import two_object_batch


def _config(name: str) -> Any:
    cfg = tiny_instance_config(3, input_size=64)
    cfg.MODEL.ROI_HEADS.NAME = name
    return cfg


def test_mask_head_trains_on_last_stage_foreground(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build_model(_config(LAST_STAGE_MASK_HEADS_NAME)).train()
    heads = model.roi_heads
    assert isinstance(heads, LastStageMaskCascadeROIHeads)
    seen: list[list[Instances]] = []
    forward_mask = heads._forward_mask

    def spy(features: Any, instances: list[Instances]) -> Any:
        seen.append(instances)
        return forward_mask(features, instances)

    monkeypatch.setattr(heads, "_forward_mask", spy)
    with EventStorage(0):
        losses = model(two_object_batch())
    assert set(losses) >= {"loss_mask", "loss_cls_stage2", "loss_box_reg_stage2"}
    assert all(torch.isfinite(v) for v in losses.values())
    (per_image,) = seen
    limit = int(heads.batch_size_per_image * heads.positive_fraction)
    threshold = heads.proposal_matchers[-1].thresholds[1]  # the last stage's foreground IoU
    assert all(len(x) <= limit for x in per_image)
    for inst in per_image:
        assert len(inst) > 0 and inst.has("gt_masks") and len(inst.gt_masks) == len(inst)
        assert (inst.gt_classes != heads.num_classes).all()
        iou = pairwise_iou(inst.proposal_boxes, inst.gt_boxes).diagonal()
        assert (iou >= threshold).all()


def test_foreground_is_capped_at_the_first_stage_count() -> None:
    torch.manual_seed(0)
    model = build_model(_config(LAST_STAGE_MASK_HEADS_NAME)).train()
    heads = model.roi_heads
    heads.batch_size_per_image, heads.positive_fraction = 8, 0.25  # at most 2 mask RoIs an image
    target = two_object_batch(1)[0]["instances"]
    proposals = Instances((64, 64))
    boxes = target.gt_boxes.tensor.repeat(5, 1) + torch.randn(10, 4) * 0.5
    proposals.proposal_boxes = Boxes(boxes)
    proposals.gt_classes = target.gt_classes.repeat(5)
    chosen = heads._mask_targets(proposals, target, stage=2)
    assert len(chosen) == 2
    assert chosen.has("gt_masks") and chosen.has("gt_boxes")


def test_inference_is_detectron2_cascade() -> None:
    torch.manual_seed(0)
    ours = build_model(_config(LAST_STAGE_MASK_HEADS_NAME)).eval()
    plain = build_model(_config("CascadeROIHeads")).eval()
    assert ours.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(ours.state_dict())
    image = {"image": two_object_batch(1)[0]["image"]}
    with torch.no_grad():
        a, b = ours([image])[0]["instances"], plain([image])[0]["instances"]
    assert len(a) == len(b)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor)
    torch.testing.assert_close(a.scores, b.scores)
