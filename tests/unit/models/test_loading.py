"""The load steps both adapters share: weights and their metadata, the serving transforms."""

from __future__ import annotations

import logging
from pathlib import Path

# isort: split

import pytest
import torch
from detectron2.layers import Conv2d
from torch import nn

from cvserve.models.checkpoint import save_checkpoint
from cvserve.models.loading import load_weights, ready_for_inference


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = Conv2d(3, 4, 3, padding=1, bias=False, norm=nn.BatchNorm2d(4))  # detectron2's
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_load_weights_returns_the_checkpoint_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = _Net()
    path = save_checkpoint(source, tmp_path / "net.pth", extra={"class_names": ["a", "b"], "bf16_loss": 0.1})
    target = _Net()
    meta = load_weights(target, "net", str(path))
    assert meta["class_names"] == ["a", "b"] and meta["bf16_loss"] == 0.1
    assert torch.equal(target.conv.weight, source.conv.weight)


def test_load_weights_without_a_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cvserve.models.loading"):
        assert load_weights(_Net(), "net", None) == {}
    assert "net: no weights given" in caplog.text
    missing = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match=r"model 'net': weights file .*absent\.pth does not exist"):
        load_weights(_Net(), "net", str(missing))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ready_for_inference_keeps_the_outputs(precision: str) -> None:
    from cvserve.models.precision import autocast

    torch.manual_seed(0)
    net = _Net()
    assert net.conv.norm is not None
    net.conv.norm.running_mean.uniform_(-1, 1)
    net.conv.norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    net.eval()
    with torch.no_grad(), autocast("cpu", precision):
        expected = net(x)
    ready_for_inference(net, precision, fuse_batch_norm=True, channels_last=True)
    assert not net.training
    assert net.conv.norm is None  # folded into the convolution
    assert net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert net.conv.weight.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    with torch.no_grad(), autocast("cpu", precision):
        got = net(x)
    tolerance = 5e-2 if precision == "bf16" else 1e-5  # folding the batch norm rounds differently
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)
