"""cvserve models: Detectron2 adapters, the semantic segmenter, data, training and evaluation.

Importable without grpc or ray. Importing this package applies the detectron2
compatibility layer (:mod:`models._compat`) before any detectron2 import.
"""

from models import _compat

_compat.apply()
