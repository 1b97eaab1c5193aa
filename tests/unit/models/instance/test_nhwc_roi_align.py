"""The channels-last RoIAlign kernel against torchvision's ``roi_align``, bit for bit."""

from __future__ import annotations

# isort: split

import pytest
import torch
from detectron2.layers import ROIAlign
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import roi_align

from cvserve.models.instance import nhwc_roi_align
from cvserve.models.instance.nhwc_roi_align import accepts, describe, roi_align_nhwc, torchvision_only
from cvserve.models.instance.roi_align import Fp32ROIAlign

needs_kernel = pytest.mark.skipif(
    nhwc_roi_align._kernel is None, reason="the C extension was not built (no C compiler at install)"
)


def assert_same_bits(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal shapes, NaN where the reference has NaN, every other value equal bit for bit (the sign of 0 too)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype == torch.float32
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32))


def _rois(n: int, n_img: int, height: int, width: int, scale: float, g: torch.Generator) -> torch.Tensor:
    """Boxes in image pixels of every kind: inside, across the border, outside, inverted, empty, huge."""
    extent = torch.tensor([width / scale, height / scale])
    start = (torch.rand(n, 2, generator=g) * 1.6 - 0.3) * extent
    size = torch.rand(n, 2, generator=g) * extent * torch.rand(n, 1, generator=g) * 1.5
    kind = torch.randint(0, 8, (n,), generator=g)
    size[kind == 0] = 0.0  # empty
    size[kind == 1] *= -0.3  # inverted
    start[kind == 2] = start[kind == 2].round()  # on the pixel grid
    size[kind == 3] = torch.rand(int((kind == 3).sum()), 2, generator=g) * 2 / scale  # under two pixels
    start[kind == 4] = -start[kind == 4].abs() - extent  # left of and above the map
    boxes = torch.cat([start, start + size], dim=1)
    image = torch.randint(0, n_img, (n, 1), generator=g).float()
    return torch.cat([image, boxes], dim=1)


@needs_kernel
@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_img=st.integers(1, 3),
    channels=st.sampled_from([1, 3, 16, 17, 64, 70]),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    pooled=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    scale=st.sampled_from([1.0, 0.5, 0.25, 0.3, 1 / 32]),
    sampling_ratio=st.integers(0, 3),
    aligned=st.booleans(),
    bf16=st.booleans(),
    channels_last=st.booleans(),
    n_rois=st.integers(0, 40),
    special=st.booleans(),
)
def test_equals_torchvision(
    seed: int,
    n_img: int,
    channels: int,
    height: int,
    width: int,
    pooled: tuple[int, int],
    scale: float,
    sampling_ratio: int,
    aligned: bool,
    bf16: bool,
    channels_last: bool,
    n_rois: int,
    special: bool,
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_img, channels, height, width, generator=g) * 10
    if special:  # non-finite features propagate as torchvision's arithmetic propagates them
        flat = x.view(-1)
        picks = torch.randint(0, flat.numel(), (3,), generator=g)
        flat[picks] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    if bf16:
        x = x.to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = _rois(n_rois, n_img, height, width, scale, g)
    expected = roi_align(x.float().contiguous(), rois, pooled, scale, sampling_ratio, aligned)
    got = roi_align_nhwc(x, rois, pooled, scale, sampling_ratio, aligned)
    assert_same_bits(got, expected)
    if bf16:  # written in the features' dtype: torch's fp32 -> bf16 rounding of the same values
        rounded = roi_align_nhwc(x, rois, pooled, scale, sampling_ratio, aligned, torch.bfloat16)
        assert rounded.dtype == torch.bfloat16
        assert torch.equal(rounded.view(torch.int16), expected.to(torch.bfloat16).view(torch.int16))


