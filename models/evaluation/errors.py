"""Errors of the evaluation package."""

from __future__ import annotations

from typing import Any

__all__ = ["EvaluationInputError", "describe"]


class EvaluationInputError(ValueError):
    """An input file or object is malformed; the message names the file, entry and field."""


def describe(value: Any, limit: int = 60) -> str:
    """A short description of an offending value for error messages."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"
