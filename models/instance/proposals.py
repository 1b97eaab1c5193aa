"""The RPN's test-time proposals, with NMS that stops once enough boxes are kept; the same proposals.

detectron2's ``find_top_rpn_proposals`` takes each level's ``pre_nms_topk`` best anchors,
runs NMS per level over all of them, and keeps the ``post_nms_topk`` best survivors over
all levels. Greedy NMS decides each box from the higher-scoring boxes of its own level
only, so NMS over a level's best ``m`` candidates keeps exactly the first boxes that NMS
over all of them keeps. Once that prefix keeps ``post_nms_topk`` boxes, no later box of
the level can be among the final ``post_nms_topk``: at least that many kept boxes score
higher. :func:`batched_nms_first` therefore runs each level's NMS over a growing prefix
of its candidates. The demo detector keeps 250 proposals of three levels of 1000
candidates each, about 600 of which survive NMS; its NMS took 7-9 ms an image. Each
level's candidates are found by ``topk`` instead of a full sort where that takes the same ones.

On the CPU the levels' NMS runs in a C kernel (``_nms.c``, built at install): torchvision's
arithmetic, each level stopping at its ``k``-th kept box, the levels spread over the calling
thread's OpenMP team as torch's own parallel work is (``models.threads``). Where it is not
built, torchvision's ``nms`` runs over the growing prefixes.

Exactness rests on one order of the boxes: whenever two scores are equal or not finite,
or torchvision would batch the levels with its coordinate-offset trick instead of a loop
over levels (small inputs, where NMS is cheap), :func:`batched_nms_first` returns
torchvision's own result. ``tests/unit/models/instance/test_proposals.py`` checks both
functions against torchvision's ``batched_nms`` and detectron2's ``find_top_rpn_proposals``
on random inputs (hypothesis), ties and non-finite values included.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

# isort: split

import torch
import torchvision
from detectron2.layers import batched_nms, cat
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances
from torch import nn
from torchvision.ops import boxes as box_ops

from cvserve.models.threads import kernel_threads

_nms: types.ModuleType | None
try:  # built by pip install (pyproject.toml, optional: a C compiler is needed)
    from cvserve.models.instance import _nms
except ImportError:  # pragma: no cover - exercised only where the build failed
    _nms = None

__all__ = ["batched_nms_first", "top_proposals", "use_first_k_nms"]


def _loops_over_groups(boxes: torch.Tensor) -> bool:
    """Whether ``torchvision.ops.batched_nms`` runs one NMS per group for these boxes (its rule)."""
    limit = 4000 if boxes.device.type == "cpu" else 100_000
    return boxes.numel() > limit and not torchvision._is_tracing()


def batched_nms_first(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float, k: int
) -> torch.Tensor:
    """``torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)[:k]``, the same indices in the same order.

    Args:
        boxes: (N, 4) float boxes, ``x0, y0, x1, y1``.
        scores: (N,) scores; idxs: (N,) group of each box (NMS runs within groups).
        iou_threshold: boxes overlapping a kept box by more than this are dropped.
        k: the most indices wanted.
    """
    n = scores.numel()
    if k <= 0 or n == 0 or not _loops_over_groups(boxes):
        return box_ops.batched_nms(boxes, scores, idxs, iou_threshold)[:k]
    present, sizes = torch.unique(idxs, return_counts=True)
    if k >= int(sizes.max()) and _nms is None:  # no group could stop early: nothing to gain
        return box_ops.batched_nms(boxes, scores, idxs, iou_threshold)[:k]
    ranked, order = scores.sort(descending=True)
    if not bool(torch.isfinite(ranked).all()) or bool((ranked[1:] == ranked[:-1]).any()):
        return box_ops.batched_nms(boxes, scores, idxs, iou_threshold)[:k]
    groups = idxs[order]
    keep_mask = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if _groups_in_c(boxes, order, groups, sizes, iou_threshold, k, keep_mask):
        keep = torch.where(keep_mask)[0]
        return keep[scores[keep].sort(descending=True)[1]][:k]
    for group in present:
        members = order[groups == group]  # this group's boxes, best first
        size = min(members.numel(), 2 * k)
        while True:
            prefix = members[:size]
            kept = box_ops.nms(boxes[prefix], scores[prefix], iou_threshold)
            if kept.numel() >= k or size == members.numel():
                break
            size = min(members.numel(), 2 * size)
        keep_mask[prefix[kept]] = True
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]][:k]


def _groups_in_c(
    boxes: torch.Tensor,
    order: torch.Tensor,
    groups: torch.Tensor,
    sizes: torch.Tensor,
    iou_threshold: float,
    k: int,
    keep_mask: torch.Tensor,
) -> bool:
    """Mark in ``keep_mask`` the first ``k`` boxes greedy NMS keeps in each group, by the C
    kernel (``_nms.c``: torchvision's arithmetic, the groups over the calling thread's
    OpenMP team); False, marking nothing, where it is not built or the boxes are not CPU fp32.

    Args:
        order: all boxes, best score first (no ties); groups: each one's group, in that order;
        sizes: the boxes of each group, in ascending group order.
    """
    if _nms is None or boxes.device.type != "cpu" or boxes.dtype != torch.float32:
        return False
    members = order[torch.sort(groups, stable=True).indices]  # group after group, best first
    starts = torch.zeros(sizes.numel() + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=starts[1:])
    boxes = boxes.contiguous()
    _nms.groups(
        boxes.data_ptr(),
        members.data_ptr(),
        starts.data_ptr(),
        sizes.numel(),
        k,
        float(iou_threshold),
        keep_mask.data_ptr(),
        kernel_threads(_nms),
    )
    return True


def _best(logits: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``count`` largest logits and their indices, best first, as detectron2 takes them.

    detectron2 sorts each row whole. ``topk`` of ``count + 1`` gives the same values and
    indices whenever they are finite and strictly decreasing (no tie inside or at the
    boundary), at a fraction of the cost: 0.9 against 14.4 ms for R50-FPN's 160,200
    stride-4 anchors at 800 px. Otherwise the rows are sorted whole.
    """
    if count < logits.shape[1] and bool(torch.isfinite(logits).all()):
        values, index = logits.topk(count + 1, dim=1)
        if bool((values[:, 1:] < values[:, :-1]).all()):
            return values[:, :count], index[:, :count]
    ranked, index = logits.sort(descending=True, dim=1)
    return ranked.narrow(1, 0, count), index.narrow(1, 0, count)


