"""EncoderDecoderSegmentor at toy sizes with random weights."""

from __future__ import annotations

from typing import Any

# isort: split

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from cvserve.models.semseg import EncoderDecoderSegmentor, semseg_config
from cvserve.models.semseg.config import ENCODER_CHOICES

from .conftest import NUM_CLASSES


def _inputs(sizes: list[tuple[int, int]], with_labels: bool = False) -> list[dict[str, Any]]:
    out = []
    for h, w in sizes:
        item: dict[str, Any] = {"image": torch.rand(3, h, w) * 255}
        if with_labels:
            item["sem_seg"] = torch.randint(0, NUM_CLASSES, (h, w))
        out.append(item)
    return out


def _shapes_batch(n: int = 2, size: int = 64) -> list[dict[str, Any]]:
    """Images with a bright square labelled 1..n on a dark background (0): learnable quickly."""
    batch = []
    for i in range(n):
        image = torch.full((3, size, size), 20.0)
        label = torch.zeros(size, size, dtype=torch.long)
        y, x = 8 + 10 * i, 12 + 6 * i
        image[:, y : y + 24, x : x + 24] = 230.0 - 60 * i
        label[y : y + 24, x : x + 24] = 1 + i % (NUM_CLASSES - 1)
        batch.append({"image": image, "sem_seg": label})
    return batch


def test_registered_and_built_from_config(seg_cfg: CfgNode) -> None:
    model = build_model(seg_cfg)
    assert isinstance(model, EncoderDecoderSegmentor)
    # the encoder includes the bottom-up ResNet stages, named as in the detection model
    keys = model.state_dict().keys()
    for stage in ("stem", "res2", "res3", "res4", "res5"):
        assert any(k.startswith(f"backbone.bottom_up.{stage}.") for k in keys)


@pytest.mark.parametrize("size", [(45, 67), (33, 50), (64, 64)])
def test_inference_output_is_logits_at_requested_size(seg_cfg: CfgNode, size: tuple[int, int]) -> None:
    model = build_model(seg_cfg).eval()
    h, w = size
    with torch.no_grad():
        own = model(_inputs([size]))
        resized = model([{"image": torch.rand(3, h, w) * 255, "height": 2 * h + 1, "width": w + 3}])
    assert own[0]["sem_seg"].shape == (NUM_CLASSES, h, w)
    assert resized[0]["sem_seg"].shape == (NUM_CLASSES, 2 * h + 1, w + 3)


def test_batch_of_mixed_sizes(seg_cfg: CfgNode) -> None:
    model = build_model(seg_cfg).eval()
    with torch.no_grad():
        out = model(_inputs([(37, 70), (64, 41)]))
    assert [tuple(o["sem_seg"].shape) for o in out] == [(NUM_CLASSES, 37, 70), (NUM_CLASSES, 64, 41)]


