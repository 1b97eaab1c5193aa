"""One-call pooling (NhwcROIPooler, pool_levels) against detectron2's ROIPooler on torchvision, bit for bit."""

from __future__ import annotations

# isort: split

import pytest
import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from hypothesis import given, settings
from hypothesis import strategies as st

from cvserve.models.instance import nhwc_roi_align
from cvserve.models.instance.nhwc_roi_align import pool_levels, torchvision_only
from cvserve.models.instance.pooler import NhwcROIPooler, pool_levels_at_once
from cvserve.models.instance.roi_align import keep_roi_align_fp32, use_gather_roi_align

needs_kernel = pytest.mark.skipif(
    nhwc_roi_align._kernel is None, reason="the C extension was not built (no C compiler at install)"
)

STRIDES = (4, 8, 16, 32)


def _poolers(output_size: int, sampling_ratio: int, levels: int, pooler_type: str = "ROIAlignV2") -> tuple:
    """detectron2's pooler with fp32 RoIAlign levels (as served) and the same pooler made one-call."""
    scales = [1.0 / s for s in STRIDES[:levels]]
    reference = ROIPooler(output_size, scales, sampling_ratio, pooler_type)
    keep_roi_align_fp32(reference)
    fused = ROIPooler(output_size, scales, sampling_ratio, pooler_type)
    keep_roi_align_fp32(fused)
    assert pool_levels_at_once(fused) == 1 and type(fused) is NhwcROIPooler
    return reference, fused


def _boxes(n: int, height: int, width: int, g: torch.Generator) -> Boxes:
    """Boxes in image pixels from tiny to larger than the image (every level), some past the border."""
    side = torch.exp(torch.rand(n, 2, generator=g) * 6.5) - 0.5  # about 0.5 to 665 px
    start = torch.rand(n, 2, generator=g) * torch.tensor([width * 1.2, height * 1.2]) - 0.1 * side
    kind = torch.randint(0, 6, (n,), generator=g)
    side[kind == 0] = 0.0  # empty
    side[kind == 1] *= -0.2  # inverted
    return Boxes(torch.cat([start, start + side], dim=1))


