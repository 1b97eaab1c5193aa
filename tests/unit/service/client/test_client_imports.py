"""``from cvserve.client import Client`` loads grpc, protobuf and numpy only; OpenCV only for polygons."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve.client import codec
from cvserve.imaging import encode_label_map, encode_png

HEAVY = ("torch", "torchvision", "detectron2", "cv2", "PIL", "pycocotools", "matplotlib", "ray")


def loaded_after(code: str) -> list[str]:
    """Top-level names of the heavy packages in ``sys.modules`` after running ``code`` fresh."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return sorted(set(json.loads(out.splitlines()[-1])) & set(HEAVY))


def test_importing_the_client_loads_no_heavy_package() -> None:
    code = "from cvserve.client import AsyncClient, Client, ClientError, Prediction"
    assert loaded_after(code) == []


def test_reading_rle_png_and_label_map_responses_loads_no_heavy_package() -> None:
    detect = pb.DetectResponse(image_height=3, image_width=4)
    detect.detections.add(png=encode_png(np.eye(3, 4, dtype=bool)))
    detect.detections.add(rle=types_pb.RleMask(height=3, width=4, counts=b"<"))  # 12 background pixels
    segment = pb.SegmentResponse(image_height=2, image_width=2, label_map_png=encode_label_map(np.eye(2)))
    code = (
        "from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb\n"
        "from cvserve.client import codec\n"
        f"p = codec.prediction_from_detect(pb.DetectResponse.FromString({detect.SerializeToString()!r}))\n"
        f"s = codec.prediction_from_segment(pb.SegmentResponse.FromString({segment.SerializeToString()!r}))\n"
        "assert len(p.instances) == 2 and s.semantic.labels.tolist() == [[1, 0], [0, 1]]"
    )
    assert loaded_after(code) == []


def polygon_response() -> pb.DetectResponse:
    response = pb.DetectResponse(image_height=6, image_width=8)
    square = types_pb.Polygon(points=[1, 1, 4, 1, 4, 4, 1, 4])
    response.detections.add(polygons=types_pb.Polygons(polygons=[square]))
    return response


def test_polygons_are_filled_with_opencv() -> None:
    (instance,) = codec.prediction_from_detect(polygon_response()).instances
    expected = np.zeros((6, 8), bool)
    expected[1:5, 1:5] = True
    assert instance.mask is not None and instance.mask.size == (6, 8)
    from pycocotools import mask as mask_util

    decoded = mask_util.decode({"size": [6, 8], "counts": instance.mask.counts})
    np.testing.assert_array_equal(decoded.astype(bool), expected)


def test_polygons_without_opencv_name_the_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    with pytest.raises(ImportError, match=r"pip install 'cvserve-client\[polygons\]'"):
        codec.prediction_from_detect(polygon_response())
