"""Early-stopping NMS for the RPN: torchvision's and detectron2's results, index for index."""

from __future__ import annotations

# isort: split

from unittest import mock

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import batched_nms

from cvserve.models.instance import proposals
from cvserve.models.instance.config import tiny_instance_config
from cvserve.models.instance.proposals import batched_nms_first, top_proposals, use_first_k_nms

needs_kernel = pytest.mark.skipif(
    proposals._nms is None, reason="the C extension was not built (no C compiler at install)"
)


def _boxes(n: int, g: torch.Generator, extent: float = 300.0) -> torch.Tensor:
    """Boxes around a few dozen centres, so that NMS suppresses many; some degenerate."""
    centres = torch.rand(max(1, n // 20), 2, generator=g) * extent
    pick = torch.randint(0, centres.shape[0], (n,), generator=g)
    centre = centres[pick] + torch.randn(n, 2, generator=g) * 6
    size = torch.rand(n, 2, generator=g) * 60 + 1
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=1)
    boxes[: n // 50, 2:] = boxes[: n // 50, :2]  # zero area
    return boxes


def _scores(n: int, g: torch.Generator, ties: bool, bad: bool) -> torch.Tensor:
    scores = torch.randn(n, generator=g)
    if ties:
        scores = (scores * 4).round() / 4  # a few dozen distinct values
    if bad and n:
        scores[torch.randint(0, n, (max(1, n // 100),), generator=g)] = float("nan")
    return scores


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.one_of(st.integers(0, 40), st.integers(900, 3200)),  # both sides of torchvision's 1000-box switch
    groups=st.integers(1, 5),
    k=st.integers(0, 1200),
    threshold=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.95, 1.0]),
    ties=st.booleans(),
    bad=st.booleans(),
    kernel=st.booleans(),
    threads=st.sampled_from([1, 2]),
)
def test_batched_nms_first_equals_torchvision(
    seed: int,
    n: int,
    groups: int,
    k: int,
    threshold: float,
    ties: bool,
    bad: bool,
    kernel: bool,
    threads: int,
) -> None:
    """With the C kernel (on one thread or two) and without it (torchvision's nms per prefix)."""
    g = torch.Generator().manual_seed(seed)
    boxes, scores = _boxes(n, g), _scores(n, g, ties, bad)
    idxs = torch.randint(0, groups, (n,), generator=g)
    expected = batched_nms(boxes, scores, idxs, threshold)[:k]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with mock.patch.object(proposals, "_nms", proposals._nms if kernel else None):
            assert torch.equal(batched_nms_first(boxes, scores, idxs, threshold, k), expected)
    finally:
        torch.set_num_threads(previous)


@needs_kernel
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.7, 1.0])
def test_the_kernel_takes_the_served_sizes_and_odd_boxes(threshold: float) -> None:
    """Five levels of 1000 candidates (the RPN's), with empty, inverted, identical and NaN boxes."""
    g = torch.Generator().manual_seed(9)
    boxes, scores = _boxes(5000, g), torch.randperm(5000, generator=g).float() / 5000  # no ties
    boxes[::97] = boxes[::97, [0, 1, 0, 1]]  # empty
    boxes[1::89] = boxes[1::89, [2, 3, 0, 1]]  # inverted
    boxes[2::83] = boxes[3::83][: boxes[2::83].shape[0]]  # a copy of the next box
    boxes[4::211, 1] = float("nan")
    idxs = torch.arange(5000) // 1000
    calls = []
    real = proposals._nms
    kernel = mock.Mock(wraps=real)
    kernel.groups.side_effect = lambda *args: calls.append(args) or real.groups(*args)
    with mock.patch.object(proposals, "_nms", kernel):
        for k in (1, 250, 999):
            expected = batched_nms(boxes, scores, idxs, threshold)[:k]
            assert torch.equal(batched_nms_first(boxes, scores, idxs, threshold, k), expected)
    assert len(calls) == 3  # each k through the kernel


def test_batched_nms_first_stops_early_and_still_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C kernel: torchvision's nms over growing prefixes."""
    monkeypatch.setattr(proposals, "_nms", None)
    g = torch.Generator().manual_seed(3)
    boxes, scores = _boxes(3000, g), torch.rand(3000, generator=g)
    idxs = torch.arange(3000) % 3
    expected = batched_nms(boxes, scores, idxs, 0.7)[:50]
    calls: list[int] = []
    real = proposals.box_ops.nms

    def counted(b: torch.Tensor, s: torch.Tensor, t: float) -> torch.Tensor:
        calls.append(b.shape[0])
        return real(b, s, t)

    monkeypatch.setattr(proposals.box_ops, "nms", counted)
    assert torch.equal(batched_nms_first(boxes, scores, idxs, 0.7, 50), expected)
    assert calls and max(calls) < 1000  # each level's NMS ran over a prefix, not its 1000 boxes


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    images=st.integers(1, 2),
    levels=st.lists(st.integers(1, 1400), min_size=1, max_size=5),
    pre_nms_topk=st.integers(1, 1200),
    post_nms_topk=st.integers(1, 1200),
    min_box_size=st.sampled_from([0.0, 2.0, 10.0]),
    threshold=st.sampled_from([0.5, 0.7]),
    ties=st.booleans(),
    bad=st.booleans(),
)
def test_top_proposals_equals_detectron2(
    seed: int,
    images: int,
    levels: list[int],
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float,
    threshold: float,
    ties: bool,
    bad: bool,
) -> None:
    g = torch.Generator().manual_seed(seed)
    proposals = [torch.stack([_boxes(a, g, 340.0) - 20 for _ in range(images)]) for a in levels]
    logits = [torch.stack([_scores(a, g, ties, bad) for _ in range(images)]) for a in levels]
    if bad:
        proposals[0][0, 0, 2] = float("inf")
    sizes = [(256, 341), (300, 200)][:images]
    args = (proposals, logits, sizes, threshold, pre_nms_topk, post_nms_topk, min_box_size)
    expected = find_top_rpn_proposals(*args, False)
    got = top_proposals(*args)
    for e, o in zip(expected, got, strict=True):
        assert o.image_size == e.image_size
        assert torch.equal(o.proposal_boxes.tensor, e.proposal_boxes.tensor)
        assert torch.equal(o.objectness_logits, e.objectness_logits)


