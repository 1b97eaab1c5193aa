"""Train the segmenter, optionally with its encoder transferred from a detection checkpoint.

The transfer happens before training: a segmenter is built with the same seed the
training run uses, its encoder is loaded from the detection checkpoint (reporting
every key that did not match), and the result is saved as the run's initial weights.
A run from scratch and a transferred run therefore start from the same decoder and
differ only in the encoder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# isort: split

from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng

from cvserve.models.checkpoint import META_KEY, save_checkpoint
from cvserve.models.semseg.class_weights import (
    BALANCED,
    balanced_class_weights,
    check_class_weights,
    label_frequencies,
)
from cvserve.models.semseg.config import FREEZE_CHOICES, add_semseg_config, semseg_config
from cvserve.models.semseg.transfer import TransferReport, load_encoder_from_detection, read_checkpoint
from cvserve.models.training.engine import TrainResult, train
from cvserve.models.training.options import TrainOptions

__all__ = ["SemanticTrainResult", "backbone_config_of", "train_semantic"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SemanticTrainResult:
    """A semantic training run: the engine's result and the encoder transfer, if any."""

    train: TrainResult
    transfer: TransferReport | None
    config: CfgNode


def backbone_config_of(checkpoint: str | Path) -> CfgNode | None:
    """The detectron2 config a checkpoint of ours embeds (``__cvserve__.config``), if any."""
    meta = read_checkpoint(checkpoint).get(META_KEY) or {}
    text = meta.get("config") if isinstance(meta, dict) else None
    if not text:
        return None
    cfg = add_semseg_config(get_cfg())
    cfg.merge_from_other_cfg(CfgNode.load_cfg(text))
    return cfg


def _write_report(report: TransferReport, path: Path) -> None:
    data = asdict(report)
    data["summary"] = report.summary()
    path.write_text(json.dumps(data, indent=2, default=list), encoding="utf-8")


def _class_weights(spec: str | Sequence[float], dataset: str, num_classes: int) -> list[float]:
    if isinstance(spec, str):
        if spec != BALANCED:
            raise ValueError(f"class_weights must be {BALANCED!r} or one number per class, got {spec!r}")
        ignore = int(MetadataCatalog.get(dataset).get("ignore_label", 255))
        freq = label_frequencies(DatasetCatalog.get(dataset), num_classes, ignore)
        weights = balanced_class_weights(freq)
        logger.info(
            "balanced class weights from %s: %s",
            dataset,
            ", ".join(f"{w:.2f} ({100 * f:.1f} %)" for w, f in zip(weights, freq, strict=True)),
        )
        return weights
    try:
        return check_class_weights(spec, num_classes)
    except ValueError as e:
        raise ValueError(f"class_weights needs {num_classes} positive numbers: {e}") from None


def train_semantic(
    *,
    train_dataset: str,
    val_dataset: str | None,
    num_classes: int,
    options: TrainOptions,
    output_dir: str | Path,
    encoder_from: str | Path | None = None,
    backbone_from: CfgNode | str | None = None,
    freeze: str = "none",
    input_size: int = 256,
    class_weights: str | Sequence[float] | None = None,
    encoder: str = "resnet",
    progress: bool = True,
) -> SemanticTrainResult:
    """Train an ``EncoderDecoderSegmentor`` on registered semantic datasets.

    Args:
        train_dataset: registered semantic split to train on (``register_semantic_split``).
        val_dataset: registered split evaluated during training (mIoU), or None.
        num_classes: labels including background.
        options: the shared training options.
        output_dir: the training engine's outputs, plus ``init_transfer.pth`` and
            ``transfer_report.json`` when transferring.
        encoder_from: detection checkpoint (``.pth``/``.pkl``) initialising the encoder;
            None trains from scratch.
        backbone_from: detection config defining the encoder; None = the config embedded
            in ``encoder_from`` when it has one, else the tiny instance config.
        freeze: encoder freeze point, one of :data:`~cvserve.models.semseg.config.FREEZE_CHOICES`.
        input_size: shortest image side.
        class_weights: cross-entropy weight per class, ``"balanced"`` for ENet weights from
            the training labels' class frequencies
            (:mod:`cvserve.models.semseg.class_weights`), or None for uniform.
        encoder: what the decoder reads, one of :data:`~cvserve.models.semseg.config.ENCODER_CHOICES`.
        progress: log progress at INFO.

    Raises:
        ValueError: bad ``freeze``, unusable checkpoint or training option.
        FileNotFoundError: the checkpoint or backbone config is missing.
    """
    if freeze not in FREEZE_CHOICES:
        raise ValueError(f"freeze must be one of {', '.join(FREEZE_CHOICES)}, got {freeze!r}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if backbone_from is None and encoder_from is not None:
        backbone_from = backbone_config_of(encoder_from)
    cfg = semseg_config(num_classes, backbone_from=backbone_from, input_size=input_size, encoder=encoder)
    cfg.MODEL.SEMSEG.FREEZE_ENCODER_AT = freeze
    if class_weights is not None:
        cfg.MODEL.SEMSEG.CLASS_WEIGHTS = _class_weights(class_weights, train_dataset, num_classes)
    cfg.MODEL.DEVICE = "cpu"  # the initial model is only built to be saved; train() sets the device
    init_weights, report = None, None
    if encoder_from is not None:
        init_weights, report = _transfer_encoder(cfg, encoder_from, options.seed, out)
    result = train(
        cfg,
        options,
        train_dataset=train_dataset,
        val_dataset=val_dataset,
        output_dir=out,
        init_weights=init_weights,
        progress=progress,
    )
    return SemanticTrainResult(train=result, transfer=report, config=cfg)


def _transfer_encoder(
    cfg: CfgNode, encoder_from: str | Path, seed: int, out: Path
) -> tuple[str, TransferReport]:
    """Build the model, load the detection encoder into it, save it as the initial checkpoint."""
    # Same seed as the engine uses before build_model: the decoder starts identical to a scratch run.
    seed_all_rng(seed)
    model = build_model(cfg)
    report = load_encoder_from_detection(model, encoder_from)
    init_path = save_checkpoint(model, out / "init_transfer.pth", extra={"transfer": report.summary()})
    _write_report(report, out / "transfer_report.json")
    return str(init_path), report
