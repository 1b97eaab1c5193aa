"""Structured logging: JSON lines carrying the request id of the current context."""

from __future__ import annotations

import io
import json
import logging

from cvserve.logs import JsonFormatter, RequestIdFilter, request_id_var


def _capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger("test_logs_capture")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, stream


def test_json_lines_carry_request_id_and_extra_fields() -> None:
    logger, stream = _capture(JsonFormatter())
    token = request_id_var.set("req-42")
    try:
        logger.info("served %s", "Detect", extra={"code": "OK", "ms": 1.5})
    finally:
        request_id_var.reset(token)
    logger.warning("outside a request")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "served Detect" and first["request_id"] == "req-42"
    assert first["code"] == "OK" and first["ms"] == 1.5 and first["level"] == "INFO"
    assert first["ts"].endswith("Z")
    assert second["request_id"] == "-"


def test_exceptions_are_logged_with_traceback() -> None:
    logger, stream = _capture(JsonFormatter())
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    record = json.loads(stream.getvalue())
    assert "ValueError: boom" in record["exc_info"]