def test_model_outputs_are_unchanged_and_training_keeps_detectron2() -> None:
    cfg = tiny_instance_config(5)
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 1000, 60
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = (torch.rand(3, 160, 224) * 255).to(torch.uint8)
    batch = [{"image": image, "height": 160, "width": 224}]
    with torch.no_grad():
        expected = model.inference(batch, do_postprocess=False)[0]
        assert use_first_k_nms(model) == 1
        assert use_first_k_nms(model) == 0  # already changed
        got = model.inference(batch, do_postprocess=False)[0]
    assert torch.equal(got.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(got.scores, expected.scores) and torch.equal(got.pred_masks, expected.pred_masks)
    rpn = model.proposal_generator
    rpn.train()  # training keeps detectron2's selection (its train settings: 2000 / 1000 here)
    g = torch.Generator().manual_seed(1)
    anchors = [Boxes(_boxes(3000, g))]
    args = (
        anchors,
        [torch.randn(1, 3000, generator=g)],
        [torch.randn(1, 3000, 4, generator=g) * 0.1],
        [(300, 300)],
    )
    with torch.no_grad():
        trained = rpn.predict_proposals(*args)[0]
        reference = RPN.predict_proposals(rpn, *args)[0]
    assert len(trained) == len(reference) > 60
    assert torch.equal(trained.proposal_boxes.tensor, reference.proposal_boxes.tensor)


@pytest.mark.parametrize(
    ("row", "count"),
    [
        ([0.5, 4.0, 3.0, -1.0, 2.0], 3),  # distinct: topk's answer
        ([3.0, 5.0, 3.0, 4.0, 1.0], 3),  # a tie at the boundary: sorted whole
        ([2.0, 2.0, 5.0, 1.0], 3),  # a tie inside
        ([float("nan"), 1.0, 2.0, 0.0], 2),  # NaN ranks first in a descending sort
        ([1.0, float("inf"), float("inf"), 0.0], 1),
        ([1.0, 2.0], 2),  # the whole row
    ],
)
def test_level_selection_equals_a_full_sort(row: list[float], count: int) -> None:
    from cvserve.models.instance.proposals import _best

    logits = torch.tensor([row, row[::-1]])
    ranked, index = logits.sort(descending=True, dim=1)
    values, got = _best(logits, count)
    assert torch.equal(got, index[:, :count])
    torch.testing.assert_close(values, ranked[:, :count], rtol=0, atol=0, equal_nan=True)
