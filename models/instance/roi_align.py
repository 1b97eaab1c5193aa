"""RoIAlign as one ``embedding_bag`` over the feature map's pixels, for training on a CPU.

torchvision's CPU ``roi_align`` backward scatters every sample's gradient one channel at
a time; in the demo's cascade Mask R-CNN it took 23 % of a training step. Each RoIAlign
output is a weighted sum of feature-map pixels (four bilinear neighbours per sample,
averaged over the samples of a bin), so with the feature map viewed as a table of
``N*H*W`` rows of ``C`` channels the whole op is ``F.embedding_bag(indices, table,
per_sample_weights=weights, mode="sum")``, whose forward and backward run over whole
channel rows. :func:`roi_align_gather` reproduces torchvision's sampling rules exactly
(aligned or not, fixed or adaptive sampling ratio, samples past the border), so a
model trained with :class:`GatherROIAlign` is the same model detectron2 serves with
its own ``ROIAlign``.

Under bf16 or fp16 autocast, detectron2's ``ROIAlign`` casts the boxes to the features'
dtype: in bf16 a coordinate above 512 rounds to a multiple of 4, above 1024 to a
multiple of 8 (1100.3 -> 1104). :class:`Fp32ROIAlign` (swapped in by
:func:`keep_roi_align_fp32`; :class:`GatherROIAlign` derives from it) keeps the boxes
and the pooling in fp32 whatever the features' dtype, and returns the features' dtype.
"""

from __future__ import annotations

# isort: split

import torch
import torch.nn.functional as F
from detectron2.layers import ROIAlign
from torch import nn

from cvserve.models.instance.nhwc_roi_align import accepts, roi_align_nhwc
from cvserve.models.instance.pooling_inputs import HALF, pooling_input

__all__ = [
    "Fp32ROIAlign",
    "GatherROIAlign",
    "keep_roi_align_fp32",
    "roi_align_gather",
    "use_gather_roi_align",
]


