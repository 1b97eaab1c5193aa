"""Evaluation: COCO bbox / segm / keypoints metrics and semantic segmentation metrics.

Importable without torch, grpc or ray; the detectron2 ``DatasetEvaluator`` adapters live
in :mod:`cvserve.models.evaluation.evaluators` (they import detectron2).
"""

from cvserve.models.evaluation.coco import evaluate_coco, summarize
from cvserve.models.evaluation.errors import EvaluationInputError

__all__ = ["EvaluationInputError", "evaluate_coco", "summarize"]
