"""What :class:`~cvserve.models.instance.adapter.DetectronModel` builds before it serves.

A repository entry's options, checked; the network, from a yacs config (detectron2's
``build_model``) or a LazyConfig (``instantiate``); the options that live on its modules;
and its class names, from the options, the checkpoint or the config's datasets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# isort: split

import torch
from detectron2.config import CfgNode, instantiate
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from cvserve.models.repository import ModelSpec

__all__ = ["Network", "apply_module_options", "build_network", "class_names", "parse_options"]

OPTION_TYPES = {
    "score_threshold": float,
    "nms_threshold": float,
    "min_size_test": int,
    "max_size_test": int,
    "max_detections": int,
    "class_names": list,
    "fuse_batch_norm": bool,
    "channels_last": bool,
    "max_input_pixels": int,
}
# Inference settings live on these module attributes in detectron2's box predictors
# (FastRCNNOutputLayers) and one-stage detectors (RetinaNet) alike.
_MODULE_ATTRS = {
    "score_threshold": ("test_score_thresh",),
    "nms_threshold": ("test_nms_thresh",),
    "max_detections": ("test_topk_per_image", "max_detections_per_image"),
}


def parse_options(spec: ModelSpec) -> dict[str, Any]:
    """``spec.options``, each checked against :data:`OPTION_TYPES`.

    Raises:
        ValueError: an unknown option, or a value of the wrong type (naming the model).
    """
    options = dict(spec.options)
    for key, value in options.items():
        kind = OPTION_TYPES.get(key)
        if kind is None:
            raise ValueError(f"model {spec.name!r}: unknown option {key!r}; known: {', '.join(OPTION_TYPES)}")
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"model {spec.name!r}: option {key} must be true or false, got {value!r}")
        elif kind is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"model {spec.name!r}: option class_names must be a list of strings")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"model {spec.name!r}: option {key} must be a number >= 0, got {value!r}")
    return options


@dataclass(frozen=True)
class Network:
    """A built network (random weights) and what its config says about serving it."""

    model: torch.nn.Module
    min_size: int  # test-time resize: short side
    max_size: int  # and long side's limit
    num_classes: int
    input_format: str  # "BGR" or "RGB"
    dataset_names: tuple[str, ...]  # where MetadataCatalog may know the class names


def build_network(cfg: CfgNode | Any, device: str) -> Network:
    """Build the network a yacs ``CfgNode`` or a LazyConfig describes, on ``device``."""
    if isinstance(cfg, CfgNode):
        cfg = cfg.clone()
        cfg.MODEL.DEVICE = device
        cfg.MODEL.WEIGHTS = ""
        arch = cfg.MODEL.META_ARCHITECTURE
        num_classes = (
            cfg.MODEL.RETINANET.NUM_CLASSES if arch == "RetinaNet" else cfg.MODEL.ROI_HEADS.NUM_CLASSES
        )
        return Network(
            build_model(cfg),
            int(cfg.INPUT.MIN_SIZE_TEST),
            int(cfg.INPUT.MAX_SIZE_TEST),
            int(num_classes),
            cfg.INPUT.FORMAT,
            (*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN),
        )
    model = instantiate(cfg.model).to(device)
    min_size, max_size = 800, 1333
    with contextlib.suppress(AttributeError, IndexError, KeyError, TypeError):
        resize = cfg.dataloader.test.mapper.augmentations[0]
        min_size, max_size = int(resize.short_edge_length), int(resize.max_size)
    classes: Any = getattr(getattr(model, "roi_heads", None), "num_classes", None) or getattr(
        model, "num_classes", 0
    )
    return Network(model, min_size, max_size, int(classes), getattr(model, "input_format", "BGR"), ())


def apply_module_options(model: torch.nn.Module, options: Mapping[str, Any]) -> None:
    """Set the score threshold, NMS threshold and detection limit on the modules that hold them."""
    for option, attrs in _MODULE_ATTRS.items():
        if option not in options:
            continue
        for module in model.modules():
            for attr in attrs:
                if hasattr(module, attr):
                    setattr(module, attr, type(getattr(module, attr))(options[option]))


def class_names(
    name: str,
    options: Mapping[str, Any],
    meta: Mapping[str, Any],
    dataset_names: Sequence[str],
    num_classes: int,
) -> tuple[str, ...]:
    """The first of: the ``class_names`` option, the checkpoint's, the datasets' ``thing_classes``;
    else ``class_0``, ``class_1``...

    Raises:
        ValueError: the names found do not number the model's classes.
    """
    names: Sequence[str] = options.get("class_names") or meta.get("class_names") or []
    if not names:
        for dataset in dataset_names:
            names = MetadataCatalog.get(dataset).get("thing_classes", None) or []
            if names:
                break
    if not names:
        return tuple(f"class_{i}" for i in range(num_classes))
    if num_classes and len(names) != num_classes:
        raise ValueError(f"model {name!r}: {len(names)} class names for a model of {num_classes} classes")
    return tuple(str(n) for n in names)