def _maps(n_img: int, channels: int, height: int, width: int, levels: int, dtype: torch.dtype, g) -> list:
    return [
        (torch.randn(n_img, channels, -(-height // s), -(-width // s), generator=g) * 4)
        .to(dtype)
        .contiguous(memory_format=torch.channels_last)
        for s in STRIDES[:levels]
    ]


def _same(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype
    bits = torch.int16 if got.dtype == torch.bfloat16 else torch.int32
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(bits), expected[~nan].view(bits))


@needs_kernel
@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    per_image=st.lists(st.integers(0, 30), min_size=1, max_size=3),
    channels=st.sampled_from([1, 8, 17, 32]),
    size=st.tuples(st.integers(8, 96), st.integers(8, 96)),
    levels=st.sampled_from([1, 4]),
    output_size=st.sampled_from([2, 7, 14]),
    sampling_ratio=st.integers(0, 2),
    pooler_type=st.sampled_from(["ROIAlignV2", "ROIAlign"]),
    bf16=st.booleans(),
    threads=st.sampled_from([1, 2]),
    special=st.booleans(),
)
def test_one_call_equals_level_by_level(
    seed: int,
    per_image: list[int],
    channels: int,
    size: tuple[int, int],
    levels: int,
    output_size: int,
    sampling_ratio: int,
    pooler_type: str,
    bf16: bool,
    threads: int,
    special: bool,
) -> None:
    """Any number of images and boxes (none in some), one level or four, either pooler type,
    fp32 or bf16 maps (the output in the maps' dtype), one thread or two, non-finite
    features: the one-call pooler equals detectron2's level-by-level pooling with
    torchvision's kernel."""
    g = torch.Generator().manual_seed(seed)
    height, width = size
    maps = _maps(
        len(per_image), channels, height, width, levels, torch.bfloat16 if bf16 else torch.float32, g
    )
    if special:
        flat = maps[0].permute(0, 2, 3, 1).view(-1)  # channels-last: a view of its memory
        flat[torch.randint(0, flat.numel(), (3,), generator=g)] = torch.tensor(
            [float("inf"), float("-inf"), float("nan")], dtype=flat.dtype
        )
    boxes = [_boxes(n, height, width, g) for n in per_image]
    reference, fused = _poolers(output_size, sampling_ratio, levels, pooler_type)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            got = fused(maps, boxes)
            with torchvision_only():
                expected = reference(maps, boxes)
    finally:
        torch.set_num_threads(previous)
    _same(got, expected)


@needs_kernel
def test_served_sizes_on_two_threads() -> None:
    """A batch of two at the demo's sizes: 250 boxes an image over four levels, 7x7 and 14x14."""
    g = torch.Generator().manual_seed(5)
    maps = _maps(2, 32, 192, 256, 4, torch.bfloat16, g)
    boxes = [_boxes(250, 192, 256, g) for _ in range(2)]
    for output_size in (7, 14):
        reference, fused = _poolers(output_size, 0, 4)
        with torch.inference_mode():
            got = fused(maps, boxes)
            with torchvision_only():
                expected = reference(maps, boxes)
        _same(got, expected)


@needs_kernel
def test_gradients_and_other_inputs_take_detectron2s_path() -> None:
    """Training (a gradient), fp16 maps and boxes past the kernel's limits are pooled level by level."""
    g = torch.Generator().manual_seed(6)
    reference, fused = _poolers(7, 0, 4)
    maps = _maps(1, 8, 64, 64, 4, torch.float32, g)
    boxes = [_boxes(20, 64, 64, g)]
    leaves = [m.detach().clone().requires_grad_() for m in maps]
    out = fused(leaves, boxes)
    out.sum().backward()
    assert all(leaf.grad is not None for leaf in leaves)
    _same(out.detach(), reference(maps, boxes))
    half = [m.half() for m in maps]
    with torch.inference_mode():
        assert fused(half, boxes).dtype == torch.float16
        # Past 2**24 pixels of its level (1/32): torchvision pools the call, level by level.
        far = [Boxes(torch.tensor([[0.0, 0.0, 1e9, 1e9], [1.0, 1.0, 9.0, 9.0]]))]
        reference, fused = _poolers(7, 2, 4)  # a fixed sampling ratio: torchvision's grid stays small
        with torchvision_only():
            expected = reference(maps, far)
        _same(fused(maps, far), expected)


@needs_kernel
def test_pool_levels_refuses_bad_input() -> None:
    maps = _maps(2, 4, 32, 32, 2, torch.float32, torch.Generator().manual_seed(7))
    rois = torch.tensor([[0.0, 1, 1, 9, 9], [1.0, 2, 2, 30, 30]])
    with pytest.raises(ValueError, match=r"levels must lie in \[0, 2\), got 0..2"):
        pool_levels(maps, rois, torch.tensor([0, 2]), 3, [0.25, 0.125], 0, True, torch.float32)
    with pytest.raises(ValueError, match=r"levels must have shape \(2,\), got \(3,\)"):
        pool_levels(maps, rois, torch.tensor([0, 1, 1]), 3, [0.25, 0.125], 0, True, torch.float32)
    with pytest.raises(ValueError, match=r"image indices must lie in \[0, 2\), got 1..2"):
        shifted = rois + torch.tensor([1.0, 0, 0, 0, 0])
        pool_levels(maps, shifted, None, 3, [0.25, 0.125], 0, True, torch.float32)
    assert pool_levels(maps, rois, None, 3, [0.25], 0, True, torch.float32) is None  # one scale for two maps
    assert (
        pool_levels(maps, rois, None, 3, [0.25, 0.125], 0, True, torch.float16) is None
    )  # not an output dtype
    assert pool_levels([maps[0], maps[1][:1]], rois, None, 3, [0.25, 0.125], 0, True, torch.float32) is None


def test_only_fp32_roi_align_poolers_change() -> None:
    """ROIPool levels, and detectron2's own ROIAlign (not yet made fp32), stay as they are."""
    model = torch.nn.ModuleDict(
        {
            "align": ROIPooler(7, [0.25, 0.125], 0, "ROIAlignV2"),
            "pool": ROIPooler(7, [0.25], 0, "ROIPool"),
            "gather": ROIPooler(14, [0.25], 0, "ROIAlignV2"),
        }
    )
    assert pool_levels_at_once(model) == 0
    keep_roi_align_fp32(model["align"])
    use_gather_roi_align(model["gather"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert pool_levels_at_once(model) == 2
    kinds = [type(model[k]).__name__ for k in ("align", "pool", "gather")]
    assert kinds == ["NhwcROIPooler", "ROIPooler", "NhwcROIPooler"]
    assert pool_levels_at_once(model) == 0  # already changed
    assert model.state_dict().keys() == state.keys()


@needs_kernel
def test_more_levels_than_one_call_takes_are_not_its_input() -> None:
    maps = _maps(1, 4, 32, 32, 1, torch.float32, torch.Generator().manual_seed(8)) * 17
    rois = torch.tensor([[0.0, 1, 1, 9, 9]])
    assert pool_levels(maps, rois, None, 3, [0.25] * 17, 0, True, torch.float32) is None
    assert pool_levels(maps[:16], rois, None, 3, [0.25] * 16, 0, True, torch.float32) is not None
