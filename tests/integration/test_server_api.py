"""The cvserve.v1 API against a real server on an ephemeral port: results and every status code."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve.client.client import Client, ClientError
from cvserve.config import ServerConfig
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread

ROOT = Path(__file__).resolve().parents[2]
FAKE = "tests.fixtures.fake_models:build_fake"
MODELS = [
    {"name": "det", "task": "instance", "max_batch_size": 4, "max_wait_ms": 200, "version": "2"},
    {"name": "seg", "task": "semantic"},
    {"name": "slow", "task": "instance", "max_queue": 1, "options": {"delay_ms": 400}},
    {"name": "flaky", "task": "instance", "options": {"fail_forward_on_red": True}},
    {"name": "broken", "task": "instance", "options": {"load_error": "checkpoint is corrupt"}},
]


def write_repository(directory: Path, models: list[dict]) -> Path:
    """A repository YAML of fake models (weight-free, deterministic)."""
    path = directory / "models.yaml"
    entries = [{"config": "fake", "handler": FAKE, **m} for m in models]
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


def scene(height: int = 48, width: int = 64) -> np.ndarray:
    """Red left part, blue right part: the fake detector finds one red and one blue instance."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, : width // 2 + 4, 0] = 240
    img[height // 4 :, width // 2 :, 2] = 250
    return img


def encode(img: np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    specs = load_repository(write_repository(tmp_path_factory.mktemp("repo"), MODELS))
    config = ServerConfig(port=0, metrics_port=None, max_image_pixels=100_000, worker_threads=2)
    with ServerThread(config, specs).start(wait_loaded=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.address, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.VisionServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.VisionServiceStub(channel)


def test_detect_raw_and_encoded_images_agree(client: Client) -> None:
    img = scene()
    raw = client.detect(img, model="det")
    for fmt in ("PNG", "BMP", "TIFF", "WEBP"):
        kwargs = {"lossless": True} if fmt == "WEBP" else {}
        encoded = client.detect(encode(img, fmt, **kwargs), model="det")
        assert [i.box for i in encoded.instances] == [i.box for i in raw.instances], fmt
    assert raw.image_size == (48, 64)
    assert [i.category_id for i in raw.instances] == [0, 2]
    assert raw.instances[0].mask is not None and raw.instances[0].mask.size == (48, 64)


def test_exif_orientation_is_applied(client: Client) -> None:
    img = scene(40, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95, exif=exif)
    assert client.detect(buf.getvalue(), model="det").image_size == (60, 40)


def test_detect_options_filter_results(client: Client) -> None:
    img = scene()
    assert [i.category_id for i in client.detect(img, model="det", classes=["blue"]).instances] == [2]
    assert len(client.detect(img, model="det", max_detections=1).instances) == 1
    assert client.detect(img, model="det", score_threshold=1.0).instances == ()
    assert all(i.mask is None for i in client.detect(img, model="det", mask_format="none").instances)


@pytest.mark.parametrize("fmt", ["polygon", "png"])
def test_mask_formats_round_trip_to_the_same_mask(client: Client, fmt: str) -> None:
    from pycocotools import mask as mask_util

    img = scene()
    rle = client.detect(img, model="det").instances
    other = client.detect(img, model="det", mask_format=fmt).instances
    for a, b in zip(rle, other, strict=True):
        ma = mask_util.decode({"size": list(a.mask.size), "counts": a.mask.counts})
        mb = mask_util.decode({"size": list(b.mask.size), "counts": b.mask.counts})
        assert (ma != mb).mean() < 0.05  # polygons trace pixel centres


def test_segment_returns_label_map_classes_and_areas(stub: pb_grpc.VisionServiceStub, client: Client) -> None:
    img = scene()
    pred = client.segment(img, model="seg")
    labels = pred.semantic.labels
    assert labels.shape == (48, 64)
    assert pred.semantic.class_names == ("background", "red", "green", "blue")
    assert labels[0, 0] == 1 and labels[-1, -1] == 3
    response = stub.Segment(pb.SegmentRequest(model="seg", image=types_pb.Image(encoded=encode(img))))
    areas = {a.class_id: a.pixels for a in response.areas}
    values, counts = np.unique(labels, return_counts=True)
    assert areas == dict(zip(values.tolist(), counts.tolist(), strict=True))
    assert {a.class_name for a in response.areas} == {"background", "red", "blue"}
    assert response.timing.batch_size == 1 and response.timing.total_ms > 0


def test_predict_dispatches_on_task(client: Client) -> None:
    assert client.predict(scene(), model="det").instances
    assert client.predict(scene(), model="seg").semantic is not None


def test_list_and_get_models(client: Client) -> None:
    models = {m["name"]: m for m in client.list_models()}
    assert set(models) == {m["name"] for m in MODELS}
    assert models["det"]["ready"] and models["det"]["state"] == "ready"
    assert models["det"]["batching"] == {"max_batch_size": 4, "max_wait_ms": 200.0, "max_queue": 64}
    assert models["det"]["input_limits"]["max_image_pixels"] == 100_000
    assert models["broken"]["state"] == "failed" and "checkpoint is corrupt" in models["broken"]["error"]
    seg = client.get_model("seg")
    assert seg["task"] == "semantic" and seg["class_names"] == ["background", "red", "green", "blue"]


def expect_error(code: grpc.StatusCode, fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value
    return info.value.message


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"not an image", "cannot decode image"),
        (b"", "image is empty"),
        (encode(scene())[:60], "cannot decode image"),
        (encode(np.zeros((400, 400, 3), np.uint8)), "more than the limit of 100000"),
        (encode(scene(), "GIF"), "unsupported image format GIF"),
    ],
)
def test_bad_images_are_invalid_argument(client: Client, image: bytes, message: str) -> None:
    assert message in expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.detect, image, model="det")