def _axis(
    start: torch.Tensor, length: torch.Tensor, bins: int, grid: int, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear neighbours of each sample along one axis, as torchvision's kernel takes them.

    Args:
        start, length: (n,) RoI start and extent in feature-map pixels.
        bins: output bins along the axis; ``grid``: samples per bin.
        size: feature-map extent along the axis.

    Returns:
        ``low``, ``high`` (n, bins, grid) pixel indices and their weights; samples
        outside ``[-1, size]`` get zero weights.
    """
    offsets = (torch.arange(grid, dtype=start.dtype, device=start.device) + 0.5) / grid
    steps = torch.arange(bins, dtype=start.dtype, device=start.device)[:, None] + offsets  # (bins, grid)
    c = start[:, None, None] + steps * (length / bins)[:, None, None]
    inside = (c >= -1.0) & (c <= size)
    c = c.clamp(min=0)
    low = c.floor().long()
    last = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(last, low, low + 1)
    frac = torch.where(last, torch.zeros_like(c), c - low)
    return low, high, (1 - frac) * inside, frac * inside


def _bags(
    boxes: torch.Tensor,
    image: torch.Tensor,
    grid_h: int,
    grid_w: int,
    output_size: tuple[int, int],
    shape: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows and weights of every output bin of RoIs sampled on one grid: (n*ph*pw, grid_h*grid_w*4) each."""
    (ph, pw), (height, width) = output_size, shape
    y_lo, y_hi, wy_lo, wy_hi = _axis(boxes[:, 1], boxes[:, 3] - boxes[:, 1], ph, grid_h, height)
    x_lo, x_hi, wx_lo, wx_hi = _axis(boxes[:, 0], boxes[:, 2] - boxes[:, 0], pw, grid_w, width)

    def rows(t: torch.Tensor) -> torch.Tensor:  # (n, ph, gh) -> (n, ph, 1, gh, 1)
        return t[:, :, None, :, None]

    def cols(t: torch.Tensor) -> torch.Tensor:  # (n, pw, gw) -> (n, 1, pw, 1, gw)
        return t[:, None, :, None, :]

    base = (image * (height * width))[:, None, None, None, None]
    index = (
        torch.stack(
            [
                rows(y_lo) * width + cols(x_lo),
                rows(y_lo) * width + cols(x_hi),
                rows(y_hi) * width + cols(x_lo),
                rows(y_hi) * width + cols(x_hi),
            ],
            dim=-1,
        )
        + base[..., None]
    )
    weight = torch.stack(
        [
            rows(wy_lo) * cols(wx_lo),
            rows(wy_lo) * cols(wx_hi),
            rows(wy_hi) * cols(wx_lo),
            rows(wy_hi) * cols(wx_hi),
        ],
        dim=-1,
    ) / max(grid_h * grid_w, 1)
    shape2d = (boxes.shape[0] * ph * pw, grid_h * grid_w * 4)
    return index.reshape(shape2d), weight.reshape(shape2d)


def _sampling_grids(
    rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int, aligned: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes in feature-map pixels (R, 4) and each RoI's samples per bin, (R, 2) as (x, y)."""
    ph, pw = output_size
    boxes = rois[:, 1:].float() * spatial_scale - (0.5 if aligned else 0.0)
    sizes = boxes[:, 2:] - boxes[:, :2]  # (R, 2): width, height
    if not aligned:
        sizes = sizes.clamp(min=1.0)
        boxes = torch.cat([boxes[:, :2], boxes[:, :2] + sizes], dim=1)
    if sampling_ratio > 0:
        return boxes, torch.full_like(sizes, sampling_ratio, dtype=torch.long)
    # A box of zero or negative extent has no samples: its bins are zero, as in torchvision.
    return boxes, torch.ceil(sizes / sizes.new_tensor([pw, ph])).long().clamp(min=0)


def roi_align_gather(
    input: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
) -> torch.Tensor:
    """``torchvision.ops.roi_align`` computed as an ``embedding_bag``; same arguments, same result.

    Args:
        input: (N, C, H, W) features.
        rois: (R, 5) boxes: image index, then x0, y0, x1, y1 in input-image pixels.
        output_size: (ph, pw) bins per RoI.
        spatial_scale: feature-map pixels per image pixel.
        sampling_ratio: samples per bin along each axis; 0 for ``ceil(roi size / bins)``.
        aligned: shift the box by -0.5 pixel (detectron2's ``ROIAlignV2``).

    Returns:
        (R, C, ph, pw) features; gradients flow to ``input`` only, as torchvision's do.
    """
    n_img, channels, height, width = input.shape
    ph, pw = output_size
    if rois.shape[0] == 0:
        return input.new_zeros((0, channels, ph, pw))
    with torch.no_grad():
        boxes, grids = _sampling_grids(rois, output_size, spatial_scale, sampling_ratio, aligned)
        image = rois[:, 0].long()
        key = grids[:, 1] * (int(grids[:, 0].max()) + 1) + grids[:, 0]
        indices, weights, bag_sizes, order = [], [], [], []
        for k in key.unique().tolist():
            sel = (key == k).nonzero().squeeze(1)
            grid_w, grid_h = grids[sel[0]].tolist()
            index, weight = _bags(boxes[sel], image[sel], grid_h, grid_w, output_size, (height, width))
            indices.append(index.reshape(-1))
            weights.append(weight.reshape(-1))
            bag_sizes.append(torch.full((index.shape[0],), index.shape[1], dtype=torch.long))
            order.append(sel)
        sizes_flat = torch.cat(bag_sizes)
        offsets = torch.cumsum(sizes_flat, 0) - sizes_flat
        perm = torch.cat(order)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    table = input.permute(0, 2, 3, 1).reshape(n_img * height * width, channels)
    out = F.embedding_bag(
        torch.cat(indices).to(input.device),
        table,
        offsets.to(input.device),
        mode="sum",
        per_sample_weights=torch.cat(weights).to(input.device, input.dtype),
    )
    out = out.reshape(-1, ph, pw, channels)[inverse.to(input.device)]
    return out.permute(0, 3, 1, 2)


class Fp32ROIAlign(ROIAlign):
    """detectron2's ``ROIAlign`` with box coordinates and pooling in fp32 for any feature dtype.

    The output has the features' dtype (what detectron2's ``ROIPooler`` writes it into).
    On the CPU without a gradient it pools channels-last maps as they are
    (:mod:`~cvserve.models.instance.nhwc_roi_align`, the same values as torchvision's
    kernel); otherwise inside
    :func:`~cvserve.models.instance.pooling_inputs.shared_pooling_inputs` each feature map is
    converted once for torchvision's kernel.
    """

    # The layout the pooling reads without a copy of its own (torchvision's: NCHW).
    layout = torch.contiguous_format

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if accepts(input):  # CPU inference: read the channels-last map as it is, no copy
            return roi_align_nhwc(  # checks the boxes' shape itself (ValueError)
                input,
                rois,
                self.output_size,
                self.spatial_scale,
                self.sampling_ratio,
                self.aligned,
                input.dtype,
            )
        if input.dtype not in HALF:
            return self._pool(pooling_input(input, self.layout), rois)
        with torch.autocast(input.device.type, enabled=False):
            return self._pool(pooling_input(input, self.layout), rois.float()).to(input.dtype)

    def _pool(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return super().forward(input, rois)


class GatherROIAlign(Fp32ROIAlign):
    """:class:`Fp32ROIAlign` computed by :func:`roi_align_gather` for CPU features."""

    layout = torch.channels_last  # its table of pixel rows is then a view

    def _pool(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu" or input.dtype != torch.float32:
            return super()._pool(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5
        size = self.output_size
        output_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return roi_align_gather(
            input, rois, output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )


def _swap(model: nn.Module, cls: type[ROIAlign]) -> int:
    count = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is ROIAlign or (type(child) is Fp32ROIAlign and cls is not Fp32ROIAlign):
                setattr(
                    parent,
                    name,
                    cls(child.output_size, child.spatial_scale, child.sampling_ratio, child.aligned),
                )
                count += 1
    return count


def keep_roi_align_fp32(model: nn.Module) -> int:
    """Swap every detectron2 ``ROIAlign`` in ``model`` for a :class:`Fp32ROIAlign`, in place.

    Nothing changes in fp32; under autocast the boxes keep their fp32 coordinates.

    Returns:
        The number of modules swapped.
    """
    return _swap(model, Fp32ROIAlign)


def use_gather_roi_align(model: nn.Module) -> int:
    """Swap every detectron2 ``ROIAlign`` in ``model`` for a :class:`GatherROIAlign`, in place.

    The swap keeps each module's settings and changes no parameter or output (to float
    rounding); only the CPU speed of training differs.

    Returns:
        The number of modules swapped.
    """
    return _swap(model, GatherROIAlign)
