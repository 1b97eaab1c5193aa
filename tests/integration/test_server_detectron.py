"""A real (tiny, random-weight) detectron2 Mask R-CNN served end to end over gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cvserve.client.client import Client
from cvserve.config import ServerConfig
from cvserve.kserve.servicer import add_kserve_servicer
from cvserve.models.checkpoint import save_checkpoint
from cvserve.models.instance.config import tiny_instance_config
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread

CLASSES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository file with one tiny random-weight Mask R-CNN, ``tiny``, testing at 64 px."""
    from detectron2.modeling import build_model

    root = tmp_path_factory.mktemp("tiny_repo")
    cfg = tiny_instance_config(len(CLASSES), input_size=64)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights score low; keep everything
    torch.manual_seed(0)
    save_checkpoint(build_model(cfg), root / "model.pth", extra={"class_names": list(CLASSES)})
    (root / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    entry = {
        "name": "tiny",
        "task": "instance",
        "config": "config.yaml",
        "weights": "model.pth",
        "device": "cpu",
        "max_batch_size": 2,
        "max_wait_ms": 100,
    }
    (root / "models.yaml").write_text(yaml.safe_dump({"models": [entry]}))
    return root / "models.yaml"


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    config = ServerConfig(port=0, metrics_port=None, worker_threads=2)
    specs = load_repository(tiny_repo)
    with ServerThread(config, specs, servicers=[add_kserve_servicer]).start(wait_loaded=True) as srv:
        yield srv


def scene(seed: int, height: int = 64, width: int = 80) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    img[16:40, 20:50] = (250, 20, 20)
    return img


def test_tiny_mask_rcnn_serves_detections_in_image_coordinates(server: ServerThread) -> None:
    with Client(server.address, timeout=60) as client:
        info = client.get_model("tiny")
        assert info["ready"] and info["class_names"] == list(CLASSES) and info["device"] == "cpu"
        with ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(lambda s: client.detect_response(scene(s), model="tiny"), (1, 2)))
        expected = client.detect(scene(1), model="tiny")
    assert [r.timing.batch_size for r in responses] == [2, 2]  # the two concurrent calls shared a forward
    first = responses[0]
    assert (first.image_height, first.image_width) == (64, 80) and first.detections
    for det in first.detections:
        assert 0 <= det.box.x0 <= det.box.x1 <= 80 and 0 <= det.box.y0 <= det.box.y1 <= 64
        assert (det.rle.height, det.rle.width) == (64, 80)
        assert det.class_name == CLASSES[det.class_id]
    # Batched with another image or alone, the same image gives the same detections (up to
    # float rounding: a padded batch sums in another order).
    assert [i.category_id for i in expected.instances] == [d.class_id for d in first.detections]
    assert [d.score for d in first.detections] == pytest.approx(
        [i.score for i in expected.instances], abs=1e-3
    )


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_answered_in_its_own_pixels(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from PIL import Image

    from cvserve.kserve import servicer as kserve_servicer
    from cvserve.models.types import ScaledImage
    from cvserve.vision import codec

    decoded: list[object] = []
    real = codec.decode_scaled

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        decoded.append(out)
        return out

    monkeypatch.setattr(codec, "decode_scaled", spy)
    monkeypatch.setattr(kserve_servicer, "decode_scaled", spy)
    buf = io.BytesIO()
    Image.fromarray(scene(3, 480, 640)).save(buf, format="JPEG", quality=90)
    with Client(server.address, timeout=60) as client:
        response = client.detect_response(buf.getvalue(), model="tiny")
    # The tiny model tests at 64 px: 480x640 -> 64x85, so libjpeg decodes at 1/4 (120x160).
    assert [type(d) for d in decoded] == [ScaledImage]
    assert decoded[0].pixels.shape == (120, 160, 3) and decoded[0].size == (480, 640)
    assert (response.image_height, response.image_width) == (480, 640) and response.detections
    for det in response.detections:
        assert 0 <= det.box.x0 <= det.box.x1 <= 640 and 0 <= det.box.y0 <= det.box.y1 <= 480
        assert (det.rle.height, det.rle.width) == (480, 640)
    # The Open Inference Protocol decodes the same way and answers the same.
    tc = pytest.importorskip("tritonclient.grpc")
    data = np.array([buf.getvalue()], dtype=object)
    tensor = tc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(data)
    triton = tc.InferenceServerClient(server.address)
    try:
        result = triton.infer("tiny", [tensor])
    finally:
        triton.close()
    assert [type(d) for d in decoded] == [ScaledImage, ScaledImage]
    assert result.as_numpy("image_size").tolist() == [480, 640]
    boxes = [[d.box.x0, d.box.y0, d.box.x1, d.box.y1] for d in response.detections]
    np.testing.assert_allclose(result.as_numpy("boxes"), boxes, rtol=1e-5, atol=1e-3)


def test_the_local_annotate_engine_decodes_a_large_jpeg_as_the_server_and_answers_the_same(
    server: ServerThread, tiny_repo: Path, tmp_path: Path
) -> None:
    import io

    from PIL import Image

    from cvserve.annotation.predictors import LocalPredictor
    from cvserve.annotation.worker import RenderOptions, WorkItem, process_batch

    buf = io.BytesIO()
    Image.fromarray(scene(4, 480, 640)).save(buf, format="JPEG", quality=90)
    path = tmp_path / "photo.jpg"
    path.write_bytes(buf.getvalue())
    render = RenderOptions(CLASSES, overlays_dir=str(tmp_path / "overlays"))
    with LocalPredictor.from_repository(str(tiny_repo), "tiny", concurrency=1) as local:
        assert local.decode_hint is not None and local.decode_hint(480, 640) == (64, 85)
        (record,) = process_batch(
            [WorkItem(str(path), "photo.jpg")], local.predict, render, local.decode_hint
        )
    with Client(server.address, timeout=60) as client:
        served = client.detect(buf.getvalue(), model="tiny")
    assert (record["height"], record["width"]) == (480, 640)
    # The same pixels (decoded at 1/4 both ways) through the same model: the same detections.
    assert [e["label"] for e in record["instances"]] == [i.category_id for i in served.instances]
    for entry, inst in zip(record["instances"], served.instances, strict=True):
        x0, y0, x1, y1 = inst.box
        np.testing.assert_allclose(entry["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=1e-3)
        assert entry["score"] == pytest.approx(inst.score, abs=1e-5)
    with Image.open(tmp_path / "overlays" / "photo.jpg") as overlay:
        assert overlay.size == (640, 480)  # drawn on the image decoded again in full