def test_loss_decreases_on_tiny_overfit_batch(seg_cfg: CfgNode) -> None:
    seg_cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.0
    model = build_model(seg_cfg).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = _shapes_batch()
    losses = []
    for _ in range(10):
        loss = model(batch)["loss_sem_seg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def _shape_classes_batch(n: int = 4, size: int = 64) -> list[dict[str, Any]]:
    """A filled square (1) and a hollow one (2) of one colour: only the shape tells them apart."""
    batch = []
    for i in range(n):
        image = torch.full((3, size, size), 20.0)
        label = torch.zeros(size, size, dtype=torch.long)
        filled, hollow = (4 + 3 * i, 6 + 2 * i), (34 - 2 * i, 30 + i)
        image[:, filled[0] : filled[0] + 20, filled[1] : filled[1] + 20] = 200.0
        label[filled[0] : filled[0] + 20, filled[1] : filled[1] + 20] = 1
        y, x = hollow
        image[:, y : y + 24, x : x + 24] = 200.0
        label[y : y + 24, x : x + 24] = 2
        image[:, y + 6 : y + 18, x + 6 : x + 18] = 20.0
        label[y + 6 : y + 18, x + 6 : x + 18] = 0
        batch.append({"image": image, "sem_seg": label})
    return batch


def test_learns_classes_that_only_shape_separates(seg_cfg: CfgNode) -> None:
    # The classifier's initial scale matters here: with a near-zero classifier the decoder
    # got almost no gradient, and every foreground pixel stayed one class for hundreds of steps.
    seg_cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.0
    model = build_model(seg_cfg).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = _shape_classes_batch()
    for _ in range(40):
        loss = model(batch)["loss_sem_seg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, logits = _decoder_logits(model, batch)
    size = batch[0]["sem_seg"].shape
    predicted = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)
    labels = torch.stack([b["sem_seg"] for b in batch])
    for cls in (1, 2):
        accuracy = (predicted[labels == cls] == cls).float().mean().item()
        assert accuracy > 0.9, f"class {cls}: {accuracy:.2f} of its pixels right"


def _decoder_logits(model: nn.Module, batch: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss and the decoder's raw logits of the same forward pass."""
    captured: list[torch.Tensor] = []
    handle = model.decoder.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        loss = model(batch)["loss_sem_seg"]
    finally:
        handle.remove()
    return loss.detach(), captured[0]


def test_ignore_label_and_padding_do_not_count(seg_cfg: CfgNode) -> None:
    seg_cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.0
    model = build_model(seg_cfg).train()
    h, w = 45, 50  # padded to 64 x 64 inside the model
    label = torch.randint(0, NUM_CLASSES, (h, w))
    label[:20] = 255
    loss, logits = _decoder_logits(model, [{"image": torch.rand(3, h, w) * 255, "sem_seg": label}])
    full = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)[0, :, :h, :w]
    per_pixel = F.cross_entropy(full[None], label[None], ignore_index=255, reduction="none")[0]
    expected = per_pixel[label != 255].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_class_weights_change_the_loss(seg_cfg: CfgNode) -> None:
    seg_cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.0
    batch = _shapes_batch()
    torch.manual_seed(1)
    plain = build_model(seg_cfg).train()
    seg_cfg.MODEL.SEMSEG.CLASS_WEIGHTS = [0.1, 5.0, 5.0, 5.0]
    torch.manual_seed(1)
    weighted = build_model(seg_cfg).train()
    assert not torch.allclose(plain(batch)["loss_sem_seg"], weighted(batch)["loss_sem_seg"])
    seg_cfg.MODEL.SEMSEG.CLASS_WEIGHTS = [1.0, 2.0]
    with pytest.raises(ValueError, match="CLASS_WEIGHTS"):
        build_model(seg_cfg)


def test_inference_takes_back_the_class_weights_bias(seg_cfg: CfgNode) -> None:
    batch = [{"image": x["image"]} for x in _shapes_batch()]
    torch.manual_seed(1)
    plain = build_model(seg_cfg).eval()
    seg_cfg.MODEL.SEMSEG.CLASS_WEIGHTS = [0.5, 2.0, 4.0, 8.0]
    for tau in (1.0, 0.5, 0.0):
        seg_cfg.MODEL.SEMSEG.LOGIT_ADJUSTMENT = tau
        torch.manual_seed(1)
        weighted = build_model(seg_cfg).eval()
        with torch.no_grad():
            expected = (
                plain(batch)[0]["sem_seg"]
                - tau * torch.log(torch.tensor([0.5, 2.0, 4.0, 8.0]))[:, None, None]
            )
            torch.testing.assert_close(weighted(batch)[0]["sem_seg"], expected)
    seg_cfg.MODEL.SEMSEG.LOGIT_ADJUSTMENT = -1.0
    with pytest.raises(ValueError, match=r"LOGIT_ADJUSTMENT must be >= 0, got -1\.0"):
        build_model(seg_cfg)
    seg_cfg.MODEL.SEMSEG.LOGIT_ADJUSTMENT = 1.0
    seg_cfg.MODEL.SEMSEG.CLASS_WEIGHTS = [0.0, 2.0, 4.0, 8.0]  # a zero weight has no log
    with pytest.raises(ValueError, match=r"CLASS_WEIGHTS must all be > 0 with LOGIT_ADJUSTMENT 1\.0"):
        build_model(seg_cfg)
    seg_cfg.MODEL.SEMSEG.LOGIT_ADJUSTMENT = 0.0
    build_model(seg_cfg)  # without the adjustment a zero weight is allowed


def test_dropout_active_only_in_train_mode(seg_cfg: CfgNode) -> None:
    seg_cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.5
    model = build_model(seg_cfg)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.decoder.dropout.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
    batch = _shapes_batch()
    model.train()(batch)
    model.eval()
    with torch.no_grad():
        model(batch)
    (train_in, train_out), (eval_in, eval_out) = seen
    dropped = (train_out == 0).all(dim=(2, 3)) & (train_in != 0).any(dim=(2, 3))
    assert dropped.any(), "dropout zeroed no channel in train mode"
    torch.testing.assert_close(eval_out, eval_in)


def test_freeze_through_stage(seg_cfg: CfgNode) -> None:
    seg_cfg.MODEL.SEMSEG.FREEZE_ENCODER_AT = "res3"
    model = build_model(seg_cfg)
    bottom_up = model.backbone.bottom_up
    for frozen in (bottom_up.stem, bottom_up.res2, bottom_up.res3):
        assert not any(p.requires_grad for p in frozen.parameters())
    assert isinstance(bottom_up.res2[0].conv1.norm, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in bottom_up.res4.parameters())
    assert isinstance(bottom_up.res4[0].conv1.norm, nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_freeze_whole_encoder(seg_cfg: CfgNode) -> None:
    seg_cfg.MODEL.SEMSEG.FREEZE_ENCODER_AT = "encoder"
    model = build_model(seg_cfg)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.decoder.parameters())
    seg_cfg.MODEL.SEMSEG.FREEZE_ENCODER_AT = "res9"
    with pytest.raises(ValueError, match="FREEZE_ENCODER_AT"):
        build_model(seg_cfg)


def test_plain_resnet_encoder(seg_cfg: CfgNode) -> None:
    seg_cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    model = build_model(seg_cfg).eval()
    assert model.decoder.in_features == ["res5", "res4", "res3", "res2"]
    with torch.no_grad():
        out = model(_inputs([(40, 52)]))
    assert out[0]["sem_seg"].shape == (NUM_CLASSES, 40, 52)


def test_default_encoder_is_the_detectors_resnet(det_cfg: CfgNode) -> None:
    cfg = semseg_config(NUM_CLASSES, backbone_from=det_cfg, input_size=64)
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEMSEG.DECODER_CHANNELS = [32, 16, 16, 16]
    model = build_model(cfg).eval()
    assert model.decoder.in_features == ["res5", "res4", "res3", "res2"]
    # The same parameter names as the detector's ResNet, less its "bottom_up." prefix.
    detector = {k.replace("backbone.bottom_up.", "backbone.") for k in build_model(det_cfg).state_dict()}
    assert set(model.backbone.state_dict()) <= {k.removeprefix("backbone.") for k in detector}
    with torch.no_grad():
        out = model(_inputs([(40, 52)]))
    assert out[0]["sem_seg"].shape == (NUM_CLASSES, 40, 52)


def test_encoder_choice_for_the_slim_backbone_and_unknown_builders() -> None:
    from cvserve.models.instance.config import tiny_instance_config

    slim = tiny_instance_config(3, input_size=64)
    assert semseg_config(NUM_CLASSES, backbone_from=slim).MODEL.BACKBONE.NAME == "build_slim_resnet_backbone"
    assert semseg_config(NUM_CLASSES, backbone_from=slim, encoder="fpn").MODEL.BACKBONE.NAME == (
        "build_slim_resnet_fpn_backbone"
    )
    slim.MODEL.BACKBONE.NAME = "build_mobilenet_fpn_backbone"
    with pytest.raises(ValueError, match=r"build_mobilenet_fpn_backbone.*use encoder 'fpn'"):
        semseg_config(NUM_CLASSES, backbone_from=slim)
    with pytest.raises(ValueError, match="encoder must be one of resnet, fpn"):
        semseg_config(NUM_CLASSES, backbone_from=None, encoder="vit")


def test_cli_encoder_choices_match() -> None:
    from cvserve.cli import train_semantic

    assert train_semantic._ENCODERS == ENCODER_CHOICES


def test_detection_checkpointer_round_trip(seg_cfg: CfgNode, tmp_path) -> None:
    model = build_model(seg_cfg).eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("seg")
    torch.manual_seed(123)
    restored = build_model(seg_cfg).eval()
    DetectionCheckpointer(restored).load(str(tmp_path / "seg.pth"))
    batch = _inputs([(48, 48)])
    with torch.no_grad():
        torch.testing.assert_close(model(batch)[0]["sem_seg"], restored(batch)[0]["sem_seg"])
