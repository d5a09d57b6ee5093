"""Structured logging for home: one line per event, ``key=value`` or JSON.

Every log call names an event (``tls_refused``, ``enrolled``, ``clone_refused``)
and carries its facts as fields, so an operator can grep or ship them as-is.
Use :func:`event` rather than formatting strings by hand.

Log lines are bounded, because most of their facts come from peers: every field
is cut to :data:`MAX_FIELD_CHARS`, and the lines one peer causes go through a
:class:`PeerLog` budget, so a peer cannot turn its frames into log volume.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import OrderedDict
from typing import Any

from tether.home.ratelimit import RateLimit

_FIELDS = "tether_fields"
#: Longest field value in a log line (characters); longer ones are cut and marked.
MAX_FIELD_CHARS = 512


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log event ``name`` with structured ``fields`` (each cut to :data:`MAX_FIELD_CHARS`)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={_FIELDS: {k: _bounded(v) for k, v in fields.items()}})


def _bounded(value: Any) -> Any:
    """A field value that fits in a log line: scalars as they are, long text cut."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, default=str, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = repr(value)
        if len(text) <= MAX_FIELD_CHARS:
            return value
    if len(text) <= MAX_FIELD_CHARS:
        return text
    return f"{text[:MAX_FIELD_CHARS]}...[{len(text) - MAX_FIELD_CHARS} more chars]"


class PeerLog:
    """A log budget per peer: at most ``burst`` lines at once and ``rate`` per second.

    Why: a peer decides how often home logs its violations, errors and refusals;
    without a budget, each cheap frame it sends is a line home writes (60 MB/s
    of log in issue 11). Lines over budget are counted, and the count is logged
    with the peer's next line that fits (``suppressed=N``) or by :meth:`flush`.
    """

    def __init__(self, rate: float = 1.0, burst: float = 30, max_keys: int = 10_000) -> None:
        self.limit = RateLimit(rate, burst, max_keys=max_keys)
        self.max_keys = max_keys
        self._suppressed: OrderedDict[str, int] = OrderedDict()

    def event(self, key: str, logger: logging.Logger, level: int, name: str,
              **fields: Any) -> bool:
        """Log like :func:`event` when ``key``'s budget allows; False when suppressed."""
        if not logger.isEnabledFor(level):
            return False
        if not self.limit.allow(key):
            self._suppressed[key] = self._suppressed.pop(key, 0) + 1
            while len(self._suppressed) > self.max_keys:
                self._suppressed.popitem(last=False)
            return False
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        event(logger, level, name, **fields)
        return True

    def flush(self, key: str, logger: logging.Logger, **fields: Any) -> None:
        """Report lines of ``key`` still suppressed (when its peer goes away)."""
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            event(logger, logging.WARNING, "log_suppressed", suppressed=suppressed, **fields)


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
