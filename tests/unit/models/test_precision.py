"""Precision: CPU bf16 detection, ``auto`` resolution, the one autocast path, fp32 islands."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from detectron2.layers import ROIAlign
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import roi_align

from cvserve.models import precision
from cvserve.models.instance.roi_align import Fp32ROIAlign, GatherROIAlign, keep_roi_align_fp32
from cvserve.models.precision import (
    BF16_LOSS_KEY,
    CpuBf16,
    autocast,
    detect_cpu_bf16,
    keep_outputs_fp32,
    resolve_precision,
)

FLAGS = "fpu vme sse sse2 avx2 avx512f"


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(
        f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n", encoding="ascii"
    )
    return path


@pytest.mark.parametrize(
    ("flags", "native", "found"),
    [
        (f"{FLAGS} amx_tile amx_bf16 avx512_bf16", True, ("amx_bf16", "avx512_bf16")),
        (f"{FLAGS} avx512_bf16", True, ("avx512_bf16",)),
        (FLAGS, False, ()),  # plain AVX512: bf16 is emulated there, slower than fp32
    ],
)
def test_detects_bf16_from_cpu_flags(
    tmp_path: Path, flags: str, native: bool, found: tuple[str, ...]
) -> None:
    info = detect_cpu_bf16(_cpuinfo(tmp_path, flags))
    assert (info.native, info.flags) == (native, found)
    assert info.describe().startswith("native bf16") is native


def test_without_cpuinfo_asks_torch(tmp_path: Path) -> None:
    info = detect_cpu_bf16(tmp_path / "missing")
    assert info.source == "torch oneDNN check"
    assert info.native == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("native", [True, False])
def test_auto_resolves_per_device_and_recorded_loss(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision, "cpu_bf16", lambda: CpuBf16(native, ("avx512_bf16",) * native, "test"))
    cpu = "bf16" if native else "fp32"
    assert resolve_precision("auto", "cpu") == cpu
    assert resolve_precision("auto", "cpu", {BF16_LOSS_KEY: 0.3}) == cpu  # at most 0.3 points
    assert resolve_precision("auto", "cpu", {BF16_LOSS_KEY: 0.31}) == "fp32"
    assert resolve_precision("auto", "cuda:0") == "fp16"
    assert resolve_precision("auto", "cuda:0", {BF16_LOSS_KEY: 5.0}) == "fp16"
    assert resolve_precision("fp16", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("bf16", "cuda") == "bf16"
    assert resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, fp16, bf16"):
        resolve_precision("int8", "cpu")


def test_one_autocast_path_runs_bf16_on_the_cpu() -> None:
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 8, 8)
    with autocast("cpu", "bf16"):
        assert conv(x).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert conv(x).dtype == torch.float32
    with warnings.catch_warnings():  # without a GPU torch warns that it disables CUDA autocast
        warnings.simplefilter("ignore")
        assert isinstance(autocast("cuda:0", "fp16"), torch.autocast)  # the same code on a GPU


def test_output_layers_stay_fp32_under_autocast() -> None:
    model = torch.nn.Sequential()
    model.add_module("body", torch.nn.Linear(8, 8))
    model.add_module("cls_score", torch.nn.Linear(8, 3))
    keys = list(model.state_dict())
    assert keep_outputs_fp32(model) == 1
    assert keep_outputs_fp32(model) == 0  # never wrapped twice
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 8)
    with autocast("cpu", "bf16"):
        hidden = model.body(x)
        out = model.cls_score(hidden)
    assert hidden.dtype == torch.bfloat16 and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.nn.functional.linear(hidden.float(), *model.cls_score.parameters()))


def _far_rois() -> torch.Tensor:
    """Boxes with coordinates above 1024, where bf16 rounds to multiples of 8."""
    return torch.tensor([[0, 1100.3, 700.3, 1180.6, 760.9], [0, 1030.5, 1025.2, 1101.7, 1090.1]])


@pytest.mark.parametrize("module", [Fp32ROIAlign, GatherROIAlign])
def test_roi_align_keeps_box_coordinates_fp32(module: type[ROIAlign]) -> None:
    torch.manual_seed(0)
    features = torch.randn(1, 8, 80, 80).to(torch.bfloat16)  # a stride-16 map of a 1280 px image
    rois = _far_rois()
    expected = roi_align(features.float(), rois, (7, 7), 1 / 16, 0, True).to(torch.bfloat16)
    with autocast("cpu", "bf16"):
        got = module((7, 7), 1 / 16, 0, True)(features, rois)
        snapped = ROIAlign((7, 7), 1 / 16, 0, True)(features, rois)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
    # detectron2's own module pools from boxes rounded to bf16: visibly elsewhere.
    assert (snapped.float() - expected.float()).abs().max() > 0.1


def test_keep_roi_align_fp32_swaps_detectron2_modules() -> None:
    model = torch.nn.ModuleDict({"a": ROIAlign((7, 7), 0.25, 0, True), "b": torch.nn.ReLU()})
    assert keep_roi_align_fp32(model) == 1
    assert type(model["a"]) is Fp32ROIAlign and model["a"].spatial_scale == 0.25


def test_pooling_inputs_are_converted_once_per_forward_and_pool_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cvserve.models.instance import pooling_inputs as module
    from cvserve.models.instance import roi_align as roi_align_module
    from cvserve.models.instance.nhwc_roi_align import accepts, torchvision_only

    torch.manual_seed(0)
    # A channels-last bf16 map, as the served backbone's convolutions leave it under autocast.
    features = torch.randn(1, 8, 40, 40).to(torch.bfloat16).to(memory_format=torch.channels_last)
    rois = torch.tensor([[0, 10.3, 12.7, 30.1, 38.2], [0, 1.5, 2.5, 20.5, 9.0]])
    expected = roi_align(features.float().contiguous(), rois, (7, 7), 0.5, 0, True).to(torch.bfloat16)
    conversions: list[torch.Tensor] = []
    real = module.pooling_input

    def counted(input: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
        out = real(input, layout)
        conversions.append(out)
        return out

    monkeypatch.setattr(roi_align_module, "pooling_input", counted)  # where Fp32ROIAlign looks it up
    box, mask = Fp32ROIAlign((7, 7), 0.5, 0, True), Fp32ROIAlign((14, 14), 0.5, 0, True)
    # torchvision's kernel pools (where cvserve's channels-last kernel is not built, or in training)
    with autocast("cpu", "bf16"), module.shared_pooling_inputs(), torchvision_only():
        first = box(features, rois)
        mask(features, rois)
        second = box(features, rois)
    assert conversions[0] is conversions[1] is conversions[2]  # one fp32 NCHW copy for all three
    assert conversions[0].is_contiguous() and conversions[0].dtype == torch.float32
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert getattr(module._shared, "maps", None) is None  # the copies are dropped with the block
    with autocast("cpu", "bf16"), torchvision_only():
        box(features, rois)
        box(features, rois)
    assert conversions[3] is not conversions[4]  # outside a block: converted at each call
    if accepts(features):  # cvserve's kernel reads the bf16 map as it is: no conversion at all
        with autocast("cpu", "bf16"), module.shared_pooling_inputs():
            assert torch.equal(box(features, rois), expected)
        assert len(conversions) == 5
    plain = torch.randn(1, 8, 40, 40)
    assert real(plain, torch.contiguous_format) is plain  # fp32 NCHW needs no copy
    nhwc = plain.to(memory_format=torch.channels_last)
    assert real(nhwc, torch.channels_last) is nhwc  # nor NHWC for the gather pooling


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2),
    channels=st.integers(1, 40),
    height=st.integers(1, 23),
    width=st.integers(1, 23),
    block=st.integers(1, 300),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
)
def test_blocked_layout_conversion_equals_torch(
    n: int, channels: int, height: int, width: int, block: int, dtype: torch.dtype
) -> None:
    from cvserve.models.instance import pooling_inputs as module

    features = torch.randn(n, channels, height, width).to(dtype).to(memory_format=torch.channels_last)
    expected = features.to(torch.float32, memory_format=torch.contiguous_format)
    limits = (module._BLOCKED_MIN, module._BLOCK)
    module._BLOCKED_MIN, module._BLOCK = 1, block  # blocks of 1 to 300 elements: uneven tails, one-row blocks
    try:
        got = module._convert(features, torch.float32, torch.contiguous_format)
    finally:
        module._BLOCKED_MIN, module._BLOCK = limits
    assert got.is_contiguous() and got.dtype == torch.float32
    assert torch.equal(got, expected)
