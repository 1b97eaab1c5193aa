"""cvserve models: Detectron2 adapters, the semantic segmenter, data, training and evaluation.

Importable without grpc or ray, and importing it changes nothing else in the process.
detectron2 v0.6 needs :func:`cvserve.models.compat.apply` before its first import;
the entry points that load detectron2 (``build_model``, the CLI, training) call it.
"""
