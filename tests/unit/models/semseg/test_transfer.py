"""Encoder transfer from detection checkpoints the tests write themselves."""

from __future__ import annotations

import pickle
from pathlib import Path

# isort: split

import numpy as np
import pytest
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from cvserve.models.semseg import load_encoder_from_detection


def _detection_state(det_cfg: CfgNode) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)  # different weights from the segmenter's random init
    return build_model(det_cfg).state_dict()


def _assert_loaded(seg_model: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    for key, value in seg_model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[prefix + key].to(value.dtype), msg=key)


def test_detection_pth_loads_every_backbone_key(det_cfg: CfgNode, seg_cfg: CfgNode, tmp_path: Path) -> None:
    state = _detection_state(det_cfg)
    path = tmp_path / "det.pth"
    torch.save({"model": state, "__cvserve__": {"class_names": ["a", "b", "c"]}}, path)
    seg = build_model(seg_cfg)

    report = load_encoder_from_detection(seg, path)

    backbone_keys = {k for k in state if k.startswith("backbone.")}
    assert report.complete
    assert set(report.loaded.values()) == backbone_keys
    unused = set(report.unused_checkpoint_keys)
    assert unused == set(state) - backbone_keys
    assert any(k.startswith("roi_heads.") for k in unused)
    assert any(k.startswith("proposal_generator.") for k in unused)
    _assert_loaded(seg, state, "backbone.")


def test_fp16_state_dict_without_model_key(det_cfg: CfgNode, seg_cfg: CfgNode, tmp_path: Path) -> None:
    state = {k: v.half() if v.is_floating_point() else v for k, v in _detection_state(det_cfg).items()}
    path = tmp_path / "det_fp16.pth"
    torch.save(state, path)
    seg = build_model(seg_cfg)
    report = load_encoder_from_detection(seg, path)
    assert report.complete
    assert next(seg.backbone.parameters()).dtype == torch.float32
    _assert_loaded(seg, state, "backbone.")


def test_plain_resnet_encoder_takes_bottom_up_only(
    det_cfg: CfgNode, seg_cfg: CfgNode, tmp_path: Path
) -> None:
    state = _detection_state(det_cfg)
    path = tmp_path / "det.pth"
    torch.save({"model": state}, path)
    seg_cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    seg = build_model(seg_cfg)
    report = load_encoder_from_detection(seg, path)
    assert report.complete
    assert any(k.startswith("backbone.fpn_lateral") for k in report.unused_checkpoint_keys)
    _assert_loaded(seg, state, "backbone.bottom_up.")


def test_model_zoo_pkl(det_cfg: CfgNode, seg_cfg: CfgNode, tmp_path: Path) -> None:
    state = _detection_state(det_cfg)
    path = tmp_path / "model_final.pkl"
    blob = {
        "model": {k: v.numpy() for k, v in state.items() if not k.endswith("num_batches_tracked")},
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
    }
    path.write_bytes(pickle.dumps(blob))
    seg = build_model(seg_cfg)
    report = load_encoder_from_detection(seg, path)
    assert report.complete  # BatchNorm step counters are not weights: not reported missing
    assert any(k.startswith("roi_heads.") for k in report.unused_checkpoint_keys)
    _assert_loaded(seg, state, "backbone.")


def test_caffe2_names_are_converted_and_gaps_reported(seg_cfg: CfgNode, tmp_path: Path) -> None:
    seg = build_model(seg_cfg)
    encoder = seg.backbone.state_dict()
    stem_w = np.random.rand(*encoder["bottom_up.stem.conv1.weight"].shape).astype(np.float32)
    conv_w = np.random.rand(*encoder["bottom_up.res2.0.conv1.weight"].shape).astype(np.float32)
    blobs = {"conv1_w": stem_w, "res2_0_branch2a_w": conv_w, "mask_fcn1_w": np.zeros((4, 4), np.float32)}
    path = tmp_path / "c2.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}))

    report = load_encoder_from_detection(seg, path)

    assert report.loaded == {
        "bottom_up.res2.0.conv1.weight": "res2.0.conv1.weight",
        "bottom_up.stem.conv1.weight": "stem.conv1.weight",
    }
    np.testing.assert_allclose(seg.backbone.bottom_up.stem.conv1.weight.detach().numpy(), stem_w)
    np.testing.assert_allclose(seg.backbone.bottom_up.res2[0].conv1.weight.detach().numpy(), conv_w)
    assert not report.complete
    assert "bottom_up.res5.1.conv2.weight" in report.uninitialized_encoder_keys
    assert "fpn_lateral2.weight" in report.uninitialized_encoder_keys
    assert len(report.unused_checkpoint_keys) == 1  # the mask-head blob, under its converted name
    assert "fcn1" in report.unused_checkpoint_keys[0]


def test_shape_mismatch_is_reported_not_loaded(det_cfg: CfgNode, seg_cfg: CfgNode, tmp_path: Path) -> None:
    state = _detection_state(det_cfg)
    state["backbone.fpn_output2.weight"] = torch.zeros(8, 16, 3, 3)
    path = tmp_path / "det.pth"
    torch.save({"model": state}, path)
    seg = build_model(seg_cfg)
    before = seg.backbone.fpn_output2.weight.detach().clone()
    report = load_encoder_from_detection(seg, path)
    assert report.shape_mismatches == {"fpn_output2.weight": ((8, 16, 3, 3), (16, 16, 3, 3))}
    assert "backbone.fpn_output2.weight" in report.unused_checkpoint_keys
    torch.testing.assert_close(seg.backbone.fpn_output2.weight.detach(), before)
    assert not report.complete


def test_unrelated_checkpoint_and_missing_file_raise(seg_cfg: CfgNode, tmp_path: Path) -> None:
    seg = build_model(seg_cfg)
    path = tmp_path / "other.pth"
    torch.save({"model": {"classifier.weight": torch.zeros(3)}}, path)
    with pytest.raises(ValueError, match=r"other\.pth"):
        load_encoder_from_detection(seg, path)
    with pytest.raises(FileNotFoundError, match=r"absent\.pth"):
        load_encoder_from_detection(seg, tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk\.pth"):
        load_encoder_from_detection(seg, tmp_path / "junk.pth")


def test_transfer_then_freeze_keeps_weights(det_cfg: CfgNode, seg_cfg: CfgNode, tmp_path: Path) -> None:
    state = _detection_state(det_cfg)
    path = tmp_path / "det.pth"
    torch.save({"model": state}, path)
    seg_cfg.MODEL.SEMSEG.FREEZE_ENCODER_AT = "encoder"
    seg = build_model(seg_cfg)
    report = load_encoder_from_detection(seg, path)
    assert report.complete
    assert not any(p.requires_grad for p in seg.backbone.parameters())
    _assert_loaded(seg, state, "backbone.")
