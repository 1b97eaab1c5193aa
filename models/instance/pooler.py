"""detectron2's ``ROIPooler`` with every pyramid level pooled in one call of the CPU kernel.

detectron2's ``ROIPooler.forward`` pools a feature pyramid level by level: it zeroes an
output, and for each level gathers that level's boxes (``nonzero``, indexing), pools them
(:class:`~cvserve.models.instance.roi_align.Fp32ROIAlign`: fp32 out, cast to the features'
dtype) and scatters them back (``index_put_``): for the demo detector about a quarter of
the time in its poolers (``benchmarks/README.md``, "One pooling call per pooler").
:class:`NhwcROIPooler` assigns the levels as detectron2 does and hands all boxes to
:func:`~cvserve.models.instance.nhwc_roi_align.pool_levels`, which writes each box's row of
the output in the features' dtype, spread over the pass's intra-op threads. The values are
the same bit for bit (tests/unit/models/instance/test_pooler.py). Inputs the kernel does
not take (a GPU, fp16, a gradient, boxes past its limits) go through detectron2's forward
unchanged.
"""

from __future__ import annotations

# isort: split

import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format
from detectron2.structures import Boxes
from torch import nn

from cvserve.models.instance.nhwc_roi_align import accepts, pool_levels
from cvserve.models.instance.roi_align import Fp32ROIAlign

__all__ = ["NhwcROIPooler", "pool_levels_at_once"]


class NhwcROIPooler(ROIPooler):
    """``ROIPooler`` whose levels are all :class:`Fp32ROIAlign`, pooled in one kernel call
    where the kernel takes the maps (see the module docstring); otherwise detectron2's."""

    def forward(self, x: list[torch.Tensor], box_lists: list[Boxes]) -> torch.Tensor:
        poolers = self.level_poolers
        if not (
            isinstance(x, list)
            and isinstance(box_lists, list)
            and len(x) == len(poolers)
            and len(box_lists) == x[0].size(0) > 0
            and all(accepts(m) for m in x)
        ):
            return super().forward(x, box_lists)  # its own checks and messages
        boxes = convert_boxes_to_pooler_format(box_lists)
        levels = None
        if len(poolers) > 1:
            levels = assign_boxes_to_levels(
                box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
            )
        first = poolers[0]
        out = pool_levels(
            x,
            boxes,
            levels,
            first.output_size,
            [p.spatial_scale for p in poolers],
            first.sampling_ratio,
            first.aligned,
            x[0].dtype,
        )
        return super().forward(x, box_lists) if out is None else out


def _fusable(pooler: ROIPooler) -> bool:
    levels = list(pooler.level_poolers)
    return bool(levels) and all(
        isinstance(p, Fp32ROIAlign)
        and (p.output_size, p.sampling_ratio, p.aligned)
        == (levels[0].output_size, levels[0].sampling_ratio, levels[0].aligned)
        for p in levels
    )


def pool_levels_at_once(model: nn.Module) -> int:
    """Make every ``ROIPooler`` of ``model`` whose levels are :class:`Fp32ROIAlign` (see
    :func:`~cvserve.models.instance.roi_align.keep_roi_align_fp32`) an :class:`NhwcROIPooler`,
    in place. Parameters, names and outputs are unchanged.

    Returns:
        The number of poolers changed.
    """
    count = 0
    for module in model.modules():
        if type(module) is ROIPooler and _fusable(module):
            module.__class__ = NhwcROIPooler
            count += 1
    return count
