"""Structured logging for home: one line per event, ``key=value`` or JSON.

Every log call names an event (``tls_refused``, ``enrolled``, ``clone_refused``)
and carries its facts as fields, so an operator can grep or ship them as-is.
Use :func:`event` rather than formatting strings by hand.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "tether_fields"


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log event ``name`` with structured ``fields``."""
    logger.log(level, name, extra={_FIELDS: fields})


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00Z INFO home.server event key=value ...``"""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{stamp}.{int(record.msecs):03d}Z", record.levelname, record.name,
                 record.getMessage()]
        for key, value in getattr(record, _FIELDS, {}).items():
            parts.append(f"{key}={_quote(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": record.created, "level": record.levelname, "logger": record.name,
               "event": record.getMessage(), **getattr(record, _FIELDS, {})}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def _quote(value: Any) -> str:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        text = ",".join(value)
    else:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Route home's and websockets' logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every refused HTTP handshake at INFO/ERROR with tracebacks;
    # home logs those itself with fields, so keep websockets to warnings.
    logging.getLogger("websockets").setLevel(logging.WARNING)