@needs_kernel
@pytest.mark.parametrize("magnitude", [1e-39, 1e-41, 1e-44, 3e38, 1.0])
def test_bf16_output_rounds_as_torch(magnitude: float) -> None:
    """Subnormal results, results past bf16's largest value (to infinity) and ordinary ones
    round as ``Tensor.to(torch.bfloat16)`` rounds them (to nearest even)."""
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(1, 64, 16, 16, generator=g) * magnitude).contiguous(memory_format=torch.channels_last)
    rois = torch.tensor([[0.0, 1, 1, 12, 12], [0.0, 0.3, 0.7, 5.5, 15.2]] * 8)
    expected = roi_align(x.contiguous(), rois, 7, 1.0, 0, True).to(torch.bfloat16)
    got = roi_align_nhwc(x, rois, 7, 1.0, 0, True, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


@needs_kernel
@pytest.mark.parametrize("bf16", [False, True])
def test_large_map_and_many_rois(bf16: bool) -> None:
    """The served sizes: 256 channels, a stride-4 map, a thousand boxes, adaptive sampling."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 256, 64, 85, generator=g)
    x = (x.to(torch.bfloat16) if bf16 else x).contiguous(memory_format=torch.channels_last)
    rois = _rois(1000, 2, 64, 85, 0.25, g)
    for pooled in ((7, 7), (14, 14)):
        expected = roi_align(x.float().contiguous(), rois, pooled, 0.25, 0, True)
        assert_same_bits(roi_align_nhwc(x, rois, pooled, 0.25, 0, True), expected)


@needs_kernel
def test_out_of_limits_goes_to_torchvision() -> None:
    """Coordinates past 2**24 feature pixels (where the kernel's int casts could overflow) and
    sample grids too large for its scratch space are pooled by torchvision."""
    x = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    calls = []
    original = nhwc_roi_align.roi_align

    def spy(*args, **kwargs):
        calls.append(args[1])
        if args[4] == 0 and float(args[1][:, 1:].abs().max()) > 1e5:  # torchvision: ~1e10 samples
            return torch.zeros(args[1].shape[0], args[0].shape[1], *args[2])
        return original(*args, **kwargs)

    nhwc_roi_align.roi_align = spy
    try:
        far = torch.tensor([[0.0, 1e9, 1e9, 2e9, 2e9], [0.0, 1.0, 1.0, 5.0, 5.0]])
        assert_same_bits(
            roi_align_nhwc(x, far, 2, 1.0, 1, True), roi_align(x.contiguous(), far, 2, 1.0, 1, True)
        )
        huge = torch.tensor([[0.0, 0.0, 0.0, 4e5, 4e5]])  # adaptive sampling: about 3e9 samples
        roi_align_nhwc(x, huge, 7, 1.0, 2, True)  # a fixed ratio keeps it small: the kernel's
        assert len(calls) == 1
        assert roi_align_nhwc(x, huge, 7, 1.0, 0, True).shape == (1, 4, 7, 7)
        assert len(calls) == 2
        assert roi_align_nhwc(x, far[1:], 2, 1.0, 1, True).shape == (1, 4, 2, 2)
        assert len(calls) == 2
    finally:
        nhwc_roi_align.roi_align = original


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_boxes_pool_to_zeros(bad: float) -> None:
    """torchvision's CPU kernel has no defined result for them (its sample count overflows an
    int; it crashed the process in our runs): the kernel pools them to zeros, the others as usual."""
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    rois = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0], [1.0, 0.0, bad, 4.0, 4.0], [1.0, 2.0, 0.0, 7.0, 3.0]])
    for sampling_ratio in (0, 2):
        out = roi_align_nhwc(x, rois, 3, 1.0, sampling_ratio, True)
        assert torch.equal(out[1], torch.zeros(4, 3, 3))
        kept = rois[[0, 2]]
        assert_same_bits(out[[0, 2]], roi_align(x.contiguous(), kept, 3, 1.0, sampling_ratio, True))


def test_bad_rois_are_refused() -> None:
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"image indices must lie in \[0, 2\), got 0..2"):
        roi_align_nhwc(x, torch.tensor([[0.0, 0, 0, 4, 4], [2.0, 0, 0, 4, 4]]), 2, 1.0, 0, True)
    with pytest.raises(ValueError, match=r"image indices must lie in \[0, 2\), got -1..-1"):
        roi_align_nhwc(x, torch.tensor([[-1.0, 0, 0, 4, 4]]), 2, 1.0, 0, True)
    with pytest.raises(ValueError, match=r"rois must have shape \(R, 5\), got \(1, 4\)"):
        roi_align_nhwc(x, torch.zeros(1, 4), 2, 1.0, 0, True)


def test_empty_inputs() -> None:
    x = torch.randn(1, 5, 6, 6, dtype=torch.bfloat16)
    out = roi_align_nhwc(x, torch.zeros(0, 5), (3, 4), 1.0, 0, True)
    assert out.shape == (0, 5, 3, 4) and out.dtype == torch.float32
    empty_map = torch.zeros(1, 5, 0, 6)  # torchvision's CPU kernel reads out of bounds here
    with pytest.raises(ValueError, match=r"empty feature map of shape \(1, 5, 0, 6\)"):
        roi_align_nhwc(empty_map, torch.tensor([[0.0, 0, 0, 3, 3]]), 2, 1.0, 0, True)
    assert roi_align_nhwc(empty_map, torch.zeros(0, 5), 2, 1.0, 0, True).shape == (0, 5, 2, 2)


@needs_kernel
def test_what_it_accepts() -> None:
    x = torch.randn(1, 4, 8, 8)
    assert accepts(x) and accepts(x.to(torch.bfloat16))
    assert not accepts(x.to(torch.float16)) and not accepts(x.double())
    assert not accepts(x[0])
    leaf = x.clone().requires_grad_()
    assert not accepts(leaf)  # the kernel has no backward
    with torch.no_grad():
        assert accepts(leaf)
    with torchvision_only():
        assert not accepts(x)
    assert accepts(x)
    assert describe().startswith("cvserve NHWC kernel (")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp32_roi_align_module_uses_it(dtype: torch.dtype) -> None:
    """detectron2's pooler module as served: the same values with and without the kernel,
    the features' dtype out, and the gradient path (training) left to torchvision."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 20, 24, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    rois = _rois(50, 2, 20, 24, 0.125, g)
    module = Fp32ROIAlign((7, 7), 0.125, 0, True)
    with torch.inference_mode():
        fast = module(x, rois)
        with torchvision_only():
            reference = module(x, rois)
    assert fast.dtype == dtype
    assert torch.equal(
        fast.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        reference.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    )
    if dtype == torch.float32:
        detectron2 = ROIAlign((7, 7), 0.125, 0, True)(x.contiguous(), rois)
        assert_same_bits(fast, detectron2)
        leaf = x.detach().clone().requires_grad_()
        out = module(leaf, rois)
        out.sum().backward()
        assert leaf.grad is not None and leaf.grad.shape == x.shape


def test_without_the_kernel_torchvision_pools(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An install without a C compiler: the same outputs from torchvision, a warning at load."""
    monkeypatch.setattr(nhwc_roi_align, "_kernel", None)
    monkeypatch.setattr(nhwc_roi_align, "_IMPORT_ERROR", "No module named '_roi_align'")
    monkeypatch.setattr(nhwc_roi_align, "_logged", False)
    x = torch.randn(2, 8, 10, 12).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    rois = _rois(20, 2, 10, 12, 0.5, torch.Generator().manual_seed(2))
    assert not accepts(x)
    expected = roi_align(x.float().contiguous(), rois, (3, 3), 0.5, 0, True)
    assert_same_bits(roi_align_nhwc(x, rois, (3, 3), 0.5, 0, True), expected)
    with torch.inference_mode():
        assert torch.equal(Fp32ROIAlign((3, 3), 0.5, 0, True)(x, rois), expected.to(torch.bfloat16))
    assert describe() == "torchvision (cvserve's NHWC kernel is not built: No module named '_roi_align')"
    with caplog.at_level("INFO", logger=nhwc_roi_align.__name__):
        nhwc_roi_align.log_kernel()
        nhwc_roi_align.log_kernel()  # once per process
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "not built" in caplog.records[0].getMessage()
