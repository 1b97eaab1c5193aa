"""Proto <-> numpy / models.types conversions and option validation."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_util

from cvserve._proto.cvserve.v1 import types_pb2 as types_pb
from cvserve._proto.cvserve.v1 import vision_service_pb2 as pb
from cvserve.errors import InvalidImageError, InvalidOptionError
from cvserve.models.types import Instance, Mask, Prediction, SemanticMap
from cvserve.vision import codec

CLASSES = ("person", "car", "dog")


def instance(category: int, score: float, box: tuple[int, int, int, int]) -> Instance:
    binary = np.zeros((32, 32), np.uint8)
    x0, y0, x1, y1 = box
    binary[y0:y1, x0:x1] = 1
    rle = mask_util.encode(np.asfortranarray(binary))
    return Instance(
        box=tuple(map(float, box)), category_id=category, score=score, mask=Mask((32, 32), rle["counts"])
    )


PREDICTION = Prediction(
    image_size=(32, 32),
    instances=(
        instance(0, 0.9, (2, 2, 12, 12)),
        instance(1, 0.6, (14, 4, 30, 20)),
        instance(2, 0.3, (4, 20, 10, 30)),
    ),
)


def test_options_default_to_everything_and_rle() -> None:
    opts = codec.parse_detect_options(pb.DetectOptions(), CLASSES)
    assert opts == codec.DetectOptions(mask_format="rle")
    assert codec.apply_options(PREDICTION.instances, opts) == list(PREDICTION.instances)


def test_options_filter_by_score_class_and_count() -> None:
    opts = codec.parse_detect_options(
        pb.DetectOptions(score_threshold=0.5, class_names=["car"], class_ids=[0], max_detections=5), CLASSES
    )
    assert [i.category_id for i in codec.apply_options(PREDICTION.instances, opts)] == [0, 1]
    top1 = codec.parse_detect_options(pb.DetectOptions(max_detections=1), CLASSES)
    assert [i.score for i in codec.apply_options(PREDICTION.instances, top1)] == [0.9]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (pb.DetectOptions(score_threshold=1.5), "score_threshold"),
        (pb.DetectOptions(score_threshold=float("nan")), "score_threshold"),
        (pb.DetectOptions(class_names=["cat"]), "unknown class name 'cat'"),
        (pb.DetectOptions(class_ids=[3]), "unknown class id 3"),
        (pb.DetectOptions(mask_format=9), "unknown mask_format 9"),
    ],
)
def test_bad_options_raise(options: pb.DetectOptions, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=message):
        codec.parse_detect_options(options, CLASSES)


@pytest.mark.parametrize("fmt", ["rle", "polygon", "png", "none"])
def test_detect_response_round_trips(fmt: str) -> None:
    opts = codec.DetectOptions(mask_format=fmt)
    response = codec.detect_response(PREDICTION, model="m", version="1", class_names=CLASSES, options=opts)
    assert [d.class_name for d in response.detections] == ["person", "car", "dog"]
    back = codec.prediction_from_detect(pb.DetectResponse.FromString(response.SerializeToString()))
    assert back.image_size == (32, 32)
    for a, b in zip(PREDICTION.instances, back.instances, strict=True):
        assert a.box == b.box and a.category_id == b.category_id and abs(a.score - b.score) < 1e-6
        if fmt == "none":
            assert b.mask is None
            continue
        ma = mask_util.decode({"size": list(a.mask.size), "counts": a.mask.counts})
        mb = mask_util.decode({"size": list(b.mask.size), "counts": b.mask.counts})
        assert (ma != mb).sum() <= 2 * (
            a.box[2] - a.box[0] + a.box[3] - a.box[1]
        )  # polygons may lose the rim


def test_segment_response_round_trips_label_map_and_areas() -> None:
    labels = np.zeros((6, 8), np.int64)
    labels[:, 4:] = 2
    labels[0, 0] = 300  # needs a 16-bit PNG
    names = tuple(f"c{i}" for i in range(301))
    pred = Prediction(image_size=(6, 8), semantic=SemanticMap(labels=labels, class_names=names))
    response = codec.segment_response(pred, model="s", version="3")
    assert [(a.class_id, a.pixels) for a in response.areas] == [(0, 23), (2, 24), (300, 1)]
    back = codec.prediction_from_segment(response)
    np.testing.assert_array_equal(back.semantic.labels, labels)
    assert back.semantic.class_names == names


def test_image_to_proto_and_back() -> None:
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    proto = codec.image_to_proto(img)
    np.testing.assert_array_equal(codec.decode_request_image(proto, max_pixels=100), img)
    assert codec.image_to_proto(b"abc").encoded == b"abc"
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        codec.image_to_proto(np.zeros((2, 3), np.uint8))
    with pytest.raises(InvalidImageError, match="no image"):
        codec.decode_request_image(types_pb.Image(), max_pixels=100)


def test_mask_format_names() -> None:
    assert codec.mask_format_to_proto("polygon") == types_pb.MASK_FORMAT_POLYGON
    with pytest.raises(ValueError, match="unknown mask format 'jpeg'"):
        codec.mask_format_to_proto("jpeg")
