"""Errors models raise about their inputs, for callers to report as the caller's fault.

A leaf module (no torch, no detectron2), so a server can catch these without loading
any model code.
"""

from __future__ import annotations

__all__ = ["InputSizeError", "RepositoryError"]


class InputSizeError(ValueError):
    """An image a model cannot take at its size: its network input would exceed the
    model's ``max_input_pixels``. The message names the image size, the input size and
    the limit; servers report it as an invalid argument."""


class RepositoryError(ValueError):
    """A model repository file is missing, unreadable or has an invalid field; the message
    names the file and the field."""
