"""RoIAlign as an embedding bag: torchvision's values and gradients, and the swap into a detectron2 model."""

from __future__ import annotations

import copy

# isort: split

import pytest
import torch
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torchvision.ops import roi_align

from cvserve.models.instance.config import tiny_instance_config
from cvserve.models.instance.roi_align import GatherROIAlign, roi_align_gather, use_gather_roi_align
from tests.fixtures.instances import two_object_batch


def _rois(n: int, image_size: tuple[int, int], images: int, seed: int = 0) -> torch.Tensor:
    """Boxes of 0-90 px, some past the image, some empty or inverted, over ``images`` images."""
    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    centre = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    size = torch.rand(n, 2, generator=g) * 90
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    boxes[: n // 10] *= 1.3  # partly or wholly outside
    boxes[n // 10 : n // 10 + 3, 2:] = boxes[n // 10 : n // 10 + 3, :2] - 1  # inverted
    boxes[n // 10 + 3 : n // 10 + 5, 2] = boxes[n // 10 + 3 : n // 10 + 5, 0]  # zero width
    index = torch.randint(0, images, (n, 1), generator=g).float()
    return torch.cat([index, boxes], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize(("rois", "output", "ratio"), [(120, 7, 0), (40, 14, 0), (120, 7, 2), (0, 7, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torchvision(aligned: bool, rois: int, output: int, ratio: int, channels_last: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 8, 24, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    boxes = _rois(rois, (96, 128), 3)
    expected = roi_align(x, boxes, (output, output), 0.25, ratio, aligned)
    got = roi_align_gather(x, boxes, (output, output), 0.25, ratio, aligned)
    assert got.shape == expected.shape == (rois, 8, output, output)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if rois:
        upstream = torch.randn_like(expected)
        (grad_expected,) = torch.autograd.grad(expected, x, upstream)
        (grad_got,) = torch.autograd.grad(got, x, upstream)
        torch.testing.assert_close(grad_got, grad_expected, atol=1e-4, rtol=1e-5)


def test_rectangular_output_and_scale() -> None:
    x = torch.randn(2, 4, 16, 20)
    boxes = _rois(30, (128, 160), 2, seed=1)
    expected = roi_align(x, boxes, (5, 3), 0.125, 0, True)
    torch.testing.assert_close(
        roi_align_gather(x, boxes, (5, 3), 0.125, 0, True), expected, atol=1e-5, rtol=1e-5
    )


def test_module_falls_back_off_float32() -> None:
    module = GatherROIAlign((7, 7), 0.25, 0, True)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    boxes = _rois(10, (64, 64), 2).double()
    torch.testing.assert_close(module(x, boxes), ROIAlign((7, 7), 0.25, 0, True)(x, boxes))


def test_swap_keeps_the_model_outputs_and_losses() -> None:
    cfg = tiny_instance_config(3, input_size=64)
    torch.manual_seed(0)
    model = build_model(cfg)
    swapped = copy.deepcopy(model)
    # Box and mask poolers, one ROIAlign per FPN level each.
    assert use_gather_roi_align(swapped) == 8
    assert not any(type(m) is ROIAlign for m in swapped.modules())
    assert sum(isinstance(m, GatherROIAlign) for m in swapped.modules()) == 8
    batch = two_object_batch()
    model.train()
    swapped.train()
    with EventStorage(0):
        torch.manual_seed(1)
        losses = model(batch)
        torch.manual_seed(1)
        losses_swapped = swapped(batch)
    for key in losses:
        torch.testing.assert_close(losses_swapped[key], losses[key], atol=1e-5, rtol=1e-4)
    sum(losses.values()).backward()
    sum(losses_swapped.values()).backward()
    for (name, p), q in zip(model.named_parameters(), swapped.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-3, msg=name)
