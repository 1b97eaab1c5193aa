"""The encoder-decoder semantic segmenter: architecture, transfer learning and serving adapter.

Importing this package registers ``EncoderDecoderSegmentor`` in detectron2's
``META_ARCH_REGISTRY`` and the semantic-segmentation builder in :mod:`cvserve.models.registry`.
"""

from cvserve.models.semseg.adapter import SemanticSegmentationModel
from cvserve.models.semseg.arch import EncoderDecoderSegmentor
from cvserve.models.semseg.config import add_semseg_config, semseg_config
from cvserve.models.semseg.transfer import TransferReport, load_encoder_from_detection

__all__ = [
    "EncoderDecoderSegmentor",
    "SemanticSegmentationModel",
    "TransferReport",
    "add_semseg_config",
    "load_encoder_from_detection",
    "semseg_config",
]
