"""Image inputs and model outputs of the Open Inference Protocol mapping."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from cvserve.errors import ImageTooLargeError, InvalidImageError
from cvserve.kserve.tensors import output_specs, output_tensors, split_images
from cvserve.models.types import Instance, Mask, Prediction, SemanticMap, Task

INSTANCE_OUTPUTS = [s.name for s in output_specs(Task.INSTANCE, 3)]


def _bytes_array(items: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def test_one_encoded_image_is_unbatched() -> None:
    batch = split_images({"image": _bytes_array([b"png"], (1,))}, max_pixels=100, max_images=8)
    assert batch.images == [b"png"] and not batch.batched


def test_encoded_batch_needs_a_batch_dimension() -> None:
    batch = split_images({"image": _bytes_array([b"a", b"b"], (2, 1))}, max_pixels=100, max_images=8)
    assert batch.images == [b"a", b"b"] and batch.batched
    with pytest.raises(InvalidImageError, match=r"shape \[1\] \(one image\) or \[B, 1\]"):
        split_images({"image": _bytes_array([b"a", b"b"], (2,))}, max_pixels=100, max_images=8)


def test_raw_images_single_and_batch() -> None:
    images = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    one = split_images({"image": images[0]}, max_pixels=100, max_images=8)
    assert not one.batched and np.array_equal(one.images[0], images[0])
    two = split_images({"image": images}, max_pixels=100, max_images=8)
    assert two.batched and [img.shape for img in two.images] == [(4, 5, 3), (4, 5, 3)]
    np.testing.assert_array_equal(two.images[1], images[1])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "exactly one input named 'image'"),
        ({"img": np.zeros((2, 2, 3), np.uint8)}, "exactly one input named 'image'"),
        ({"image": np.zeros((2, 2, 3), np.float32)}, "must be BYTES .* or UINT8"),
        ({"image": np.zeros((2, 2, 4), np.uint8)}, r"\[H, W, 3\] or \[B, H, W, 3\]"),
        ({"image": np.zeros((0, 2, 2, 3), np.uint8)}, "no zero dimension"),
        ({"image": np.zeros((2, 3), np.uint8)}, r"\[H, W, 3\]"),
    ],
)
def test_bad_image_inputs_are_invalid_argument(inputs: dict, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message) as info:
        split_images(inputs, max_pixels=100, max_images=8)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_raw_image_over_the_pixel_limit() -> None:
    with pytest.raises(ImageTooLargeError, match="more than the limit of 10"):
        split_images({"image": np.zeros((4, 4, 3), np.uint8)}, max_pixels=10, max_images=8)


def _instance(box: tuple[float, float, float, float], cls: int, score: float, counts: bytes) -> Instance:
    return Instance(box=box, category_id=cls, score=score, mask=Mask(size=(8, 8), counts=counts))


PREDICTIONS = [
    Prediction(
        image_size=(8, 8),
        instances=(_instance((1, 2, 3, 4), 2, 0.9, b"rle-a"), _instance((0, 0, 8, 8), 0, 0.5, b"rle-b")),
    ),
    Prediction(image_size=(8, 6), instances=()),
]


def test_unbatched_instance_outputs() -> None:
    out = dict(
        output_tensors(
            PREDICTIONS[:1], task=Task.INSTANCE, num_classes=3, batched=False, names=INSTANCE_OUTPUTS
        )
    )
    np.testing.assert_array_equal(out["boxes"], np.array([[1, 2, 3, 4], [0, 0, 8, 8]], np.float32))
    assert out["boxes"].dtype == np.float32 and out["scores"].dtype == np.float32
    np.testing.assert_allclose(out["scores"], [0.9, 0.5])
    assert out["classes"].dtype == np.int64 and out["classes"].tolist() == [2, 0]
    assert out["masks"].tolist() == [b"rle-a", b"rle-b"]
    assert out["num_detections"].tolist() == [2] and out["image_size"].tolist() == [8, 8]


def test_batched_instance_outputs_are_padded_with_counts() -> None:
    out = dict(
        output_tensors(PREDICTIONS, task=Task.INSTANCE, num_classes=3, batched=True, names=INSTANCE_OUTPUTS)
    )
    assert out["boxes"].shape == (2, 2, 4) and out["scores"].shape == (2, 2)
    assert out["num_detections"].tolist() == [2, 0]
    assert out["classes"][1].tolist() == [-1, -1]
    assert out["masks"][1].tolist() == [b"", b""]
    assert not out["boxes"][1].any() and not out["scores"][1].any()
    assert out["image_size"].tolist() == [[8, 8], [8, 6]]


def test_only_requested_outputs_in_requested_order_and_masks_optional() -> None:
    out = output_tensors(
        PREDICTIONS[:1],
        task=Task.INSTANCE,
        num_classes=3,
        batched=False,
        names=["masks", "scores"],
        with_masks=False,
    )
    assert [name for name, _ in out] == ["masks", "scores"]
    assert out[0][1].tolist() == [b"", b""]


def test_semantic_label_maps_padded_in_a_batch() -> None:
    small = Prediction((2, 3), semantic=SemanticMap(np.ones((2, 3), np.int64), ("a", "b")))
    large = Prediction((3, 2), semantic=SemanticMap(np.zeros((3, 2), np.int64), ("a", "b")))
    single = dict(output_tensors([small], task=Task.SEMANTIC, num_classes=2, batched=False, names=["labels"]))
    assert single["labels"].dtype == np.uint8 and single["labels"].tolist() == [[1, 1, 1], [1, 1, 1]]
    batch = dict(
        output_tensors(
            [small, large], task=Task.SEMANTIC, num_classes=2, batched=True, names=["labels", "image_size"]
        )
    )
    assert batch["labels"].shape == (2, 3, 3)
    assert batch["labels"][0].tolist() == [[1, 1, 1], [1, 1, 1], [255, 255, 255]]
    assert batch["labels"][1].tolist() == [[0, 0, 255], [0, 0, 255], [0, 0, 255]]
    assert batch["image_size"].tolist() == [[2, 3], [3, 2]]


def test_many_classes_give_int32_labels() -> None:
    labels = np.array([[300, 0]], np.int64)
    pred = Prediction((1, 2), semantic=SemanticMap(labels, tuple(str(i) for i in range(400))))
    ((name, array),) = output_tensors(
        [pred], task=Task.SEMANTIC, num_classes=400, batched=False, names=["labels"]
    )
    assert name == "labels" and array.dtype == np.int32 and array.tolist() == [[300, 0]]
    assert output_specs(Task.SEMANTIC, 400)[0].datatype == "INT32"


def test_batch_larger_than_max_images_is_refused() -> None:
    with pytest.raises(InvalidImageError, match="batch of 3 images is more than the 2 one request may hold"):
        split_images({"image": _bytes_array([b"a"] * 3, (3, 1))}, max_pixels=100, max_images=2)
    with pytest.raises(InvalidImageError, match="batch of 3 images"):
        split_images({"image": np.zeros((3, 2, 2, 3), np.uint8)}, max_pixels=100, max_images=2)
