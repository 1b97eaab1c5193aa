"""Bad and unusual input over gRPC: every bad request is INVALID_ARGUMENT with a reason, and
the server keeps serving; unusual but valid images are converted and served.

Decompression bombs are checked on a ``cvserve serve`` subprocess: its peak resident
memory (``VmHWM``) must stay flat while it refuses images whose headers claim billions
of pixels.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve._proto.cvserve.v1 import vision_service_pb2_grpc as pb_grpc
from cvserve.config import ServerConfig
from cvserve.models.repository import load_repository
from cvserve.server.build import ServerThread
from tests.integration.test_reliability_faults import serve_cli, wait_ready
from tests.integration.test_server_ops import ROOT, write_repository

MAX_PIXELS = 1_000_000
MODELS = [{"name": "det", "task": "instance"}, {"name": "seg", "task": "semantic"}]


def encode(img: np.ndarray | Image.Image, fmt: str, **kw: object) -> bytes:
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking RGB PNG header claiming ``width x height`` over a few hundred bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 65_536, 9)  # a few rows: the header is what matters
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small baseline JPEG with its frame header (SOF0) rewritten to claim ``width x height``."""
    data = bytearray(encode(noise(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def corrupt_png_header() -> bytes:
    data = bytearray(encode(noise(), "PNG"))
    data[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    return bytes(data)


def float_tiff() -> bytes:
    return encode(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    specs = load_repository(write_repository(tmp_path_factory.mktemp("repo"), MODELS))
    config = ServerConfig(port=0, metrics_port=None, max_image_pixels=MAX_PIXELS, worker_threads=2)
    with ServerThread(config, specs).start(wait_loaded=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.VisionServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.VisionServiceStub(channel)


def detect(stub: pb_grpc.VisionServiceStub, image: types_pb.Image, **options: object) -> pb.DetectResponse:
    request = pb.DetectRequest(model="det", image=image, options=pb.DetectOptions(**options))
    return stub.Detect(request, timeout=10)


def assert_invalid(
    stub: pb_grpc.VisionServiceStub, image: types_pb.Image, message: str, **options: object
) -> None:
    """The request fails INVALID_ARGUMENT naming ``message``, and the next good request succeeds."""
    with pytest.raises(grpc.RpcError) as info:
        detect(stub, image, **options)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert message in info.value.details()
    assert detect(stub, types_pb.Image(encoded=encode(noise(8, 8), "PNG"))).image_height == 8


class TestBadImages:
    @pytest.mark.parametrize(
        ("data", "message"),
        [
            (b"", "image is empty"),
            (encode(noise(), "JPEG")[:700], "cannot decode image"),
            (encode(noise(), "PNG")[:3000], "cannot decode image"),
            (corrupt_png_header(), "cannot decode image"),
            (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "cannot decode image"),  # JPEG magic, no JPEG
            (b"%PDF-1.7\n" + b"0" * 500, "cannot decode image"),
            (b"PK\x03\x04" + b"\0" * 200, "cannot decode image"),
            (b"just some text" * 20, "cannot decode image"),
            (np.random.default_rng(2).bytes(4096), "cannot decode image"),
            (encode(noise(), "GIF"), "unsupported image format GIF"),
            (float_tiff(), "unsupported pixel type: 32-bit floating-point"),
            (encode(noise(1001, 1000), "PNG"), "1000x1001 = 1001000 pixels, more than the limit of 1000000"),
            (png_claiming(50_000, 50_000), "more than the limit"),
            (jpeg_claiming(60_000, 60_000), "more than the limit"),
        ],
        ids=[
            "empty", "truncated-jpeg", "truncated-png", "corrupt-png", "corrupt-jpeg", "pdf", "zip", "text",
            "random", "gif", "float-tiff", "over-limit", "png-bomb", "jpeg-bomb",
        ],
    )  # fmt: skip
    def test_bad_encoded_image(self, stub: pb_grpc.VisionServiceStub, data: bytes, message: str) -> None:
        assert_invalid(stub, types_pb.Image(encoded=data), message)

    @pytest.mark.parametrize(
        ("height", "width", "channels", "size", "message"),
        [
            (0, 4, 3, 0, "height and width > 0"),
            (4, 4, 3, 47, "47 bytes, expected 48"),
            (4, 4, 4, 64, "must have 3 channels"),
            (4, 4, 1, 16, "must have 3 channels"),
            (100_000, 100_000, 3, 12, "more than the limit of 1000000"),  # refused before any allocation
        ],
    )
    def test_bad_raw_array(
        self, stub: pb_grpc.VisionServiceStub, height: int, width: int, channels: int, size: int, message: str
    ) -> None:
        raw = types_pb.RawImage(data=b"\x80" * size, height=height, width=width, channels=channels)
        assert_invalid(stub, types_pb.Image(raw=raw), message)

    def test_no_image_at_all(self, stub: pb_grpc.VisionServiceStub) -> None:
        assert_invalid(stub, types_pb.Image(), "request has no image")


class TestBadOptions:
    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"score_threshold": float("nan")}, "score_threshold must be in [0, 1]"),
            ({"score_threshold": 1.5}, "score_threshold must be in [0, 1]"),
            ({"score_threshold": -0.1}, "score_threshold must be in [0, 1]"),
            ({"mask_format": 99}, "unknown mask_format 99"),
            ({"class_ids": [3]}, "unknown class id 3"),
            ({"class_names": ["zebra"]}, "unknown class name 'zebra'"),
        ],
    )
    def test_bad_option(self, stub: pb_grpc.VisionServiceStub, options: dict, message: str) -> None:
        assert_invalid(stub, types_pb.Image(encoded=encode(noise(8, 8), "PNG")), message, **options)

    def test_missing_model_name(self, stub: pb_grpc.VisionServiceStub) -> None:
        with pytest.raises(grpc.RpcError) as info:
            stub.Detect(
                pb.DetectRequest(image=types_pb.Image(encoded=encode(noise(8, 8), "PNG"))), timeout=10
            )
        assert (
            info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            and "model is required" in info.value.details()
        )


def segment_labels(stub: pb_grpc.VisionServiceStub, data: bytes) -> np.ndarray:
    response = stub.Segment(pb.SegmentRequest(model="seg", image=types_pb.Image(encoded=data)), timeout=10)
    return np.asarray(Image.open(io.BytesIO(response.label_map_png)))


def expected_labels(rgb: np.ndarray) -> np.ndarray:
    """What the fake segmenter answers: brightest channel + 1, 0 where the pixel is black."""
    labels = np.argmax(rgb, axis=2) + 1
    labels[rgb.max(axis=2) == 0] = 0
    return labels


def halves(height: int, width: int, left: object, right: object, dtype: type) -> np.ndarray:
    shape = (height, width) if np.ndim(left) == 0 else (height, width, len(left))  # type: ignore[arg-type]
    img = np.empty(shape, dtype)
    img[:, : width // 2], img[:, width // 2 :] = left, right
    return img


class TestUnusualImages:
    def test_16_bit_png_is_scaled_not_clipped(self, stub: pb_grpc.VisionServiceStub) -> None:
        # 200 of 65535 is black at 8 bits; clipping at 255 would have made it white.
        img = halves(16, 32, 200, 60_000, np.uint16)
        assert Image.open(io.BytesIO(encode(img, "PNG"))).mode.startswith("I;16")
        labels = segment_labels(stub, encode(img, "PNG"))
        np.testing.assert_array_equal(labels, halves(16, 32, 0, 1, np.uint8))

    @pytest.mark.parametrize(
        ("image", "rgb"),
        [
            (Image.fromarray(halves(16, 32, 0, 90, np.uint8)), halves(16, 32, (0, 0, 0), (90, 90, 90), np.uint8)),
            (
                Image.fromarray(halves(16, 32, (0, 0, 0, 255), (0, 0, 200, 0), np.uint8)),
                halves(16, 32, (0, 0, 0), (0, 0, 200), np.uint8),
            ),  # alpha is dropped, colour kept
            (
                Image.fromarray(halves(16, 32, (0, 255), (90, 128), np.uint8), "LA"),
                halves(16, 32, (0, 0, 0), (90, 90, 90), np.uint8),
            ),
            (Image.fromarray(halves(16, 32, False, True, bool)), halves(16, 32, (0, 0, 0), (255, 255, 255), np.uint8)),
        ],
        ids=["grayscale", "rgba", "gray-alpha", "1-bit"],
    )  # fmt: skip
    def test_other_pixel_modes_become_rgb(
        self, stub: pb_grpc.VisionServiceStub, image: Image.Image, rgb: np.ndarray
    ) -> None:
        np.testing.assert_array_equal(segment_labels(stub, encode(image, "PNG")), expected_labels(rgb))

    def test_palette_png(self, stub: pb_grpc.VisionServiceStub) -> None:
        image = Image.fromarray(halves(16, 32, 0, 1, np.uint8), "P")
        image.putpalette([0, 0, 0, 0, 210, 0] + [0] * 762)
        labels = segment_labels(stub, encode(image, "PNG"))
        np.testing.assert_array_equal(labels, halves(16, 32, 0, 2, np.uint8))  # green

    def test_cmyk_jpeg(self, stub: pb_grpc.VisionServiceStub) -> None:
        image = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # red in print colours
        labels = segment_labels(stub, encode(image, "JPEG", quality=95))
        assert (labels == 1).mean() > 0.95

    @pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 5000), (5000, 1)])
    def test_tiny_and_elongated_images(
        self, stub: pb_grpc.VisionServiceStub, height: int, width: int
    ) -> None:
        img = np.zeros((height, width, 3), np.uint8)
        img[..., 0] = 230
        response = detect(stub, types_pb.Image(encoded=encode(img, "PNG")))
        assert (response.image_height, response.image_width) == (height, width)
        (det,) = response.detections
        assert det.class_name == "red"
        assert (det.box.x0, det.box.y0, det.box.x1, det.box.y1) == (0, 0, width, height)