def test_raw_image_with_wrong_shape_is_invalid_argument(stub: pb_grpc.VisionServiceStub) -> None:
    raw = types_pb.RawImage(data=b"\0" * 10, height=2, width=2, channels=3)
    with pytest.raises(grpc.RpcError) as info:
        stub.Detect(pb.DetectRequest(model="det", image=types_pb.Image(raw=raw)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10 bytes, expected 12" in info.value.details()
    raw4 = types_pb.RawImage(data=b"\0" * 16, height=2, width=2, channels=4)
    with pytest.raises(grpc.RpcError) as info:
        stub.Detect(pb.DetectRequest(model="det", image=types_pb.Image(raw=raw4)))
    assert "3 channels" in info.value.details()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"score_threshold": -0.5}, "score_threshold must be in [0, 1]"),
        ({"classes": ["zebra"]}, "unknown class name 'zebra'"),
    ],
)
def test_bad_options_are_invalid_argument(client: Client, options: dict, message: str) -> None:
    assert message in expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, client.detect, scene(), model="det", **options
    )


def test_unknown_mask_format_and_class_id_are_invalid_argument(stub: pb_grpc.VisionServiceStub) -> None:
    image = types_pb.Image(encoded=encode(scene()))
    for options, message in (
        (pb.DetectOptions(mask_format=42), "unknown mask_format 42"),
        (pb.DetectOptions(class_ids=[7]), "unknown class id 7"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.Detect(pb.DetectRequest(model="det", image=image, options=options))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()


def test_wrong_task_and_missing_image_are_invalid_argument(
    client: Client, stub: pb_grpc.VisionServiceStub
) -> None:
    assert "call Segment" in expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, client.detect, scene(), model="seg"
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Detect(pb.DetectRequest(model="det"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no image" in info.value.details()


def test_unknown_model_and_version_are_not_found(client: Client, stub: pb_grpc.VisionServiceStub) -> None:
    assert "unknown model 'nope'" in expect_error(
        grpc.StatusCode.NOT_FOUND, client.detect, scene(), model="nope"
    )
    assert "unknown model" in expect_error(grpc.StatusCode.NOT_FOUND, client.get_model, "nope")
    request = pb.DetectRequest(model="det", model_version="9", image=types_pb.Image(encoded=encode(scene())))
    with pytest.raises(grpc.RpcError) as info:
        stub.Detect(request)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no version '9'" in info.value.details()
    request.model_version = "2"
    assert stub.Detect(request).model_version == "2"


def test_failed_model_is_unavailable_with_its_error(client: Client) -> None:
    message = expect_error(grpc.StatusCode.UNAVAILABLE, client.detect, scene(), model="broken")
    assert "checkpoint is corrupt" in message


def test_queue_full_is_resource_exhausted(server: ServerThread, client: Client) -> None:
    img = scene()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.detect, img, model="slow")
        time.sleep(0.15)  # the first request is in the forward pass, the queue (1 slot) is free
        rest = [pool.submit(client.detect, img, model="slow") for _ in range(3)]
        outcomes = [f.exception() for f in rest]
    assert first.exception() is None
    codes = sorted(e.code.name if e else "OK" for e in outcomes)
    assert codes == ["OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED"]
    assert "queue full" in next(e.message for e in outcomes if e)


def test_deadline_passing_in_the_queue_skips_the_work(server: ServerThread) -> None:
    model = server.dataplane.model_object("slow")
    img = scene()
    with (
        Client(server.address, timeout=10) as patient,
        Client(server.address, timeout=0.2) as hasty,
        ThreadPoolExecutor(2) as pool,
    ):
        before = len(model.batch_sizes)
        first = pool.submit(patient.detect, img, model="slow")
        time.sleep(0.1)
        late = pool.submit(hasty.detect, img, model="slow")
        assert late.exception().code == grpc.StatusCode.DEADLINE_EXCEEDED
        first.result()
    time.sleep(0.5)  # long enough for a (wrongly) queued item to have run
    assert len(model.batch_sizes) - before == 1


def test_failing_forward_is_internal_without_details(client: Client) -> None:
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    message = expect_error(grpc.StatusCode.INTERNAL, client.detect, red, model="flaky")
    assert message == "internal error"
    assert client.detect(scene(), model="flaky").instances  # the model keeps serving


def test_request_id_is_echoed_or_generated(stub: pb_grpc.VisionServiceStub) -> None:
    _, call = stub.ListModels.with_call(pb.ListModelsRequest(), metadata=(("x-request-id", "abc-123"),))
    assert dict(call.trailing_metadata())["x-request-id"] == "abc-123"
    _, call = stub.ListModels.with_call(pb.ListModelsRequest())
    assert len(dict(call.trailing_metadata())["x-request-id"]) == 32
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModel(pb.GetModelRequest(name="nope"), metadata=(("x-request-id", "r-9"),))
    assert dict(info.value.trailing_metadata())["x-request-id"] == "r-9"


def test_stats_count_successes_and_failures(server: ServerThread, client: Client) -> None:
    before = server.dataplane.stats("det")
    client.detect(scene(), model="det")
    after = server.dataplane.stats("det")
    assert after.success.count == before.success.count + 1
    assert after.inference_count == before.inference_count + 1
    assert after.queue.total_s > before.queue.total_s