def top_proposals(
    proposals: Sequence[torch.Tensor],
    logits: Sequence[torch.Tensor],
    image_sizes: Sequence[tuple[int, int]],
    nms_thresh: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
) -> list[Instances]:
    """detectron2's ``find_top_rpn_proposals`` at test time, its NMS by :func:`batched_nms_first`
    and its per-level selection by ``topk`` where that takes the same anchors (:func:`_best`).

    Args:
        proposals: per level, (N, Hi*Wi*A, 4) decoded boxes.
        logits: per level, (N, Hi*Wi*A) objectness logits.
        image_sizes: (height, width) of each image.
        nms_thresh, pre_nms_topk, post_nms_topk, min_box_size: the RPN's test settings.

    Returns:
        Per image, at most ``post_nms_topk`` proposals (``proposal_boxes``,
        ``objectness_logits``), best first.
    """
    device = proposals[0].device
    rows = torch.arange(len(image_sizes), device=device)[:, None]
    level_scores, level_boxes, level_ids = [], [], []
    for level, (boxes_i, logits_i) in enumerate(zip(proposals, logits, strict=True)):
        count = min(int(logits_i.shape[1]), pre_nms_topk)
        ranked, index = _best(logits_i, count)
        level_scores.append(ranked)
        level_boxes.append(boxes_i[rows, index])
        level_ids.append(torch.full((count,), level, dtype=torch.int64, device=device))
    all_scores, all_boxes, all_levels = (
        cat(level_scores, dim=1),
        cat(level_boxes, dim=1),
        cat(level_ids, dim=0),
    )
    results = []
    for image, size in enumerate(image_sizes):
        boxes, scores, levels = Boxes(all_boxes[image]), all_scores[image], all_levels
        valid = torch.isfinite(boxes.tensor).all(dim=1) & torch.isfinite(scores)
        if not bool(valid.all()):
            boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
        boxes.clip(size)
        nonempty = boxes.nonempty(threshold=min_box_size)
        if not bool(nonempty.all()):
            boxes, scores, levels = boxes[nonempty], scores[nonempty], levels[nonempty]
        if len(boxes) < 40000:  # where detectron2's batched_nms calls torchvision's
            keep = batched_nms_first(boxes.tensor.float(), scores, levels, nms_thresh, post_nms_topk)
        else:
            keep = batched_nms(boxes.tensor, scores, levels, nms_thresh)[:post_nms_topk]
        result = Instances(size)
        result.proposal_boxes = boxes[keep]
        result.objectness_logits = scores[keep]
        results.append(result)
    return results


def _predict_proposals(
    self: RPN,
    anchors: list[Boxes],
    pred_objectness_logits: list[torch.Tensor],
    pred_anchor_deltas: list[torch.Tensor],
    image_sizes: list[tuple[int, int]],
) -> list[Instances]:
    if self.training:  # training keeps detectron2's own selection
        return RPN.predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes)
    with torch.no_grad():
        decoded = self._decode_proposals(anchors, pred_anchor_deltas)
        return top_proposals(
            decoded,
            pred_objectness_logits,
            image_sizes,
            self.nms_thresh,
            self.pre_nms_topk[False],
            self.post_nms_topk[False],
            self.min_box_size,
        )


def use_first_k_nms(model: nn.Module) -> int:
    """Make each detectron2 ``RPN`` in ``model`` select its test-time proposals by :func:`top_proposals`.

    Only these module instances change; training mode keeps detectron2's own code.

    Returns:
        The number of RPNs changed.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, RPN) or type(module).predict_proposals is not RPN.predict_proposals:
            continue  # not an RPN, or a subclass with its own selection
        if "predict_proposals" not in vars(module):  # not changed yet
            module.predict_proposals = types.MethodType(_predict_proposals, module)  # type: ignore[method-assign]
            count += 1
    return count