class TestDecompressionBombs:
    def test_bombs_are_refused_from_the_header_and_memory_stays_flat(self, tmp_path: Path) -> None:
        """50000 x 50000 RGB would be 7.5 GB decoded; the server's peak memory must not move."""
        from cvserve.client.client import Client, ClientError

        repository = write_repository(tmp_path, [{"name": "det", "task": "instance"}])
        bombs = [png_claiming(50_000, 50_000), jpeg_claiming(60_000, 60_000), png_claiming(2**31 - 1, 1)]
        assert max(len(b) for b in bombs) < 16_384
        with serve_cli(tmp_path, repository) as server:
            wait_ready(server.address, "det")
            with Client(server.address, timeout=30) as client:
                for _ in range(3):
                    client.detect(noise(), model="det")
                peak_before = server.status_kib("VmHWM")
                for _ in range(10):
                    for bomb in bombs:
                        with pytest.raises(ClientError) as info:
                            client.detect(bomb, model="det")
                        assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
                        assert "more than the limit" in info.value.message
                peak_after = server.status_kib("VmHWM")
                assert client.detect(noise(), model="det").image_size == (64, 64)
        growth_mib = (peak_after - peak_before) / 1024
        print(f"server peak RSS {peak_before} KiB before 30 bombs, {peak_after} KiB after")
        assert growth_mib < 32, f"peak RSS grew {growth_mib:.1f} MiB ({peak_before} -> {peak_after} KiB)"
