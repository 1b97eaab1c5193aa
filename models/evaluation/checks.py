"""Reading JSON inputs and the value checks COCO ground truth and results share.

Every problem raises :class:`EvaluationInputError` naming the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cvserve.models.evaluation.errors import EvaluationInputError

__all__ = ["BOX_HELP", "box_ok", "finite", "is_int", "load_json"]

_NUM = (int, float)  # ``type(x) in _NUM`` deliberately rejects bool


def load_json(source: str | os.PathLike[str] | dict[str, Any] | list[Any], what: str) -> tuple[Any, str]:
    """Parse ``source`` if it is a path; return ``(data, name for messages)``.

    Raises:
        EvaluationInputError: the file is missing, empty or not JSON.
    """
    if isinstance(source, (dict, list)):
        return source, f"<{what}>"
    path = Path(source)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise EvaluationInputError(f"{path}: {what} file not found") from None
    except OSError as e:
        raise EvaluationInputError(f"{path}: cannot read {what} file: {e.strerror}") from None
    if not text.strip():
        raise EvaluationInputError(f"{path}: {what} file is empty")
    try:
        return json.loads(text), str(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = (
            f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        )
        raise EvaluationInputError(f"{path}: {what} file is not valid JSON: {detail}") from None


def is_int(v: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return type(v) is int


def finite(v: Any) -> bool:
    """A finite ``int`` or ``float`` (not a ``bool``)."""
    return type(v) in _NUM and math.isfinite(v)


def box_ok(b: Any) -> bool:
    """A COCO ``[x, y, width, height]`` box: 4 finite numbers, width and height >= 0."""
    return type(b) is list and len(b) == 4 and all(finite(v) for v in b) and b[2] >= 0 and b[3] >= 0


BOX_HELP = "expected [x, y, width, height]: 4 finite numbers, width and height >= 0"
