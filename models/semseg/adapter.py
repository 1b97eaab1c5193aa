"""Serving adapter for semantic segmentation models (``Task.SEMANTIC``).

Serves :class:`~cvserve.models.semseg.arch.EncoderDecoderSegmentor` and any other detectron2
meta-architecture that returns ``[{"sem_seg": logits}]`` (e.g. detectron2's semantic FPN).

``spec.options`` (all optional):
    class_names: label names, index = label value; overrides the checkpoint's.
    min_size_test, max_size_test: override the config's test-time resize.
    max_input_pixels: most pixels of a resized image (:mod:`cvserve.models.resize`).
    fuse_batch_norm: fold eval-mode batch norms into their convolutions (default true).
    channels_last: channels-last convolution weights (default true on a CPU).
    Both are described in :mod:`cvserve.models.fusion`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

# isort: split

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model as build_d2_model

from cvserve.models.base import VisionModel
from cvserve.models.device import auto_device
from cvserve.models.instance.config import config_file
from cvserve.models.loading import load_weights, log_loaded, ready_for_inference
from cvserve.models.precision import autocast, resolve_precision
from cvserve.models.registry import register_builder
from cvserve.models.repository import ModelSpec
from cvserve.models.resize import DEFAULT_MAX_INPUT_PIXELS, InputResize
from cvserve.models.semseg.config import add_semseg_config
from cvserve.models.threads import forward_threads
from cvserve.models.types import Prediction, SemanticMap, Task

__all__ = ["SemanticSegmentationModel", "labels_from_logits", "load_semseg_config"]

logger = logging.getLogger(__name__)


def load_semseg_config(config: str) -> CfgNode:
    """Load a segmenter config from a YAML file or a detectron2 model-zoo config name.

    Raises:
        FileNotFoundError: ``config`` is neither a file nor a model-zoo name.
        ValueError: the YAML has keys detectron2 and this package do not know.
    """
    cfg = add_semseg_config(get_cfg())
    path = config_file(config)
    if path is None:
        raise FileNotFoundError(f"config {config!r}: neither a YAML file nor a model-zoo config name")
    try:
        cfg.merge_from_file(str(path))
    except KeyError as e:
        raise ValueError(f"{path}: unknown config key {e}") from None
    return cfg


def _bool_option(model: str, options: Mapping[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"model {model!r}: option {key} must be true or false, got {value!r}")
    return value


class SemanticSegmentationModel(VisionModel):
    """A per-pixel classifier: RGB images in, :class:`SemanticMap` predictions out.

    Args:
        spec: the repository entry (config, weights, device, precision, options).
    """

    shares_cpu_threads = True  # forward runs under models.threads.forward_threads

    task = Task.SEMANTIC

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.device = auto_device(spec.device)
        self.class_names: tuple[str, ...] = tuple(spec.options.get("class_names", ()))
        self.cfg: CfgNode | None = None
        self.model: torch.nn.Module | None = None
        self._resize: InputResize | None = None
        self._format = "BGR"
        self.precision = resolve_precision(spec.precision, self.device)

    def load(self) -> None:
        """Build the network from the config and load the weights.

        Raises:
            FileNotFoundError, ValueError: the config or weights are missing or invalid,
                naming the model and file.
        """
        try:
            cfg = load_semseg_config(self.spec.config)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"model {self.name!r}: {e}") from None
        cfg.MODEL.DEVICE = self.device
        opts = self.spec.options
        # Checked before the network is built and loaded.
        fuse = _bool_option(self.name, opts, "fuse_batch_norm", True)
        channels_last = _bool_option(self.name, opts, "channels_last", self.device == "cpu")
        min_size = int(opts.get("min_size_test", cfg.INPUT.MIN_SIZE_TEST))
        max_size = int(opts.get("max_size_test", cfg.INPUT.MAX_SIZE_TEST))
        resize = InputResize(
            min_size, max_size, int(opts.get("max_input_pixels", DEFAULT_MAX_INPUT_PIXELS)), self.name
        )
        cfg.freeze()
        model = build_d2_model(cfg)
        meta = load_weights(model, self.name, self.spec.weights)
        self.precision = resolve_precision(self.spec.precision, self.device, meta)
        ready_for_inference(model, self.precision, fuse_batch_norm=fuse, channels_last=channels_last)
        if not self.class_names:
            self.class_names = self._class_names(cfg, meta)
        self.cfg, self.model = cfg, model
        self._resize = resize
        self._format = cfg.INPUT.FORMAT
        self.mark_ready()
        log_loaded(self.name, type(model).__name__, self.device, self.precision, self.spec.precision)

    def _class_names(self, cfg: CfgNode, meta: dict[str, Any]) -> tuple[str, ...]:
        names = meta.get("class_names")
        if not names and cfg.DATASETS.TEST:
            names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("stuff_classes")
        if not names:
            names = [f"class_{i}" for i in range(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)]
        return tuple(str(n) for n in names)

    def preprocess(self, image: np.ndarray) -> dict[str, Any]:
        """RGB uint8 ``(H, W, 3)`` -> ``{"image": CHW uint8 tensor in INPUT.FORMAT, "height", "width"}``.

        Raises:
            ValueError: wrong shape or dtype.
            cvserve.models.resize.InputSizeError: the resized image would exceed ``max_input_pixels``.
        """
        if self._resize is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
        # As in the detection adapter: resize, then reorder channels in the transpose's copy;
        # uint8, since the network's normalisation promotes to float32 with the same values.
        resized = self._resize(image)
        if self._format == "BGR":
            resized = resized[:, :, ::-1]
        tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        size = (int(image.shape[0]), int(image.shape[1]))
        return {
            "image": tensor,
            "height": int(resized.shape[0]),
            "width": int(resized.shape[1]),
            "size": size,
        }

    def forward(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        """One batched forward.

        On a GPU returns each image's ``(H, W)`` label map, upsampled and argmaxed there (only
        the small integer map crosses to the host); on the CPU its ``(C, h, w)`` float logits
        at the resized size, left to :meth:`postprocess` in the shared pool.
        """
        if self.model is None:
            raise RuntimeError(f"model {self.name!r} is not loaded")
        with torch.inference_mode(), autocast(self.device, self.precision), forward_threads(self.device):
            outputs = self.model(list(inputs))
            if self.device.startswith("cuda"):
                return [
                    labels_from_logits(o["sem_seg"], i["size"]).cpu()
                    for o, i in zip(outputs, inputs, strict=True)
                ]
        return [o["sem_seg"].float().cpu() for o in outputs]

    def postprocess(self, raw: torch.Tensor, image_size: tuple[int, int]) -> Prediction:
        """The label map of ``image_size``: as computed on the GPU, or from the CPU's logits."""
        labels_t = raw if raw.ndim == 2 else labels_from_logits(raw, image_size)
        labels = labels_t.numpy()
        return Prediction(
            image_size=image_size, semantic=SemanticMap(labels=labels, class_names=self.class_names)
        )


def labels_from_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(C, h, w)`` logits -> ``(H, W)`` class labels at ``size``, on the logits' device.

    Upsampled bilinearly in float32 (fp16 logits are widened first), argmax per pixel;
    uint8 when the classes fit, else int32.
    """
    up = F.interpolate(logits.float()[None], size=size, mode="bilinear", align_corners=False)[0]
    return up.argmax(dim=0).to(torch.uint8 if logits.shape[0] <= 256 else torch.int32)


@register_builder(Task.SEMANTIC)
def build_semantic_model(spec: ModelSpec) -> VisionModel:
    """The registry builder for ``task: semantic`` specs."""
    return SemanticSegmentationModel(spec)
