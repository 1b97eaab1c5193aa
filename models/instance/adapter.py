"""Detectron2 detection and instance segmentation models behind :class:`VisionModel`.

The work of ``DefaultPredictor`` is split so a server can place each part where it
belongs: ``preprocess`` (colour order, resize) and ``postprocess`` (rescale to the
original image, mask pasting, RLE encoding) are thread-safe CPU work, ``forward`` is
one batched network call returning raw outputs at the network's resolution. The
result equals ``DefaultPredictor``'s on the same image and weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# isort: split

import numpy as np
import torch
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Instances

from cvserve.models.base import VisionModel
from cvserve.models.device import auto_device, resolve_device
from cvserve.models.instance.config import load_config
from cvserve.models.instance.network import apply_module_options, build_network, class_names, parse_options
from cvserve.models.instance.nhwc_roi_align import log_kernel
from cvserve.models.instance.outputs import instances_to_cpu, instances_to_prediction, rescale_and_encode
from cvserve.models.instance.pooler import pool_levels_at_once
from cvserve.models.instance.pooling_inputs import shared_pooling_inputs
from cvserve.models.instance.proposals import use_first_k_nms
from cvserve.models.instance.roi_align import keep_roi_align_fp32
from cvserve.models.loading import load_weights, log_loaded, ready_for_inference
from cvserve.models.precision import autocast, resolve_precision
from cvserve.models.registry import register_builder
from cvserve.models.repository import ModelSpec
from cvserve.models.resize import DEFAULT_MAX_INPUT_PIXELS, InputResize
from cvserve.models.threads import forward_threads
from cvserve.models.types import Prediction, Task

__all__ = ["DetectronModel", "build_detectron_model"]


@dataclass(frozen=True)
class _Raw:
    instances: Instances  # on the CPU
    at_network_size: bool  # True: boxes and masks still need rescaling and pasting


@dataclass(frozen=True)
class _Input:
    image: torch.Tensor  # (3, h, w) uint8 in the model's colour order, resized
    height: int  # original size
    width: int
    masks: bool = True  # False: the request wants no masks (skip the mask head and pasting)


class DetectronModel(VisionModel):
    """A detectron2 detector or instance segmenter (Mask R-CNN, Faster R-CNN, RetinaNet...).

    Args:
        spec: the repository entry. ``spec.options`` may set ``score_threshold``,
            ``nms_threshold``, ``min_size_test``, ``max_size_test``,
            ``max_detections``, ``max_input_pixels`` (most pixels of a resized image,
            see :mod:`cvserve.models.resize`), ``class_names``, ``fuse_batch_norm`` (default true:
            fold eval-mode batch norms into their convolutions) and ``channels_last``
            (default true on a CPU: channels-last convolution weights); see
            :mod:`cvserve.models.fusion`.

    Raises:
        ValueError: an unknown or invalid option.
    """

    shares_cpu_threads = True  # forward runs under models.threads.forward_threads

    task = Task.INSTANCE

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.class_names = ()
        self.device = auto_device(spec.device)
        self._options = parse_options(spec)
        self._model: torch.nn.Module | None = None
        self._resize: InputResize | None = None
        self._input_format = "BGR"
        self.precision = resolve_precision(spec.precision, self.device)

    def load(self) -> None:
        """Build the network, load the weights and settle class names.

        Raises:
            ValueError: bad config, device or class names.
            FileNotFoundError: the weights file does not exist.
        """
        self.device = resolve_device(self.spec.device)
        net = build_network(load_config(self.spec.config), self.device)
        model = net.model
        apply_module_options(model, self._options)
        meta = load_weights(model, self.name, self.spec.weights)
        self.class_names = class_names(self.name, self._options, meta, net.dataset_names, net.num_classes)
        self.precision = resolve_precision(self.spec.precision, self.device, meta)
        keep_roi_align_fp32(model)  # box coordinates and pooling stay fp32 under autocast
        pool_levels_at_once(model)  # on the CPU, one kernel call per pooler (instance.pooler)
        if self.device == "cpu":
            log_kernel()  # which kernel pools: cvserve's channels-last one or torchvision's
        use_first_k_nms(model)  # the RPN's NMS stops once it has its proposals (instance.proposals)
        ready_for_inference(
            model,
            self.precision,
            fuse_batch_norm=self._options.get("fuse_batch_norm", True),
            channels_last=self._options.get("channels_last", self.device == "cpu"),
        )
        self._model = model
        self._input_format = net.input_format
        self._resize = InputResize(
            int(self._options.get("min_size_test", net.min_size)),
            int(self._options.get("max_size_test", net.max_size)),
            int(self._options.get("max_input_pixels", DEFAULT_MAX_INPUT_PIXELS)),
            self.name,
        )
        self.mark_ready()
        what = f"{type(model).__name__}, {net.num_classes} classes"
        log_loaded(self.name, what, self.device, self.precision, self.spec.precision)

    def preprocess(self, image: np.ndarray) -> _Input:
        """Convert an ``(H, W, 3)`` RGB uint8 image to the network's colour order and test size.

        Raises:
            ValueError: wrong shape or dtype.
            cvserve.models.resize.InputSizeError: the resized image would exceed ``max_input_pixels``.
            RuntimeError: the model is not loaded.
        """
        if self._resize is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
        # Resize first, then reorder channels in the same copy as the transpose: the resize
        # treats channels alike, so this equals DefaultPredictor's flip-then-resize with
        # one copy fewer. uint8, not float32: the model's normalisation ((x - mean) / std)
        # promotes to float32 with the same values.
        resized = self._resize(image)
        if self._input_format == "BGR":
            resized = resized[:, :, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return _Input(tensor, int(image.shape[0]), int(image.shape[1]))

    def prepare(self, image: np.ndarray, *, masks: bool = True) -> _Input:
        """:meth:`preprocess`; ``masks=False`` skips the mask head and pasting for this image."""
        item = self.preprocess(image)
        return item if masks else dataclasses.replace(item, masks=False)

    def forward(self, inputs: Sequence[_Input]) -> list[_Raw]:
        """One batched network call; outputs stay at network resolution, on the CPU."""
        if self._model is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        batch = [{"image": x.image, "height": x.height, "width": x.width} for x in inputs]
        model = self._model
        two_stage = isinstance(model, GeneralizedRCNN)
        with (
            torch.inference_mode(),
            autocast(self.device, self.precision),
            forward_threads(self.device),
            shared_pooling_inputs(),  # each feature map converted for RoIAlign once (instance.pooling_inputs)
        ):
            if isinstance(model, GeneralizedRCNN):
                # Mask pasting and encoding are left to postprocess, off the model thread.
                results = _rcnn_inference(model, batch, [x.masks for x in inputs])
            else:  # one-stage detectors (boxes only) rescale inside forward; that part is cheap
                results = [r["instances"] for r in model(batch)]
        # Outside inference mode: the copies are ordinary tensors postprocess may modify.
        return [_Raw(instances_to_cpu(r), two_stage) for r in results]

    def postprocess(self, raw: _Raw, image_size: tuple[int, int]) -> Prediction:
        """Rescale to ``image_size``, paste and RLE-encode masks, sort by score."""
        height, width = image_size
        if raw.at_network_size:
            # What DefaultPredictor's detector_postprocess does (rescale and clip boxes, drop
            # empty ones, paste masks at 0.5), with each mask pasted and encoded in its box.
            return rescale_and_encode(raw.instances, height, width)
        return instances_to_prediction(raw.instances, height, width)


def _rcnn_inference(
    model: GeneralizedRCNN, batch: list[dict[str, Any]], masks: Sequence[bool]
) -> list[Instances]:
    """``model.inference(batch, do_postprocess=False)``, running the mask head only for the
    images whose ``masks`` is True (the others get boxes, scores and classes only)."""
    heads = model.roi_heads
    staged = hasattr(heads, "_forward_box") and hasattr(heads, "forward_with_given_boxes")
    if all(masks) or not staged or model.proposal_generator is None:
        return list(model.inference(batch, do_postprocess=False))
    images = model.preprocess_image(batch)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    boxes = heads._forward_box(features, proposals)
    if not any(masks):
        return list(boxes)
    # Images without masks pass no boxes to the mask head: their batch slot stays in place.
    given = [b if m else b[:0] for b, m in zip(boxes, masks, strict=True)]
    with_masks = heads.forward_with_given_boxes(features, given)
    return [w if m else b for w, b, m in zip(with_masks, boxes, masks, strict=True)]


@register_builder(Task.INSTANCE)
def build_detectron_model(spec: ModelSpec) -> DetectronModel:
    """The built-in builder for ``task: instance``."""
    return DetectronModel(spec)
