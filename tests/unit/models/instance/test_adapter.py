"""DetectronModel on a tiny Mask R-CNN with random weights: shapes, coordinates, faithfulness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from cvserve.models.build import build_model as build_from_spec
from cvserve.models.checkpoint import save_checkpoint
from cvserve.models.instance.adapter import DetectronModel
from cvserve.models.instance.config import tiny_instance_config
from cvserve.models.repository import ModelSpec
from cvserve.models.types import Task
from tests.fixtures.matching import match_detections

CLASSES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[CfgNode, Path, Path]:
    """A tiny Mask R-CNN config (every proposal kept) and random weights, on disk."""
    root = tmp_path_factory.mktemp("tiny_mask_rcnn")
    cfg = tiny_instance_config(len(CLASSES), input_size=64)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights score low; keep everything
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 200
    torch.manual_seed(0)
    model = build_model(cfg)
    weights = save_checkpoint(model, root / "model.pth", extra={"class_names": list(CLASSES)})
    config = root / "config.yaml"
    config.write_text(cfg.dump(), encoding="utf-8")
    return cfg, config, weights


def _spec(config: Path, weights: Path | str, precision: str = "fp32", **options: object) -> ModelSpec:
    """CPU and fp32 unless asked: these tests assert CPU facts (channels-last by default,
    agreement with a CPU DefaultPredictor in fp32; bf16: test_precision), which a GPU host
    would otherwise not run."""
    return ModelSpec(
        name="tiny",
        task=Task.INSTANCE,
        config=str(config),
        weights=str(weights),
        device="cpu",
        precision=precision,
        options=options,
    )


@pytest.fixture(scope="module")
def model(tiny: tuple[CfgNode, Path, Path]) -> DetectronModel:
    _, config, weights = tiny
    m = DetectronModel(_spec(config, weights))
    m.load()
    return m


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 4 : w // 2] = (250, 20, 20)  # some structure for the proposals
    return img


def test_registry_builds_detectron_model(tiny: tuple[CfgNode, Path, Path]) -> None:
    _, config, weights = tiny
    built = build_from_spec(_spec(config, weights))
    assert isinstance(built, DetectronModel)
    assert not built.ready


def test_loads_class_names_from_checkpoint(model: DetectronModel) -> None:
    assert model.ready
    assert model.class_names == CLASSES
    assert model.device == "cpu"


def test_prediction_in_original_coordinates(model: DetectronModel) -> None:
    h, w = 48, 80  # resized to 64 x 107 inside, capped by max_size
    (pred,) = model.predict_batch([_image(h, w)])
    assert pred.image_size == (h, w)
    assert len(pred.instances) > 0
    scores = [i.score for i in pred.instances]
    assert scores == sorted(scores, reverse=True)
    boxes = np.array([i.box for i in pred.instances])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert boxes[:, 2].max() > h  # boxes use the long (x) axis, not a square resize
    for inst in pred.instances:
        assert inst.mask is not None and inst.mask.size == (h, w)
        decoded = mask_util.decode({"size": list(inst.mask.size), "counts": inst.mask.counts})
        assert decoded.shape == (h, w)
        assert 0 <= inst.category_id < len(CLASSES)


def test_predict_batch_mixed_sizes(model: DetectronModel) -> None:
    sizes = [(48, 80), (64, 64), (90, 50)]
    preds = model.predict_batch([_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)])
    assert [p.image_size for p in preds] == sizes
    for (h, w), pred in zip(sizes, preds, strict=True):
        assert pred.instances
        assert all(i.mask is not None and i.mask.size == (h, w) for i in pred.instances)
        assert all(i.box[2] <= w and i.box[3] <= h for i in pred.instances)


def test_matches_default_predictor(tiny: tuple[CfgNode, Path, Path], model: DetectronModel) -> None:
    cfg, _, weights = tiny
    cfg = cfg.clone()
    cfg.MODEL.WEIGHTS = str(weights)
    predictor = DefaultPredictor(cfg)
    image = _image(48, 80)
    with torch.inference_mode():
        expected = predictor(np.ascontiguousarray(image[:, :, ::-1]))["instances"]  # it takes BGR
    (pred,) = model.predict_batch([image])
    order = torch.argsort(expected.scores, descending=True, stable=True)
    assert len(pred.instances) == len(expected) > 0
    np.testing.assert_allclose([i.score for i in pred.instances], expected.scores[order].numpy(), atol=1e-4)
    np.testing.assert_allclose(
        [i.box for i in pred.instances], expected.pred_boxes.tensor[order].numpy(), atol=1e-4
    )
    assert [i.category_id for i in pred.instances] == expected.pred_classes[order].tolist()
    masks = np.stack(
        [mask_util.decode({"size": [48, 80], "counts": i.mask.counts}) for i in pred.instances if i.mask]
    )
    np.testing.assert_array_equal(masks.astype(bool), expected.pred_masks[order].numpy())


def test_options_threshold_and_max_detections(
    tiny: tuple[CfgNode, Path, Path], model: DetectronModel
) -> None:
    _, config, weights = tiny
    (reference,) = model.predict_batch([_image(64, 64)])
    threshold = float(np.median([i.score for i in reference.instances]))
    m = DetectronModel(_spec(config, weights, score_threshold=threshold, max_detections=5))
    m.load()
    (pred,) = m.predict_batch([_image(64, 64)])
    assert 0 < len(pred.instances) <= 5
    assert all(i.score > threshold for i in pred.instances)


def test_min_size_option_changes_network_input(tiny: tuple[CfgNode, Path, Path]) -> None:
    _, config, weights = tiny
    m = DetectronModel(_spec(config, weights, min_size_test=96, max_size_test=200))
    m.load()
    assert tuple(m.preprocess(_image(48, 80)).image.shape) == (3, 96, 160)


def test_class_names_option_overrides_and_is_checked(tiny: tuple[CfgNode, Path, Path]) -> None:
    _, config, weights = tiny
    m = DetectronModel(_spec(config, weights, class_names=["a", "b", "c"]))
    m.load()
    assert m.class_names == ("a", "b", "c")
    bad = DetectronModel(_spec(config, weights, class_names=["a"]))
    with pytest.raises(ValueError, match="1 class names for a model of 3 classes"):
        bad.load()


def test_box_only_model_has_no_masks(tiny: tuple[CfgNode, Path, Path], tmp_path: Path) -> None:
    cfg, _, weights = tiny
    cfg = cfg.clone()
    cfg.MODEL.MASK_ON = False
    config = tmp_path / "faster_rcnn.yaml"
    config.write_text(cfg.dump(), encoding="utf-8")
    m = DetectronModel(_spec(config, weights))
    m.load()
    (pred,) = m.predict_batch([_image(48, 80)])
    assert pred.instances and all(i.mask is None for i in pred.instances)


def test_bad_inputs_raise_clear_errors(tiny: tuple[CfgNode, Path, Path], model: DetectronModel) -> None:
    _, config, _ = tiny
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        model.preprocess(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        DetectronModel(_spec(config, "", colour=1))
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        DetectronModel(_spec(config, config.parent / "missing.pth")).load()
    with pytest.raises(ValueError, match="neither a file nor a detectron2 model-zoo config"):
        DetectronModel(_spec(Path("no/such/config.yaml"), "")).load()
    with pytest.raises(RuntimeError, match="not loaded"):
        DetectronModel(_spec(config, "")).preprocess(_image(8, 8))


def test_bf16_runs_the_forward_in_bf16_close_to_fp32(tiny: tuple[CfgNode, Path, Path]) -> None:
    _, config, weights = tiny
    fp32 = DetectronModel(_spec(config, weights))
    bf16 = DetectronModel(_spec(config, weights, precision="bf16"))
    fp32.load()
    bf16.load()
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert bf16.describe()["precision"] == "bf16"
    dtypes: list[torch.dtype] = []
    assert bf16._model is not None
    hook = bf16._model.backbone.register_forward_hook(
        lambda m, i, o: dtypes.extend(v.dtype for v in o.values())
    )
    images = [_image(64, 96, seed=s) for s in range(3)]
    try:
        low = bf16.predict_batch(images)
    finally:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    for reference, pred in zip(fp32.predict_batch(images), low, strict=True):
        top = list(reference.instances[:20])
        ious, diffs = match_detections(top, list(pred.instances))
        assert np.median(ious) >= 0.9 and (ious >= 0.5).mean() >= 0.8, ious
        assert np.median(diffs) <= 0.02, diffs


def test_bf16_weights_are_stored_bf16_and_answer_as_autocast_casting_them(
    tiny: tuple[CfgNode, Path, Path],
) -> None:
    _, config, weights = tiny
    bf16 = DetectronModel(_spec(config, weights, precision="bf16"))
    bf16.load()
    assert bf16._model is not None
    heads = bf16._model.roi_heads
    assert bf16._model.backbone.bottom_up.stem.conv1.weight.dtype == torch.bfloat16
    predictor = (
        heads.box_predictor[-1]
        if isinstance(heads.box_predictor, torch.nn.ModuleList)
        else heads.box_predictor
    )
    assert predictor.cls_score.weight.dtype == torch.float32  # output layers stay fp32
    images = [_image(64, 96, seed=s) for s in range(3)]
    stored = bf16.predict_batch(images)
    # The same model with fp32 weights, which autocast casts at every call: identical bits.
    for param in bf16._model.parameters():
        param.data = param.data.float()
    cast = bf16.predict_batch(images)
    for a, b in zip(stored, cast, strict=True):
        assert [(i.box, i.score, i.category_id) for i in a.instances] == [
            (i.box, i.score, i.category_id) for i in b.instances
        ]
        assert [i.mask.counts for i in a.instances] == [i.mask.counts for i in b.instances]


def test_requests_without_masks_skip_the_mask_head(model: DetectronModel) -> None:
    assert model._model is not None
    calls: list[int] = []
    hook = model._model.roi_heads.mask_head.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    images = [_image(48, 80), _image(64, 64, seed=1)]
    try:
        full = model.predict_batch(images)
        assert calls and sum(calls) > 0
        calls.clear()
        bare = model.predict_batch(images, masks=False)
        assert calls == []  # the mask head never ran
        # One batch of a request with masks and one without: only the first gets masks.
        mixed = [
            model.postprocess(r, (int(i.shape[0]), int(i.shape[1])))
            for r, i in zip(
                model.forward([model.prepare(images[0]), model.prepare(images[1], masks=False)]),
                images,
                strict=True,
            )
        ]
    finally:
        hook.remove()
    assert sum(calls) == len(full[0].instances) > 0
    for with_masks, without in zip(full, bare, strict=True):
        assert [(i.box, i.score, i.category_id) for i in with_masks.instances] == [
            (i.box, i.score, i.category_id) for i in without.instances
        ]
        assert all(i.mask is not None for i in with_masks.instances)
        assert all(i.mask is None for i in without.instances)
    assert mixed[0].instances == full[0].instances  # Prediction compares by identity
    assert mixed[1].instances == bare[1].instances
