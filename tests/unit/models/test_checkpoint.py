"""Checkpoints: our writer, and DetectionCheckpointer loading model-zoo and Caffe2-style pickles."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from cvserve.models.checkpoint import META_KEY, read_checkpoint_meta, save_checkpoint
from cvserve.models.instance.config import tiny_instance_config


@pytest.fixture(scope="module")
def cfg() -> CfgNode:
    return tiny_instance_config(3, input_size=64)


def _model(cfg: CfgNode, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg)
    # Non-trivial BatchNorm statistics, so that keeping them exact is tested.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def _features(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    x = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        return model.backbone((x - model.pixel_mean) / model.pixel_std)


def test_save_fp32_round_trip_through_detection_checkpointer(cfg: CfgNode, tmp_path: Path) -> None:
    source, target = _model(cfg, 1), _model(cfg, 2)
    path = save_checkpoint(
        source, tmp_path / "sub" / "model.pth", extra={"class_names": ["a", "b", "c"], "iteration": 9}
    )
    assert read_checkpoint_meta(path) == {"class_names": ["a", "b", "c"], "iteration": 9, "dtype": "float32"}
    extra = DetectionCheckpointer(target).load(str(path))
    assert extra[META_KEY]["class_names"] == ["a", "b", "c"]
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob("sub/*.tmp")), "temporary file left behind"


def test_fp16_halves_parameters_keeps_buffers_and_loads_into_fp32(cfg: CfgNode, tmp_path: Path) -> None:
    source, target = _model(cfg, 1), _model(cfg, 2)
    full = save_checkpoint(source, tmp_path / "fp32.pth")
    half = save_checkpoint(source, tmp_path / "fp16.pth", fp16=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    state = torch.load(half, weights_only=True)["model"]
    params = dict(source.named_parameters())
    for name, tensor in state.items():
        if name in params:
            assert tensor.dtype == torch.float16, name
        else:  # buffers keep dtype and value: BN statistics, counters
            assert torch.equal(tensor, source.state_dict()[name]), name
    assert read_checkpoint_meta(half)["dtype"] == "float16"

    DetectionCheckpointer(target).load(str(half))
    assert all(p.dtype == torch.float32 for p in target.parameters())
    expected, got = _features(source), _features(target)
    for level in expected:
        error = (got[level] - expected[level]).norm() / expected[level].norm()
        assert error < 1e-2, f"{level}: relative error {error:.2e}"


def test_model_zoo_pickle_loads_into_model(cfg: CfgNode, tmp_path: Path) -> None:
    source, target = _model(cfg, 1), _model(cfg, 2)
    zoo = {
        "model": {k: v.numpy() for k, v in source.state_dict().items()},
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
    }
    path = tmp_path / "model_final_abc.pkl"
    path.write_bytes(pickle.dumps(zoo))
    DetectionCheckpointer(target).load(str(path))
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    assert read_checkpoint_meta(path) == {}


def test_caffe2_named_pickle_loads_stem(cfg: CfgNode, tmp_path: Path) -> None:
    target = _model(cfg, 2)
    stem = target.backbone.bottom_up.stem
    torch.manual_seed(5)
    conv1_w = torch.randn_like(stem.conv1.weight)
    bn_scale = torch.rand_like(stem.conv1.norm.weight)
    blobs = {
        "conv1_w": conv1_w.numpy(),
        "res_conv1_bn_s": bn_scale.numpy(),
        "conv1_w_momentum": conv1_w.numpy(),
    }
    path = tmp_path / "R-18.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}))
    DetectionCheckpointer(target).load(str(path))
    assert torch.equal(stem.conv1.weight, conv1_w)
    assert torch.equal(stem.conv1.norm.weight, bn_scale)
